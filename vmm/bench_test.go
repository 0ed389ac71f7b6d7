package vmm

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gosandbox/sandbox/internal/kvmhost"
	"github.com/gosandbox/sandbox/kernel"
)

// BenchmarkNewToFirstRun measures the VMM's own start-up cost: New (KVM VM,
// memory, irqchip, vCPUs, devices), loading the default kernel and an
// initramfs, and Start up to the boot vCPU's first KVM_RUN. It runs on any
// KVM host, PVM included (the guest is stopped right after its first
// entry). Target: 5 ms.
func BenchmarkNewToFirstRun(b *testing.B) {
	requireKVM(b)
	k, err := kernel.Default(context.Background())
	if err != nil {
		b.Fatal(err)
	}
	initrd := filepath.Join(b.TempDir(), "initrd")
	if err := os.WriteFile(initrd, testInitramfs(b, benchInit(b)), 0o444); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	var total time.Duration
	for i := 0; i < b.N; i++ {
		vm, err := New(Config{Memory: 256 << 20})
		if err != nil {
			b.Fatal(err)
		}
		if _, err := vm.LoadLinux(LinuxConfig{Kernel: k.Vmlinux, SetupHeader: k.SetupHeader, InitrdFile: initrd, AllowAnyHost: true}); err != nil {
			b.Fatal(err)
		}
		if err := vm.Start(); err != nil {
			b.Fatal(err)
		}
		for vm.Phases().FirstRun.IsZero() {
			time.Sleep(10 * time.Microsecond)
		}
		total += vm.Phases().ToFirstRun()
		b.StopTimer()
		vm.Close()
		b.StartTimer()
	}
	b.ReportMetric(float64(total.Microseconds())/float64(b.N)/1000, "ms-to-first-run")
}

// benchInit builds the test init once per benchmark.
func benchInit(b *testing.B) string {
	if p := os.Getenv("GOSANDBOX_TEST_INIT"); p != "" {
		return p
	}
	return buildTestInit(b, b.TempDir())
}

// BenchmarkVMOverhead measures host memory per running VM beyond the guest
// memory the guest touched: KVM's per-VM and per-vCPU structures, the
// kvm_run pages, page tables, and the VMM's goroutines. Target: 5 MiB.
func BenchmarkVMOverhead(b *testing.B) {
	requireKVM(b)
	const n = 10
	for i := 0; i < b.N; i++ {
		before := rssKiB(b)
		var vms []*VM
		var guestKiB int64
		for j := 0; j < n; j++ {
			vm, d := newTestVM(b, 1, nil)
			if err := vm.Memory().WriteAt(idGuest(uint32(j)), codeAddr); err != nil {
				b.Fatal(err)
			}
			if err := vm.SetupLongMode(codeAddr, 0); err != nil {
				b.Fatal(err)
			}
			if err := vm.Start(); err != nil {
				b.Fatal(err)
			}
			<-d.ids // running, now halted
			vms = append(vms, vm)
		}
		for _, vm := range vms {
			for _, r := range vm.Memory().Regions() {
				guestKiB += mappingRSSKiB(b, r.HostAddr())
			}
		}
		after := rssKiB(b)
		b.ReportMetric(float64(after-before-guestKiB)/n, "overhead-KiB/VM")
		b.ReportMetric(float64(guestKiB)/n, "guest-touched-KiB/VM")
		for _, vm := range vms {
			vm.Close()
		}
	}
}

func rssKiB(t testing.TB) int64 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			n, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return n
		}
	}
	t.Fatal("no VmRSS")
	return 0
}

// mappingRSSKiB returns the resident size of the mapping starting at addr.
func mappingRSSKiB(t testing.TB, addr uintptr) int64 {
	f, err := os.Open("/proc/self/smaps")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	prefix := fmt.Sprintf("%x-", addr)
	s := bufio.NewScanner(f)
	in := false
	for s.Scan() {
		l := s.Text()
		if strings.Contains(l, "-") && !strings.HasPrefix(l, " ") && len(l) > 0 && (l[0] >= '0' && l[0] <= '9' || l[0] >= 'a' && l[0] <= 'f') {
			in = strings.HasPrefix(l, prefix)
			continue
		}
		if v, ok := strings.CutPrefix(l, "Rss:"); ok && in {
			n, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return n
		}
	}
	return 0
}

