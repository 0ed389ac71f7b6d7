package virtio

// This file holds the interfaces the VMM implements for the devices: how a
// device raises interrupts and how guest queue notifications (kicks) reach
// the device without a round trip through the vCPU goroutine.
//
// Contract:
//
//   - The PCI transport calls Interrupts.MSI and Interrupts.IRQLine while it
//     handles a guest config-space or MSI-X table write, that is on a vCPU
//     goroutine inside WriteMMIO/WritePort, and at construction. The calls must
//     not block for long (an ioctl or two is fine).
//   - Interrupt.Trigger and IRQLine.SetLevel are called from device worker
//     goroutines (and from vCPU goroutines when the guest unmasks a vector
//     with a pending bit). They must not block and must be safe for
//     concurrent use. Under KVM, Trigger writes to an irqfd; SetLevel is
//     KVM_IRQ_LINE.
//   - Ioevents.Ioevent is called by the transport from a vCPU goroutine when
//     the guest enables a queue (or moves a BAR), and at no other time. The
//     transport runs one goroutine per Event that loops on Wait; Close on the
//     Event must make a blocked Wait return an error, and the transport joins
//     that goroutine before it returns from the call that closed the Event.

// Interrupt is one message-signalled interrupt a device raises toward the
// guest. Under KVM it is backed by an irqfd bound to a GSI whose route
// (KVM_SET_GSI_ROUTING) carries the MSI address and data.
type Interrupt interface {
	// Trigger raises the interrupt once. It must not block and is safe for
	// concurrent use.
	Trigger() error
	// Close releases the interrupt (irqfd deassigned, route freed). Trigger
	// after Close returns an error. Close is safe to call more than once.
	Close() error
}

// IRQLine is a level-triggered legacy interrupt line (PCI INTx routed to an
// IOAPIC pin). The transport asserts it while the device's ISR is non-zero
// and the guest has not disabled INTx, and deasserts it when the guest reads
// the ISR.
type IRQLine interface {
	// SetLevel drives the line high (asserted) or low. It must not block and
	// is safe for concurrent use.
	SetLevel(high bool) error
}

// Interrupts is implemented by the VMM: it hands out interrupt triggers.
type Interrupts interface {
	// MSI returns a trigger that delivers the MSI message (addr, data) to the
	// guest. The transport calls it when the guest programs and unmasks an
	// MSI-X vector, and closes the trigger when the guest masks or rewrites
	// the vector, disables MSI-X, or resets the device.
	MSI(addr uint64, data uint32) (Interrupt, error)
	// IRQLine returns legacy interrupt line n (an IOAPIC pin, e.g. 5, 9, 10,
	// 11). The bus asks for each line once and keeps it until Close.
	IRQLine(n uint8) (IRQLine, error)
}

// Event is a queue notification channel: guest writes to one MMIO address
// signal it without returning to Go on the vCPU goroutine. Under KVM it is an
// eventfd registered with KVM_IOEVENTFD (no datamatch).
type Event interface {
	// Wait blocks until the guest has written to the address at least once
	// since the previous Wait returned (several writes may coalesce into one
	// wake-up). After Close it returns a non-nil error, including when Close
	// happens while Wait is blocked.
	Wait() error
	// Close unregisters the address and releases the event. It is safe to
	// call more than once.
	Close() error
}

// Ioevents is implemented by the VMM to bind guest MMIO writes to events.
// A transport with a nil Ioevents handles notify writes itself in WriteMMIO
// (the fallback used by tests and by hosts without ioeventfd).
type Ioevents interface {
	// Ioevent registers a size-byte (1, 2, 4 or 8) write at guest-physical
	// addr. Writes there no longer reach WriteMMIO; they signal the returned
	// Event instead.
	Ioevent(addr uint64, size int) (Event, error)
}
