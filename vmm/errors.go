package vmm

import (
	"errors"
	"fmt"
)

// Sentinel errors; match them with errors.Is.
var (
	// ErrNoKVM: /dev/kvm does not exist.
	ErrNoKVM = errors.New("/dev/kvm does not exist: load the kvm_intel or kvm_amd module, or run on a machine with hardware virtualization")
	// ErrKVMPermission: /dev/kvm exists but this process may not open it.
	ErrKVMPermission = errors.New("/dev/kvm is not accessible: add this user to the group that owns /dev/kvm (usually kvm) or run as root")
	// ErrKVMUnusable: KVM opens but cannot run a stock Linux guest here.
	// ErrNoHardwareVirt and ErrPVMHost both match it.
	ErrKVMUnusable = errors.New("KVM cannot boot a Linux guest on this host")
	// ErrNoHardwareVirt: the CPU advertises neither VMX nor SVM.
	ErrNoHardwareVirt = errors.New("the CPU exposes no hardware virtualization (no vmx or svm flag): enable VT-x/AMD-V in firmware, or enable nested virtualization for this VM")
	// ErrPVMHost: /dev/kvm is served by kvm_pvm, which only runs PVM-enabled guest kernels.
	ErrPVMHost = errors.New("/dev/kvm is provided by kvm_pvm (PVM), which cannot run a stock Linux guest: use a host with hardware KVM, or the emulated KVM host (internal/kvmhost) for tests")
	// ErrMissingCapability: the KVM module lacks a capability the VMM needs.
	ErrMissingCapability = errors.New("KVM lacks a required capability")
	// ErrClosed: the VM was closed.
	ErrClosed = errors.New("vmm: VM is closed")
	// ErrRunning: the operation needs a VM that has not started yet.
	ErrRunning = errors.New("vmm: VM already started")
	// ErrNotStarted: the VM was never started.
	ErrNotStarted = errors.New("vmm: VM not started")
	// ErrConfig: a Config field is invalid; *ConfigError matches it.
	ErrConfig = errors.New("vmm: invalid configuration")
)

// HostError explains why this host cannot run guests. It matches
// ErrKVMUnusable and its specific cause.
type HostError struct {
	Cause  error  // ErrNoHardwareVirt, ErrPVMHost, ErrNoKVM, ErrKVMPermission, ...
	Detail string // what was observed
}

func (e *HostError) Error() string {
	if e.Detail == "" {
		return e.Cause.Error()
	}
	return e.Cause.Error() + " (" + e.Detail + ")"
}

// Unwrap returns the cause, and ErrKVMUnusable for unusable-KVM causes.
func (e *HostError) Unwrap() []error {
	if e.Cause == ErrNoHardwareVirt || e.Cause == ErrPVMHost {
		return []error{e.Cause, ErrKVMUnusable}
	}
	return []error{e.Cause}
}

// CapabilityError names a KVM capability the VMM needs and the host lacks.
type CapabilityError struct {
	Name string
}

func (e *CapabilityError) Error() string {
	return fmt.Sprintf("KVM lacks capability %s: upgrade the host kernel (Linux 5.4 or newer has everything gosandbox needs)", e.Name)
}

// Is makes errors.Is(err, ErrMissingCapability) true.
func (e *CapabilityError) Is(target error) bool { return target == ErrMissingCapability }

// ConfigError reports an invalid Config field.
type ConfigError struct {
	Field string
	Why   string
}

func (e *ConfigError) Error() string { return "vmm: config " + e.Field + ": " + e.Why }

// Is makes errors.Is(err, ErrConfig) true.
func (e *ConfigError) Is(target error) bool { return target == ErrConfig }

// KVMError is a failed KVM ioctl, with what the VMM was doing.
type KVMError struct {
	Op  string // e.g. "KVM_CREATE_VCPU"
	Err error  // the errno
}

func (e *KVMError) Error() string { return "vmm: " + e.Op + ": " + e.Err.Error() }

// Unwrap returns the errno.
func (e *KVMError) Unwrap() error { return e.Err }

func kvmErr(op string, err error) error {
	if err == nil {
		return nil
	}
	return &KVMError{Op: op, Err: err}
}
