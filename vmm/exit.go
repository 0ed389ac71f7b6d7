package vmm

import (
	"errors"
	"fmt"
	"time"
)

// ExitReason says why a VM stopped.
type ExitReason int

// Exit reasons.
const (
	ExitPoweroff      ExitReason = iota + 1 // the guest powered off cleanly
	ExitReset                               // the guest rebooted (i8042 reset)
	ExitPanic                               // the guest kernel panicked
	ExitTripleFault                         // the guest triple-faulted
	ExitHalt                                // a vCPU halted with no irqchip to wake it
	ExitInternalError                       // KVM could not emulate or deliver something
	ExitFailEntry                           // KVM could not enter the guest
	ExitStopped                             // the host called Stop or Close
	ExitError                               // the VMM failed (an ioctl error, a malformed exit)
)

func (r ExitReason) String() string {
	switch r {
	case ExitPoweroff:
		return "poweroff"
	case ExitReset:
		return "reset"
	case ExitPanic:
		return "guest panic"
	case ExitTripleFault:
		return "triple fault"
	case ExitHalt:
		return "halt"
	case ExitInternalError:
		return "KVM internal error"
	case ExitFailEntry:
		return "KVM entry failure"
	case ExitStopped:
		return "stopped by host"
	case ExitError:
		return "VMM error"
	}
	return fmt.Sprintf("ExitReason(%d)", int(r))
}

// Errors matched by (*Exit).Err.
var (
	ErrGuestPanic    = errors.New("the guest kernel panicked")
	ErrGuestCrashed  = errors.New("the guest crashed")
	ErrKVMInternal   = errors.New("KVM internal error")
	ErrVMMFailure    = errors.New("VMM failure")
	ErrStoppedByHost = errors.New("stopped by the host")
)

// Exit describes how a VM ended.
type Exit struct {
	Reason      ExitReason
	VCPU        int      // the vCPU that saw it
	KVMReason   uint32   // raw KVM exit reason, when one caused it
	Suberror    uint32   // KVM internal-error suberror
	Data        []uint64 // raw KVM exit data
	Detail      string
	ConsoleTail string // the last bytes of the serial console
	Err         error  // underlying error for ExitError
	Time        time.Time
}

func (e *Exit) String() string {
	if e.Detail == "" {
		return e.Reason.String()
	}
	return e.Reason.String() + ": " + e.Detail
}

// Clean reports whether the guest ended on its own terms (poweroff or reboot).
func (e *Exit) Clean() bool { return e.Reason == ExitPoweroff || e.Reason == ExitReset }

// AsError returns nil for a clean exit and a *GuestError otherwise.
func (e *Exit) AsError() error {
	if e.Clean() {
		return nil
	}
	return &GuestError{Exit: e}
}

// GuestError is a VM that ended badly. It matches ErrGuestPanic,
// ErrGuestCrashed, ErrKVMInternal, ErrVMMFailure or ErrStoppedByHost.
type GuestError struct {
	Exit *Exit
}

func (g *GuestError) Error() string {
	s := "vmm: " + g.Exit.String()
	if g.Exit.Err != nil {
		s += ": " + g.Exit.Err.Error()
	}
	return s
}

// Unwrap returns the matching sentinel and the underlying error.
func (g *GuestError) Unwrap() []error {
	var s error
	switch g.Exit.Reason {
	case ExitPanic:
		s = ErrGuestPanic
	case ExitTripleFault, ExitHalt:
		s = ErrGuestCrashed
	case ExitInternalError, ExitFailEntry:
		s = ErrKVMInternal
	case ExitStopped:
		s = ErrStoppedByHost
	default:
		s = ErrVMMFailure
	}
	if g.Exit.Err != nil {
		return []error{s, g.Exit.Err}
	}
	return []error{s}
}
