package vmm

import (
	"errors"
	"fmt"
	"os"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/gosandbox/sandbox/virtio"
	"github.com/gosandbox/sandbox/virtio/pci"
)

// The VM implements virtio.Interrupts and virtio.Ioevents, so devices raise
// interrupts through irqfds and receive queue kicks through ioeventfds: KVM
// handles both without a trip through a vCPU thread.
var (
	_ virtio.Interrupts = (*VM)(nil)
	_ virtio.Ioevents   = (*VM)(nil)
)

// errIRQClosed is returned by Trigger after Close.
var errIRQClosed = errors.New("vmm: interrupt closed")

// msiIRQ is an MSI delivered through an irqfd bound to a GSI route.
type msiIRQ struct {
	vm  *VM
	gsi uint32

	mu sync.RWMutex // Trigger holds it shared, Close exclusively
	fd int         // eventfd; -1 once closed
}

// MSI implements virtio.Interrupts: it routes a new GSI to the MSI message
// and binds an eventfd to it.
func (vm *VM) MSI(addr uint64, data uint32) (virtio.Interrupt, error) {
	fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		return nil, fmt.Errorf("vmm: eventfd: %w", err)
	}
	gsi, err := vm.AllocMSIRoute(addr, data)
	if err != nil {
		unix.Close(fd)
		return nil, err
	}
	if err := vm.AddIRQFD(fd, gsi); err != nil {
		vm.FreeMSIRoute(gsi)
		unix.Close(fd)
		return nil, err
	}
	return &msiIRQ{vm: vm, gsi: gsi, fd: fd}, nil
}

var one = [8]byte{1}

// Trigger implements virtio.Interrupt.
func (m *msiIRQ) Trigger() error {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if m.fd < 0 {
		return errIRQClosed
	}
	_, err := unix.Write(m.fd, one[:])
	if err == unix.EAGAIN {
		return nil // the counter is saturated: an interrupt is pending anyway
	}
	return err
}

// Close implements virtio.Interrupt.
func (m *msiIRQ) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.fd < 0 {
		return nil
	}
	err := errors.Join(m.vm.RemoveIRQFD(m.fd, m.gsi), m.vm.FreeMSIRoute(m.gsi), unix.Close(m.fd))
	m.fd = -1
	return err
}

// irqLine is a level-triggered IOAPIC input.
type irqLine struct {
	vm *VM
	n  uint32
}

// IRQLine implements virtio.Interrupts.
func (vm *VM) IRQLine(n uint8) (virtio.IRQLine, error) {
	if n >= 24 {
		return nil, fmt.Errorf("vmm: IRQ line %d: the IOAPIC has 24 pins", n)
	}
	return irqLine{vm: vm, n: uint32(n)}, nil
}

// SetLevel implements virtio.IRQLine.
func (l irqLine) SetLevel(high bool) error { return l.vm.SetIRQLevel(l.n, high) }

// ioevent is a guest MMIO write address bound to an eventfd.
type ioevent struct {
	vm   *VM
	desc Ioevent
	f    *os.File // non-blocking eventfd, read through the Go poller
	once sync.Once
	err  error
}

// Ioevent implements virtio.Ioevents.
func (vm *VM) Ioevent(addr uint64, size int) (virtio.Event, error) {
	switch size {
	case 1, 2, 4, 8:
	default:
		return nil, fmt.Errorf("vmm: ioevent size %d: want 1, 2, 4 or 8", size)
	}
	fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		return nil, fmt.Errorf("vmm: eventfd: %w", err)
	}
	d := Ioevent{Addr: addr, Len: uint32(size)}
	if err := vm.AddIoevent(d, fd); err != nil {
		unix.Close(fd)
		return nil, err
	}
	return &ioevent{vm: vm, desc: d, f: os.NewFile(uintptr(fd), "ioeventfd")}, nil
}

// Wait implements virtio.Event.
func (e *ioevent) Wait() error {
	var b [8]byte
	_, err := e.f.Read(b[:])
	return err
}

// Close implements virtio.Event.
func (e *ioevent) Close() error {
	e.once.Do(func() {
		e.err = errors.Join(e.vm.RemoveIoevent(e.desc, int(e.f.Fd())), e.f.Close())
	})
	return e.err
}

// AttachPCI routes the port and MMIO ranges a PCI bus asks for to it.
func (vm *VM) AttachPCI(b *pci.Bus) error {
	for _, r := range b.Ranges() {
		var err error
		switch r.Space {
		case pci.SpacePort:
			if r.Base+r.Size > 1<<16 {
				return fmt.Errorf("vmm: PCI port range %#x+%#x is out of range", r.Base, r.Size)
			}
			err = vm.bus.AddPort(uint16(r.Base), uint16(r.Size), b)
		default:
			err = vm.bus.AddMMIO(r.Base, r.Size, b)
		}
		if err != nil {
			return err
		}
	}
	return nil
}
