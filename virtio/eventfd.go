package virtio

import (
	"encoding/binary"
	"fmt"
	"os"
	"sync"

	"golang.org/x/sys/unix"
)

// Eventfd is a non-blocking Linux eventfd driven through the Go runtime's
// poller, so a goroutine blocked in Wait costs no thread and Close wakes it.
// It serves both directions of the VMM contract: as an Event (KVM writes on
// a guest kick via KVM_IOEVENTFD, the device side Waits) and as the trigger
// behind an Interrupt (the device side Signals, KVM reads via KVM_IRQFD).
type Eventfd struct {
	f    *os.File
	fd   int
	once sync.Once
	err  error
}

// NewEventfd creates an eventfd (EFD_NONBLOCK|EFD_CLOEXEC, counter 0).
func NewEventfd() (*Eventfd, error) {
	fd, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("virtio: eventfd: %w", err)
	}
	return &Eventfd{f: os.NewFile(uintptr(fd), "eventfd"), fd: fd}, nil
}

// Fd returns the descriptor to hand to KVM_IOEVENTFD or KVM_IRQFD. It stays
// valid until Close; the Eventfd keeps ownership.
func (e *Eventfd) Fd() int { return e.fd }

// Signal adds one to the counter, waking a Wait (or raising the irqfd's
// interrupt). It does not block.
func (e *Eventfd) Signal() error {
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], 1)
	_, err := e.f.Write(b[:])
	return err
}

// Wait blocks until the counter is non-zero, then resets it: several
// Signals before a Wait coalesce into one wake-up. After Close it returns
// an error (os.ErrClosed), also when Close races with a blocked Wait.
func (e *Eventfd) Wait() error {
	var b [8]byte
	_, err := e.f.Read(b[:])
	return err
}

// Close closes the eventfd. It is safe to call more than once.
func (e *Eventfd) Close() error {
	e.once.Do(func() { e.err = e.f.Close() })
	return e.err
}

var _ Event = (*Eventfd)(nil)
