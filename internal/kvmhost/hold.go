package kvmhost

import (
	"fmt"
	"sync"

	"golang.org/x/sys/unix"
)

// held is the KVM VM that HoldStaticKeys keeps for the life of the process
// (test infrastructure: the package's only process-wide state).
var held struct {
	once sync.Once
	err  error
}

// HoldStaticKeys creates one KVM VM with an in-kernel irqchip and one vCPU
// that never runs, and keeps them until the process exits. Delegate calls
// it inside the outer VM before the test runs.
//
// Why: KVM counts VMs and not-yet-enabled local APICs in static keys
// (preempt_notifier_key, apic_sw_disabled), so a process booting VMs one
// after another flips them between 0 and 1 at every VM, and each flip
// patches live kernel code: the preempt notifier's branch sits in
// finish_task_switch, run at every context switch. Under QEMU's
// multi-threaded TCG the outer VM's other CPU has then been seen executing
// the stale breakpoint forever (soft lockups at finish_task_switch+0x9f
// with the other CPU in asm_exc_int3, which ended runs in CI). With one VM
// and one APIC held, the counts never return to 0 and nothing is patched.
func HoldStaticKeys() error {
	held.once.Do(func() { held.err = holdKVM() })
	return held.err
}

func holdKVM() error {
	const (
		kvmCreateVM      = 0xAE01
		kvmCreateIRQChip = 0xAE60
		kvmCreateVCPU    = 0xAE41
	)
	kvm, err := unix.Open("/dev/kvm", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("kvmhost: hold a KVM VM: %w", err)
	}
	defer unix.Close(kvm)
	vm, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(kvm), kvmCreateVM, 0)
	if errno != 0 {
		return fmt.Errorf("kvmhost: hold a KVM VM: KVM_CREATE_VM: %w", errno)
	}
	// The VM fd and the vCPU fd stay open on purpose.
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, vm, kvmCreateIRQChip, 0); errno != 0 {
		return fmt.Errorf("kvmhost: hold a KVM VM: KVM_CREATE_IRQCHIP: %w", errno)
	}
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, vm, kvmCreateVCPU, 0); errno != 0 {
		return fmt.Errorf("kvmhost: hold a KVM VM: KVM_CREATE_VCPU: %w", errno)
	}
	return nil
}
