package vmm

import (
	"fmt"
	"os"
	"strings"

	"github.com/gosandbox/sandbox/vmm/guestmem"
	"github.com/gosandbox/sandbox/vmm/linuxboot"
)

// BaseCmdline is the kernel command line every Linux guest gets before the
// caller's own parameters:
//
//   - console=ttyS0: kernel messages on COM1 (the VMM's console log);
//   - reboot=k: reboot through the i8042 reset line, which ends the VM;
//   - panic=-1: a panicking kernel resets at once (reported as ExitPanic);
//   - initcall_blacklist=cmos_init,early_resume_init,i8042_init: skip the
//     RTC driver and the RTC-reading resume check (the guest clock comes
//     from kvmclock and the agent; waiting on the CMOS RTC was 90% of boot
//     time under emulation) and the PS/2 probe (no keyboard);
//   - 8250.nr_uarts=1: probe only COM1;
//   - tsc=reliable no_timer_check: trust KVM's TSC and timer, skip checks
//     that take seconds under nested virtualization;
//   - quiet: each console byte costs a VM exit;
//   - loop.max_loop=0: no loop devices made at boot (the default kernel
//     made 8, about 2 s of a boot under emulation, 15-20% of it, in paired
//     runs); losetup and mount -o loop still get them on demand through
//     /dev/loop-control.
const BaseCmdline = "console=ttyS0 reboot=k panic=-1 " +
	"initcall_blacklist=cmos_init,early_resume_init,i8042_init " +
	"8250.nr_uarts=1 tsc=reliable no_timer_check quiet loop.max_loop=0"

// LinuxConfig says which Linux kernel to boot and how.
type LinuxConfig struct {
	// Kernel is the path of an uncompressed vmlinux ELF (fastest) or a
	// bzImage (its payload is decompressed at every boot; package kernel
	// caches the extracted vmlinux instead).
	Kernel string
	// SetupHeader is the setup header of the bzImage Kernel was extracted
	// from, if any (it carries the kernel's own boot-protocol fields).
	SetupHeader []byte
	// Cmdline is appended to BaseCmdline.
	Cmdline string
	// Initrd is an optional initramfs.
	Initrd []byte
	// InitrdFile is the path of an initramfs file, instead of Initrd: its
	// pages are mapped into guest memory copy-on-write, not copied. It
	// must not be modified in place while guests use it.
	InitrdFile string
	// AllowAnyHost skips the host check (PVM and hosts without hardware
	// virtualization cannot run a stock kernel; the check fails fast with a
	// *HostError instead of a guest that dies in emulation).
	AllowAnyHost bool
	// Lazy leaves guest memory to be faulted in as the guest touches it.
	// By default Start populates the kernel image, the top of RAM and the
	// initramfs with writable host pages on a goroutine of its own while
	// the guest boots (see guestmem.Memory.Populate and bootRanges): the
	// boot writes to most of them anyway, and each first touch then costs
	// KVM's fault alone. In the emulated KVM host this made New → first
	// output 1.9 s (15%) shorter in paired boots; it costs about 10 MiB
	// more host memory per VM with the default kernel (the image's pages
	// the guest never writes, no longer shared with other VMs through the
	// page cache).
	Lazy bool
}

// LoadLinux loads a kernel, its command line and initramfs into guest
// memory and points the boot vCPU at the kernel's 64-bit entry. Call it
// before Start.
func (vm *VM) LoadLinux(lc LinuxConfig) (*linuxboot.Loaded, error) {
	if !lc.AllowAnyHost {
		if err := vm.host.CanBootLinux(); err != nil {
			return nil, err
		}
	}
	f, err := os.Open(lc.Kernel)
	if err != nil {
		return nil, fmt.Errorf("vmm: open kernel: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("vmm: stat kernel: %w", err)
	}
	cfg := linuxboot.Config{
		Cmdline:     strings.TrimSpace(BaseCmdline + " " + lc.Cmdline),
		Initrd:      lc.Initrd,
		SetupHeader: lc.SetupHeader,
	}
	if lc.InitrdFile != "" {
		inf, err := os.Open(lc.InitrdFile)
		if err != nil {
			return nil, fmt.Errorf("vmm: open initramfs: %w", err)
		}
		defer inf.Close()
		cfg.InitrdFile = inf
		cfg.Mapper = vm.mem
	}
	head := make([]byte, 1024)
	n, _ := f.ReadAt(head, 0)
	head = head[:n]
	var loaded *linuxboot.Loaded
	switch {
	case linuxboot.IsELF(head):
		// Map the segments copy-on-write from the file: nothing is
		// copied before the guest runs (Start's populating goroutine then
		// makes the private copies the boot would make anyway).
		cfg.Mapper = vm.mem
		loaded, err = linuxboot.LoadELF(vm.mem, f, st.Size(), cfg)
	case linuxboot.IsBzImage(head):
		b, rerr := os.ReadFile(lc.Kernel)
		if rerr != nil {
			return nil, fmt.Errorf("vmm: read kernel: %w", rerr)
		}
		z, perr := linuxboot.ParseBzImage(b)
		if perr != nil {
			return nil, perr
		}
		loaded, err = linuxboot.LoadBzImage(vm.mem, z, cfg)
	default:
		return nil, fmt.Errorf("vmm: %s is neither an ELF vmlinux nor a bzImage", lc.Kernel)
	}
	if err != nil {
		return nil, err
	}
	if err := vm.SetupLongMode(loaded.Entry, loaded.BootParams); err != nil {
		return nil, err
	}
	if !lc.Lazy {
		vm.populate = bootRanges(vm.mem.Regions(), loaded)
	}
	vm.log.Debug("kernel loaded", "entry", fmt.Sprintf("%#x", loaded.Entry), "cmdline", cfg.Cmdline)
	return loaded, nil
}

// bootRanges is the guest memory a Linux boot writes to (most of) early,
// in about the order it does: the kernel image (its text is patched at
// boot), the top of RAM, where memblock allocates top-down (chiefly the
// page structs, 1/64 of RAM), and the initramfs (unpacked, then freed for
// reuse). Measured with the default kernel and 512 MiB: all of the image
// and of the top 16 MiB were resident after the boot.
func bootRanges(regions []guestmem.Region, l *linuxboot.Loaded) []memRange {
	r := []memRange{{l.KernelStart, l.KernelEnd - l.KernelStart}}
	if len(regions) > 0 {
		last := regions[len(regions)-1]
		var total uint64
		for _, g := range regions {
			total += g.Size
		}
		n := min(8<<20+total/64, total/4, last.Size)
		top := last.GPA + last.Size
		// The image may reach into a small guest's top.
		if start := top - n; start >= l.KernelEnd || top <= l.KernelStart {
			r = append(r, memRange{start, n})
		} else if top > l.KernelEnd {
			r = append(r, memRange{l.KernelEnd, top - l.KernelEnd})
		}
	}
	if l.InitrdSize > 0 {
		r = append(r, memRange{l.InitrdAddr, l.InitrdSize})
	}
	return r
}
