package netstack

import (
	"errors"
	"fmt"
	"syscall"

	"gvisor.dev/gvisor/pkg/tcpip"
)

// Errors returned by this package. They are matched with errors.Is.
var (
	// ErrClosed is returned by methods called on a closed Network.
	ErrClosed = errors.New("netstack: network is closed")
	// ErrInvalidConfig is wrapped by every Config validation error.
	ErrInvalidConfig = errors.New("netstack: invalid configuration")
	// ErrInvalidRule is wrapped by every RuleError.
	ErrInvalidRule = errors.New("netstack: invalid network rule")
	// ErrPoolExhausted is returned when an address Pool has no free slot.
	ErrPoolExhausted = errors.New("netstack: address pool exhausted; release sandboxes or configure a larger pool")
	// ErrFrameInvalid is returned by DeliverFrame for frames that are too
	// short, too long or not addressed from the guest's MAC.
	ErrFrameInvalid = errors.New("netstack: invalid Ethernet frame")
	// ErrNoOutput is returned when the network has to send a frame to the
	// guest but no FrameWriter was set.
	ErrNoOutput = errors.New("netstack: no FrameWriter set; call SetOutput")
)

// TCPIPError is a gVisor tcpip.Error turned into a Go error. tcpip.Error does
// not implement error on purpose; this wrapper keeps the original value in Err
// so callers can type-switch on it (errors.As(err, &te); te.Err.(type)).
// Errors that have a POSIX equivalent also match it with errors.Is, for
// example errors.Is(err, syscall.ECONNREFUSED).
type TCPIPError struct {
	// Op is what this package was doing, e.g. "add address".
	Op string
	// Err is the original gVisor error.
	Err tcpip.Error
}

// Error implements error.
func (e *TCPIPError) Error() string {
	return fmt.Sprintf("netstack: %s: %s", e.Op, e.Err.String())
}

// Unwrap returns the POSIX errno that corresponds to Err, if there is one.
func (e *TCPIPError) Unwrap() error {
	if errno := errnoOf(e.Err); errno != 0 {
		return errno
	}
	return nil
}

func tcpipErr(op string, err tcpip.Error) error {
	if err == nil {
		return nil
	}
	return &TCPIPError{Op: op, Err: err}
}

func errnoOf(err tcpip.Error) syscall.Errno {
	switch err.(type) {
	case *tcpip.ErrConnectionRefused:
		return syscall.ECONNREFUSED
	case *tcpip.ErrConnectionReset:
		return syscall.ECONNRESET
	case *tcpip.ErrConnectionAborted:
		return syscall.ECONNABORTED
	case *tcpip.ErrTimeout:
		return syscall.ETIMEDOUT
	case *tcpip.ErrHostUnreachable:
		return syscall.EHOSTUNREACH
	case *tcpip.ErrNetworkUnreachable:
		return syscall.ENETUNREACH
	case *tcpip.ErrPortInUse:
		return syscall.EADDRINUSE
	case *tcpip.ErrBadLocalAddress:
		return syscall.EADDRNOTAVAIL
	case *tcpip.ErrInvalidEndpointState, *tcpip.ErrNotConnected:
		return syscall.ENOTCONN
	case *tcpip.ErrClosedForSend:
		return syscall.EPIPE
	case *tcpip.ErrWouldBlock:
		return syscall.EAGAIN
	case *tcpip.ErrNoBufferSpace:
		return syscall.ENOBUFS
	case *tcpip.ErrMessageTooLong:
		return syscall.EMSGSIZE
	case *tcpip.ErrNotPermitted:
		return syscall.EPERM
	case *tcpip.ErrDuplicateAddress:
		return syscall.EADDRINUSE
	}
	return 0
}

// RuleError reports a network rule that does not parse. It wraps
// ErrInvalidRule.
type RuleError struct {
	// Rule is the text that was parsed.
	Rule string
	// Reason says what is wrong and what is expected instead.
	Reason string
}

// Error implements error.
func (e *RuleError) Error() string {
	return fmt.Sprintf("netstack: invalid network rule %q: %s (syntax: allow|deny[:egress|ingress|any]@target[:tcp|udp|icmp|any[:port|lo-hi]])", e.Rule, e.Reason)
}

// Unwrap returns ErrInvalidRule.
func (e *RuleError) Unwrap() error { return ErrInvalidRule }

// ConfigError reports an invalid Config field. It wraps ErrInvalidConfig.
type ConfigError struct {
	// Field is the Config field, e.g. "MTU".
	Field string
	// Reason says what is wrong and what is accepted.
	Reason string
}

// Error implements error.
func (e *ConfigError) Error() string {
	return fmt.Sprintf("netstack: invalid Config.%s: %s", e.Field, e.Reason)
}

// Unwrap returns ErrInvalidConfig.
func (e *ConfigError) Unwrap() error { return ErrInvalidConfig }