// markerWriter closes seen when the init marker appears in the output.
type markerWriter struct {
	mu   sync.Mutex
	buf  bytes.Buffer
	seen chan struct{}
	once sync.Once
}

func newMarkerWriter() *markerWriter { return &markerWriter{seen: make(chan struct{})} }

func (m *markerWriter) Write(p []byte) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.buf.Write(p)
	if bytes.Contains(m.buf.Bytes(), []byte(initMarker)) {
		m.once.Do(func() { close(m.seen) })
	}
	return len(p), nil
}

func (m *markerWriter) String() string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.buf.String()
}

// BenchmarkBootToInit boots the default kernel to the test init's first
// console line, with this VMM and with QEMU -M microvm (same kernel, init,
// command line, memory and vCPU count), and reports both and their ratio.
// It needs real KVM; on other hosts it runs inside the emulated KVM host.
// Target: ours ≤ 0.7× QEMU's.
//
// Knobs for investigating boots (environment variables):
// GOSANDBOX_BENCH_CMDLINE adds kernel parameters to both (e.g. loglevel=7);
// GOSANDBOX_BENCH_CONSOLE_DIR keeps both consoles there for comparison;
// GOSANDBOX_BENCH_BZIMAGE=1 makes our VMM boot the bzImage (the guest
// decompresses itself, as under QEMU); GOSANDBOX_BENCH_VMLINUX_TMP=1 boots a
// copy of the vmlinux in the temporary directory (mapped, not copied, when
// the cache is on a network file system such as the emulated host's 9p).
// Inside the emulated host both boot from local copies of the kernel files
// unless GOSANDBOX_BENCH_SHARED_CACHE is set.
func BenchmarkBootToInit(b *testing.B) {
	f := prepareLinux(b)
	if kvmhost.Delegate(b, kvmhost.WithTimeout(40*time.Minute)) {
		return
	}
	if os.Getenv(kvmhost.EnvInside) == "1" && os.Getenv("GOSANDBOX_BENCH_SHARED_CACHE") == "" {
		// In the emulated host the cache directory is the host's, shared
		// over 9p, where reading the 36 MB vmlinux costs seconds that a
		// real host's local, warm cache does not (and QEMU's 10 MB
		// bzImage costs less). Both VMMs boot from local copies, made
		// before the clock starts, as BenchmarkVsQEMU does.
		f = localKernelCopies(b, f)
	}
	var ours, theirs time.Duration
	var exits uint64
	for i := 0; i < b.N; i++ {
		d, n := bootOursToMarker(b, f)
		ours += d
		exits += n
		theirs += bootQEMUToMarker(b, f)
	}
	b.ReportMetric(ours.Seconds()/float64(b.N), "gosandbox-s")
	b.ReportMetric(theirs.Seconds()/float64(b.N), "qemu-microvm-s")
	b.ReportMetric(ours.Seconds()/theirs.Seconds(), "ratio")
	b.ReportMetric(float64(exits)/float64(b.N), "vm-exits/boot")
}

// localKernelCopies returns f with its vmlinux and bzImage copied into a
// temporary directory.
func localKernelCopies(b *testing.B, f *linuxFixture) *linuxFixture {
	dir := b.TempDir()
	k := *f.kernel
	for _, p := range []*string{&k.Vmlinux, &k.Path} {
		data, err := os.ReadFile(*p)
		if err != nil {
			b.Fatal(err)
		}
		local := filepath.Join(dir, filepath.Base(*p))
		if err := os.WriteFile(local, data, 0o444); err != nil {
			b.Fatal(err)
		}
		*p = local
	}
	return &linuxFixture{kernel: &k, initrd: f.initrd}
}

