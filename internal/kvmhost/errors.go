package kvmhost

import (
	"errors"
	"fmt"
	"strings"
)

// Sentinel errors. Every error Run and Detect return wraps one of them, so
// callers can branch with errors.Is.
var (
	// ErrUnavailable means the outer VM cannot be had on this machine: not
	// linux/amd64, QEMU or busybox missing and not installable, the outer
	// kernel cannot be fetched. The message says what to install.
	ErrUnavailable = errors.New("kvmhost: emulated KVM host unavailable")
	// ErrInvalidConfig means Config failed validation.
	ErrInvalidConfig = errors.New("kvmhost: invalid config")
	// ErrTimeout means the outer VM did not finish before the context ended
	// or Config.Timeout passed; it was killed.
	ErrTimeout = errors.New("kvmhost: outer VM timed out")
	// ErrCrashed means QEMU exited (or the outer kernel panicked) before the
	// program's exit status was written.
	ErrCrashed = errors.New("kvmhost: outer VM ended without reporting an exit status")
	// ErrSetup means the outer VM booted but could not prepare the program's
	// environment (a module failed to load, a share failed to mount, the
	// working directory is missing inside).
	ErrSetup = errors.New("kvmhost: outer VM setup failed")
)

// errorTailLines is how much of the console VMError.Error shows; the
// ConsoleTail field keeps more.
const errorTailLines = 60

// VMError describes a failed outer VM run. It matches one of ErrTimeout,
// ErrCrashed or ErrSetup with errors.Is.
type VMError struct {
	// Kind is the sentinel this error matches.
	Kind error
	// Detail says what happened, in one line.
	Detail string
	// QEMUExit is how the QEMU process ended ("exit status 1", "signal:
	// killed", ...), empty if it was not observed.
	QEMUExit string
	// ConsoleTail is the last part of the outer VM's serial console (kernel
	// messages and the init's diagnostics); Error shows its last lines.
	ConsoleTail string
}

// Error implements error.
func (e *VMError) Error() string {
	var b strings.Builder
	b.WriteString(e.Kind.Error())
	if e.Detail != "" {
		b.WriteString(": ")
		b.WriteString(e.Detail)
	}
	if e.QEMUExit != "" {
		fmt.Fprintf(&b, " (qemu: %s)", e.QEMUExit)
	}
	if tail := strings.TrimSpace(e.ConsoleTail); tail != "" {
		if lines := strings.Split(tail, "\n"); len(lines) > errorTailLines {
			tail = strings.Join(lines[len(lines)-errorTailLines:], "\n")
		}
		b.WriteString("\n--- outer VM console (tail) ---\n")
		b.WriteString(tail)
		b.WriteString("\n--- end of console ---")
	}
	return b.String()
}

// Unwrap returns Kind.
func (e *VMError) Unwrap() error { return e.Kind }

// UnavailableError says why the outer VM cannot be had. It matches
// ErrUnavailable.
type UnavailableError struct {
	// Reason is what is missing, and what to do about it.
	Reason string
	// Err is the underlying cause, if any.
	Err error
}

// Error implements error.
func (e *UnavailableError) Error() string {
	if e.Err != nil {
		return fmt.Sprintf("%v: %s: %v", ErrUnavailable, e.Reason, e.Err)
	}
	return fmt.Sprintf("%v: %s", ErrUnavailable, e.Reason)
}

// Is reports whether target is ErrUnavailable.
func (e *UnavailableError) Is(target error) bool { return target == ErrUnavailable }

// Unwrap returns the underlying cause.
func (e *UnavailableError) Unwrap() error { return e.Err }

func invalidf(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrInvalidConfig}, args...)...)
}
