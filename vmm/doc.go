// Package vmm is gosandbox's virtual machine monitor: it drives KVM from
// inside the calling process, with no helper binary and no cgo.
//
// A VM (New) owns its KVM VM fd, guest memory (package guestmem), one
// goroutine per vCPU locked to its OS thread, the in-kernel irqchip (PIC,
// IOAPIC, LAPICs) and PIT, and the legacy devices a Linux guest needs: a
// 16550A UART on COM1 whose output goes to an io.Writer and a bounded
// in-memory log, an i8042 whose reset line ends the VM, a CMOS that never
// makes the guest wait, and the boot-phase port (BootPort) the guest init
// writes to so the VMM can time New → first KVM_RUN → init. Other devices
// attach to the Bus (port I/O and MMIO handlers) and use the VM's interrupt
// plumbing: IRQLine, SignalMSI, AllocMSIRoute with AddIRQFD, and AddIoevent
// (KVM_IOEVENTFD), so queue kicks and interrupts need no trip through a vCPU
// thread.
//
// LoadLinux boots Linux with the 64-bit boot protocol: the vmlinux ELF
// segments are mapped copy-on-write from the file (package linuxboot does
// the parsing and the zero page), and from Start a goroutine populates the
// kernel image and initramfs with writable host pages while the guest boots
// (LinuxConfig.Lazy turns that off), so the boot's first touch of each page
// costs only KVM's own fault; the boot vCPU starts in long mode on
// identity-mapped page tables, and an MP table describes the vCPUs and the
// IOAPIC (there is no ACPI). CPUID comes from KVM_GET_SUPPORTED_CPUID with
// per-vCPU APIC IDs and topology; leaf 0xD (XSAVE) is checked for
// consistency where the host is itself virtualized (see xsave.go; the answer
// is remembered for the life of the process, the package's only
// process-wide state, because it is a fact about the host). The guest
// clock is kvmclock.
//
// # Hosts
//
// Probe classifies the host: hardware KVM; PVM (kvm_pvm, as on the project's
// build machines), which runs hand-written test guests but not a stock
// kernel; or no hardware virtualization. LoadLinux refuses hosts that
// cannot boot Linux with a *HostError matching ErrKVMUnusable, so callers
// fail fast with advice instead of watching a guest die in emulation.
//
// # Signals and threads
//
// The package installs no signal handler and changes no signal disposition.
// To force a vCPU out of KVM_RUN (Stop, Close, a guest exit seen on another
// vCPU) it sets kvm_run.immediate_exit and sends SIGURG to that vCPU's
// thread with tgkill; the Go runtime already handles SIGURG on every thread
// for goroutine preemption, so the signal is harmless to the rest of the
// process. A vCPU goroutine never unlocks its OS thread, so the thread ends
// with it.
//
// # Lifecycle
//
// New, then (optionally) LoadLinux and devices, then Start; Wait returns an
// *Exit saying how the guest ended (poweroff, reset, panic, triple fault,
// KVM internal error with its suberror and data, entry failure, host stop);
// Exit.AsError gives a *GuestError matching ErrGuestPanic and friends.
// Close stops the vCPUs and releases every fd, mapping and goroutine; it is
// safe to call twice. A context passed to Wait or Stop bounds that call, not
// the VM's life.
package vmm
