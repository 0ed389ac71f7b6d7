// Package kvmhost runs code that needs a real KVM — one that boots stock
// Linux guests — on machines that have none, by nesting: an "outer VM" in
// QEMU software emulation (TCG) with AMD-V exposed, whose kernel loads
// kvm-amd and so offers a real /dev/kvm to the program run inside it.
//
// It exists for tests. The build machines of this project have a /dev/kvm
// backed by PVM (module kvm_pvm, no vmx/svm), which cannot run a stock
// kernel; see TESTING.md. Where hardware KVM exists, the same tests run
// directly and this package only says so.
//
// # Use from a test
//
//	func TestBootLinux(t *testing.T) {
//		if kvmhost.Delegate(t) {
//			return // ran (and was judged) inside the outer VM
//		}
//		// Here real KVM is available: hardware, or inside the outer VM.
//	}
//
// Delegate re-runs the current test binary inside the outer VM with
// -test.run selecting exactly that test (-test.bench for a benchmark; the
// inner benchmark line is the result, the outer one only times the VM),
// streams its output to t.Log and fails the test if the inner run fails or
// shows no PASS. Under CI=true a test that cannot get real KVM fails;
// outside CI it skips (and -short skips it too). Each Delegate call boots
// one outer VM: measured here (2 cores shared with other work) 5.7–8 s from
// QEMU start to the program running, of which ~2.2 s is the outer kernel
// reaching /init and ~1.6 s loading its modules; 10–25 s when the machine
// is busy. So batch: one parent test per package calls Delegate once and
// runs many cases as subtests, rather than every small test delegating.
//
// Inside the outer VM, Delegate first makes the process hold one idle KVM
// VM for its whole life (HoldStaticKeys): otherwise booting VMs one after
// another flips KVM's static keys at every VM, each flip patches the outer
// kernel's context-switch code, and QEMU's TCG has been seen running the
// stale code forever (the outer kernel's soft lockups). A soft lockup that
// happens anyway panics the outer kernel (softlockup_panic=1), which ends
// the run as ErrCrashed, and Delegate runs the test again (at most twice).
//
// Work that needs the network or writes outside the shares belongs before
// the Delegate call, on the host: the outer VM has loopback only (unless
// WithNetwork / Config.Network asks for QEMU's user networking), and the
// host's files are read-only inside except the cache directory. For
// example, fetch the guest kernel first; inside, the same code finds it in
// the shared cache:
//
//	func TestBoot(t *testing.T) {
//		kernel := fetchKernel(t) // host: download and cache; inside: cache hit
//		if kvmhost.Delegate(t) {
//			return
//		}
//		for _, tc := range cases {
//			t.Run(tc.name, func(t *testing.T) { boot(t, kernel, tc) })
//		}
//	}
//
// Outer VMs are CPU-bound, so at most one per CPU runs at a time on a
// machine (GOSANDBOX_KVMHOST_SLOTS overrides), which is as many test
// binaries as go test runs at once by default; further Run calls, from any
// process, wait for a slot (bounded by ctx, or by the test's deadline under
// Delegate).
//
// Run runs any host program inside the outer VM and returns its exit code;
// cmd/kvmhost-run is a command-line front end to it.
//
// # The recipe
//
//   - Host packages (Debian), installed with apt-get --no-install-recommends
//     when missing: qemu-system-x86 and busybox-static (and xz-utils, Debian
//     priority "standard", used once to unpack the kernel). The outer kernel
//     is Debian's generic linux-image-amd64 (6.1), fetched with apt-get
//     download and unpacked with dpkg-deb. Not the -cloud flavour the first
//     recipe used: Debian builds that one without 9p (CONFIG_NET_9P unset),
//     and the outer VM reaches the host's files over virtio-9p.
//   - The outer kernel boots from its uncompressed vmlinux through PVH: cut
//     out of the bzImage once (xz) and cached, it saves the xz decompressor
//     running under TCG at every boot (measured: 4.6–9.5 s instead of
//     12–43 s from QEMU start to init having loaded its modules, on this
//     busy 2-core machine).
//   - Cache, under os.UserCacheDir()/gosandbox/kvmhost: per kernel package
//     version the vmlinuz and the vmlinux cut from it, a modules.dep made
//     from the modules' .modinfo (the .deb ships none; depmod writes it at
//     install time), and the .deb itself, from which module files are
//     taken; and initramfs images keyed
//     by a hash of kernel, busybox, init script and module list. Fills are
//     serialized between processes with flock(2) and published by atomic
//     renames, so parallel go test processes share one cache safely.
//   - The initramfs (an uncompressed newc cpio, written with u-root's cpio
//     package) holds only busybox, an init script and the modules: kvm-amd
//     with its dependencies, virtio-pci, virtio-rng, and 9p. Nothing of the
//     program is copied into it.
//   - QEMU: -M q35 -accel tcg,thread=multi -cpu max -smp 2 -m 4096
//     -nodefaults -vga none -display none -no-reboot, the console on
//     ttyS0 (kernel command line "console=ttyS0 loglevel=5 panic=-1
//     softlockup_panic=1 softlockup_all_cpu_backtrace=1 mitigations=off":
//     a CPU stuck in the outer kernel for 20 s, as QEMU's emulated SVM has
//     left one, panics it and so ends the run as ErrCrashed, which Delegate
//     runs again), virtio-rng for entropy, and three kinds of 9p share:
//     the host's / read-only (tag hostroot), a per-run work directory, and
//     read-write shares (the user's cache directory by default, so Go's
//     build cache and the guest kernel cache carry over).
//   - Inside, init mounts the host root read-only, mounts /proc, /sys,
//     devtmpfs /dev (so /dev/kvm appears), devpts, and fresh tmpfs over
//     /tmp, /var/tmp, /run and /dev/shm, binds the work and cache
//     directories at their host paths (and the program's directory when it
//     lives under /tmp, as go test binaries do), brings up loopback, chroots
//     into the host root and runs the program at its own absolute path with
//     the caller's environment plus GOSANDBOX_IN_KVMHOST=1, TMPDIR=/tmp and
//     XDG_CACHE_HOME.
//   - Results never come from console text: the program's stdout and stderr
//     go to files in the work directory that the host streams while the VM
//     runs, and its exit status is written to a status file before the VM
//     powers off. A QEMU exit without that file (outer kernel panic, QEMU
//     crash) is ErrCrashed; a ctx deadline or Config.Timeout kills QEMU and
//     is ErrTimeout; a failure to prepare the program's environment is
//     ErrSetup. Each carries the tail of the outer console. QEMU is always
//     killed and reaped (it also gets SIGKILL if this process dies), and
//     the work directory removed.
//
// # Costs and limits
//
// The outer VM runs everything under TCG, so absolute times inside it say
// nothing about performance; compare ratios against a peer run in the same
// outer VM. Guests the program boots inside run on nested SVM with
// emulated NPT: expect tens of seconds per Linux boot.
//
// The program's stdin is /dev/null. Its exit code comes back exactly as the
// shell saw it (128+N for a death by signal N).
//
// Detect and Delegate keep no global state; Run keeps none beyond the
// cache on disk.
package kvmhost
