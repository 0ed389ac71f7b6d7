package vmm

import (
	"errors"
	"fmt"
	"sync"

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

// msiIRQ is an MSI delivered through an irqfd bound to a GSI route.
type msiIRQ struct {
	vm  *VM
	gsi uint32
	ev  *virtio.Eventfd

	once sync.Once
	err  error
}

// MSI implements virtio.Interrupts: it routes a new GSI to the MSI message
// and binds an eventfd to it.
func (vm *VM) MSI(addr uint64, data uint32) (virtio.Interrupt, error) {
	ev, err := virtio.NewEventfd()
	if err != nil {
		return nil, err
	}
	gsi, err := vm.AllocMSIRoute(addr, data)
	if err != nil {
		ev.Close()
		return nil, err
	}
	if err := vm.AddIRQFD(ev.Fd(), gsi); err != nil {
		vm.FreeMSIRoute(gsi)
		ev.Close()
		return nil, err
	}
	return &msiIRQ{vm: vm, gsi: gsi, ev: ev}, nil
}

// Trigger implements virtio.Interrupt.
func (m *msiIRQ) Trigger() error { return m.ev.Signal() }

// Close implements virtio.Interrupt.
func (m *msiIRQ) Close() error {
	m.once.Do(func() {
		m.err = errors.Join(m.vm.RemoveIRQFD(m.ev.Fd(), m.gsi), m.vm.FreeMSIRoute(m.gsi), m.ev.Close())
	})
	return m.err
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
	*virtio.Eventfd
	vm   *VM
	desc Ioevent
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
	ev, err := virtio.NewEventfd()
	if err != nil {
		return nil, err
	}
	d := Ioevent{Addr: addr, Len: uint32(size)}
	if err := vm.AddIoevent(d, ev.Fd()); err != nil {
		ev.Close()
		return nil, err
	}
	return &ioevent{Eventfd: ev, vm: vm, desc: d}, nil
}

// Close implements virtio.Event: it unregisters the address, then closes
// the eventfd (waking a blocked Wait).
func (e *ioevent) Close() error {
	e.once.Do(func() {
		e.err = errors.Join(e.vm.RemoveIoevent(e.desc, e.Fd()), e.Eventfd.Close())
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
