package linuxboot

import (
	"errors"
	"fmt"
)

var (
	// ErrFormat is matched (errors.Is) by every *FormatError: the kernel
	// file is malformed, truncated or not what it claims to be.
	ErrFormat = errors.New("malformed kernel image")
	// ErrUnsupported reports a well-formed kernel this loader cannot boot:
	// a boot protocol older than 2.12, no 64-bit entry point, an unknown
	// payload compression or xz filter.
	ErrUnsupported = errors.New("unsupported kernel image")
	// ErrTooLarge reports a payload or file beyond the size cap.
	ErrTooLarge = errors.New("kernel image exceeds the size limit")
	// ErrOutsideRAM reports a kernel segment that does not fit in guest RAM
	// or that would overlap the fixed low-memory structures.
	ErrOutsideRAM = errors.New("kernel does not fit in guest memory")
	// ErrCmdlineTooLong reports a command line longer than the kernel accepts.
	ErrCmdlineTooLong = errors.New("kernel command line too long")
	// ErrInitrdTooLarge reports an initramfs with no room below the kernel's
	// initrd_addr_max and above the kernel.
	ErrInitrdTooLarge = errors.New("initramfs does not fit in guest memory")
)

// FormatError describes a problem found in a kernel file. It matches
// ErrFormat, and also Err when Err is set (for example ErrUnsupported or
// ErrTooLarge).
type FormatError struct {
	Kind   string // "bzImage", "ELF", "payload"
	Off    int64  // offset in the file the problem was found at, -1 if none
	Reason string // what is wrong
	Err    error  // optional underlying cause
}

func (e *FormatError) Error() string {
	s := "linuxboot: " + e.Kind
	if e.Off >= 0 {
		s += fmt.Sprintf(" at offset %#x", e.Off)
	}
	s += ": " + e.Reason
	var inner *FormatError
	if e.Err != nil {
		s += ": " + e.Err.Error()
		if errors.As(e.Err, &inner) {
			return s // the inner error gave the advice
		}
	}
	switch e.Kind {
	case "bzImage", "ELF", "payload":
		s += " (use an uncompressed vmlinux or a bzImage built for x86-64)"
	}
	return s
}

// Is makes errors.Is(err, ErrFormat) true.
func (e *FormatError) Is(target error) bool { return target == ErrFormat }

// Unwrap returns the underlying cause.
func (e *FormatError) Unwrap() error { return e.Err }

func formatErr(kind string, off int64, err error, format string, args ...any) *FormatError {
	return &FormatError{Kind: kind, Off: off, Reason: fmt.Sprintf(format, args...), Err: err}
}

// CmdlineError reports a command line longer than the kernel accepts. It
// matches ErrCmdlineTooLong.
type CmdlineError struct {
	Len int // bytes given
	Max int // bytes the kernel accepts, without the terminating NUL
}

func (e *CmdlineError) Error() string {
	return fmt.Sprintf("linuxboot: kernel command line is %d bytes, the kernel accepts at most %d: shorten it", e.Len, e.Max)
}

// Is makes errors.Is(err, ErrCmdlineTooLong) true.
func (e *CmdlineError) Is(target error) bool { return target == ErrCmdlineTooLong }

// InitrdError reports an initramfs that fits nowhere allowed. It matches
// ErrInitrdTooLarge.
type InitrdError struct {
	Size        uint64 // initramfs bytes
	Top         uint64 // first address above the allowed range
	KernelStart uint64
	KernelEnd   uint64
}

func (e *InitrdError) Error() string {
	return fmt.Sprintf("linuxboot: initramfs of %d bytes does not fit below %#x clear of the kernel at [%#x, %#x): give the guest more memory or use a smaller initramfs",
		e.Size, e.Top, e.KernelStart, e.KernelEnd)
}

// Is makes errors.Is(err, ErrInitrdTooLarge) true.
func (e *InitrdError) Is(target error) bool { return target == ErrInitrdTooLarge }