func bootOursToMarker(b *testing.B, f *linuxFixture) (time.Duration, uint64) {
	mw := newMarkerWriter()
	start := time.Now()
	vm, err := New(Config{Memory: 512 << 20, VCPUs: 1, Console: mw})
	if err != nil {
		b.Fatal(err)
	}
	defer vm.Close()
	lc := LinuxConfig{Kernel: f.kernel.Vmlinux, SetupHeader: f.kernel.SetupHeader, Initrd: f.initrd, Cmdline: os.Getenv("GOSANDBOX_BENCH_CMDLINE")}
	if os.Getenv("GOSANDBOX_BENCH_VMLINUX_TMP") != "" {
		data, err := os.ReadFile(f.kernel.Vmlinux)
		if err != nil {
			b.Fatal(err)
		}
		lc.Kernel = filepath.Join(b.TempDir(), "vmlinux")
		if err := os.WriteFile(lc.Kernel, data, 0o444); err != nil {
			b.Fatal(err)
		}
	}
	if os.Getenv("GOSANDBOX_BENCH_BZIMAGE") != "" {
		lc.Kernel, lc.SetupHeader = f.kernel.Path, nil // the guest decompresses itself, as under QEMU
	}
	if _, err := vm.LoadLinux(lc); err != nil {
		b.Fatal(err)
	}
	if err := vm.Start(); err != nil {
		b.Fatal(err)
	}
	select {
	case <-mw.seen:
	case <-vm.Done():
		b.Fatalf("VM ended before init: %v\n%s", vm.exit, mw)
	case <-time.After(5 * time.Minute):
		b.Fatalf("no init marker after 5 minutes:\n%s", mw)
	}
	d := time.Since(start)
	vm.Wait(context.Background())
	saveConsole(b, "gosandbox", mw.String())
	var n uint64
	for _, e := range vm.Exits() {
		n += e
	}
	return d, n
}

func bootQEMUToMarker(b *testing.B, f *linuxFixture) time.Duration {
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		b.Fatalf("QEMU is needed for the side-by-side run: %v", err)
	}
	dir := b.TempDir()
	initrd := filepath.Join(dir, "initrd")
	if err := os.WriteFile(initrd, f.initrd, 0o644); err != nil {
		b.Fatal(err)
	}
	mw := newMarkerWriter()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	// The same CPU features our VMM gives the guest here: without XSAVE
	// where the host cannot keep its layout consistent (see xsave.go).
	cpu := "host"
	if vm, err := New(Config{}); err == nil {
		hasXSAVE := false
		for _, e := range vm.supportedCPUID {
			if e.Function == 1 && e.ECX&(1<<26) != 0 {
				hasXSAVE = true
			}
		}
		vm.Close()
		if !hasXSAVE {
			cpu = "host,xsave=off,avx=off,avx2=off"
		}
	}
	start := time.Now()
	cmd := exec.CommandContext(ctx, qemu,
		"-M", "microvm,x-option-roms=off,rtc=off", "-enable-kvm", "-cpu", cpu,
		"-m", "512", "-smp", "1", "-nodefaults", "-no-user-config", "-nographic",
		"-serial", "stdio", "-no-reboot",
		"-kernel", f.kernel.Path, "-initrd", initrd, "-append", strings.TrimSpace(BaseCmdline+" "+os.Getenv("GOSANDBOX_BENCH_CMDLINE")))
	cmd.Stdout = mw
	cmd.Stderr = mw
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	var d time.Duration
	select {
	case <-mw.seen:
		d = time.Since(start)
	case err := <-done:
		b.Fatalf("QEMU ended before init (%v):\n%s", err, mw)
	case <-ctx.Done():
		b.Fatalf("QEMU: no init marker:\n%s", mw)
	}
	cmd.Process.Kill()
	<-done
	saveConsole(b, "qemu", mw.String())
	return d
}

// saveConsole keeps a boot's console in GOSANDBOX_BENCH_CONSOLE_DIR, if
// set, to compare boots.
func saveConsole(b *testing.B, name, con string) {
	if dir := os.Getenv("GOSANDBOX_BENCH_CONSOLE_DIR"); dir != "" {
		os.WriteFile(filepath.Join(dir, name+".log"), []byte(con), 0o644)
	}
}
