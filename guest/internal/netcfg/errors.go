package netcfg

import (
	"errors"
	"fmt"
	"net"
	"strings"
	"syscall"
	"time"
)

// ErrNoInterface is matched (errors.Is) by *NoInterfaceError.
var ErrNoInterface = errors.New("netcfg: no network interface with that MAC address")

// NoInterfaceError reports that no interface with the MAC appeared within
// the wait. The host's VMM gives the guest a virtio-net device with that
// MAC; if it is missing, the device was not added, the MAC sent in the
// config differs from the device's, or the kernel lacks virtio-net.
type NoInterfaceError struct {
	MAC    net.HardwareAddr
	Waited time.Duration
	Seen   []string // the interfaces there were, as "name=mac"
}

// Error names the MAC, the wait and the interfaces there were.
func (e *NoInterfaceError) Error() string {
	return fmt.Sprintf("netcfg: no network interface with MAC %s after %v (saw %s); check that the VMM adds a virtio-net device with that MAC and that the kernel has virtio-net",
		e.MAC, e.Waited, strings.Join(e.Seen, ", "))
}

// Is reports whether target is ErrNoInterface.
func (e *NoInterfaceError) Is(target error) bool { return target == ErrNoInterface }

// StepError reports a step of Apply that the kernel or the file system
// refused. It unwraps to the cause, often a syscall errno
// (errors.Is(err, unix.EPERM)).
type StepError struct {
	Step string // such as "set MTU 9000", "add address 10.0.0.2/24", "write /etc/hosts"
	Link string // the interface name, if the step was about one
	Err  error
}

// Error names the step, the interface and the cause.
func (e *StepError) Error() string {
	var b strings.Builder
	b.WriteString("netcfg: ")
	b.WriteString(e.Step)
	if e.Link != "" {
		b.WriteString(" on ")
		b.WriteString(e.Link)
	}
	b.WriteString(": ")
	b.WriteString(e.Err.Error())
	if errors.Is(e.Err, syscall.EPERM) {
		b.WriteString(" (configuring the network needs CAP_NET_ADMIN in the network namespace)")
	}
	return b.String()
}

// Unwrap returns the cause.
func (e *StepError) Unwrap() error { return e.Err }
