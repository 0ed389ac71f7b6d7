package virtiotest

import (
	"errors"
	"fmt"
	"sync"

	"github.com/gosandbox/sandbox/virtio"
)

// Target is what a Host forwards guest accesses to (a *pci.Bus).
type Target interface {
	ReadPort(port uint16, data []byte)
	WritePort(port uint16, data []byte)
	ReadMMIO(addr uint64, data []byte)
	WriteMMIO(addr uint64, data []byte)
}

// Host is a pure-Go stand-in for the VMM: it implements virtio.Interrupts
// (counting MSI messages and tracking INTx levels) and virtio.Ioevents with
// real eventfds, and forwards accesses to a Target the way KVM would: a
// write to a registered ioevent address signals the eventfd instead of
// reaching the Target. Safe for concurrent use.
type Host struct {
	Target Target

	mu       sync.Mutex
	msiCount map[uint32]int // by MSI data
	live     map[*msi]bool
	lines    map[uint8]bool
	ioevents map[uint64]*Ioevent
	kick     chan struct{}
}

var (
	_ virtio.Interrupts = (*Host)(nil)
	_ virtio.Ioevents   = (*Host)(nil)
)

// NewHost returns a Host with no Target yet (set Target before accesses).
func NewHost() *Host {
	return &Host{
		msiCount: make(map[uint32]int),
		live:     make(map[*msi]bool),
		lines:    make(map[uint8]bool),
		ioevents: make(map[uint64]*Ioevent),
		kick:     make(chan struct{}, 1),
	}
}

type msi struct {
	h      *Host
	addr   uint64
	data   uint32
	closed bool
}

// ErrReleased is returned by Trigger on a released interrupt.
var ErrReleased = errors.New("virtiotest: interrupt released")

func (m *msi) Trigger() error {
	m.h.mu.Lock()
	defer m.h.mu.Unlock()
	if m.closed {
		return ErrReleased
	}
	m.h.msiCount[m.data]++
	m.h.signalLocked()
	return nil
}

func (m *msi) Close() error {
	m.h.mu.Lock()
	defer m.h.mu.Unlock()
	m.closed = true
	delete(m.h.live, m)
	return nil
}

// MSI implements virtio.Interrupts.
func (h *Host) MSI(addr uint64, data uint32) (virtio.Interrupt, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	m := &msi{h: h, addr: addr, data: data}
	h.live[m] = true
	return m, nil
}

type line struct {
	h *Host
	n uint8
}

func (l line) SetLevel(high bool) error {
	l.h.mu.Lock()
	defer l.h.mu.Unlock()
	l.h.lines[l.n] = high
	if high {
		l.h.signalLocked()
	}
	return nil
}

// IRQLine implements virtio.Interrupts.
func (h *Host) IRQLine(n uint8) (virtio.IRQLine, error) {
	return line{h, n}, nil
}

func (h *Host) signalLocked() {
	select {
	case h.kick <- struct{}{}:
	default:
	}
}

// Interrupted is signalled whenever an MSI fires or a line goes high.
func (h *Host) Interrupted() <-chan struct{} { return h.kick }

// MSICount returns how many times an MSI with data has fired.
func (h *Host) MSICount(data uint32) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.msiCount[data]
}

// LiveMSIs returns how many MSI triggers are allocated and not released.
func (h *Host) LiveMSIs() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.live)
}

// Line reports whether legacy line n is asserted.
func (h *Host) Line(n uint8) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.lines[n]
}

// Ioevent is a registered notify address backed by a real eventfd, as
// KVM_IOEVENTFD would be.
type Ioevent struct {
	h    *Host
	addr uint64
	size int
	ev   *virtio.Eventfd
	once sync.Once
}

// Ioevent implements virtio.Ioevents.
func (h *Host) Ioevent(addr uint64, size int) (virtio.Event, error) {
	ev, err := virtio.NewEventfd()
	if err != nil {
		return nil, err
	}
	e := &Ioevent{h: h, addr: addr, size: size, ev: ev}
	h.mu.Lock()
	defer h.mu.Unlock()
	if _, dup := h.ioevents[addr]; dup {
		ev.Close()
		return nil, fmt.Errorf("virtiotest: ioevent at %#x already registered", addr)
	}
	h.ioevents[addr] = e
	return e, nil
}

// Ioevents returns how many ioevents are registered.
func (h *Host) Ioevents() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.ioevents)
}

// Wait implements virtio.Event.
func (e *Ioevent) Wait() error { return e.ev.Wait() }

// Close implements virtio.Event.
func (e *Ioevent) Close() error {
	e.once.Do(func() {
		e.h.mu.Lock()
		if e.h.ioevents[e.addr] == e {
			delete(e.h.ioevents, e.addr)
		}
		e.h.mu.Unlock()
		e.ev.Close()
	})
	return nil
}

func (e *Ioevent) signal() { e.ev.Signal() }

// ReadPort forwards to the Target.
func (h *Host) ReadPort(port uint16, data []byte) {
	fillFF(data)
	h.Target.ReadPort(port, data)
}

// WritePort forwards to the Target.
func (h *Host) WritePort(port uint16, data []byte) { h.Target.WritePort(port, data) }

// ReadMMIO forwards to the Target.
func (h *Host) ReadMMIO(addr uint64, data []byte) {
	fillFF(data)
	h.Target.ReadMMIO(addr, data)
}

// WriteMMIO signals a registered ioevent or forwards to the Target.
func (h *Host) WriteMMIO(addr uint64, data []byte) {
	h.mu.Lock()
	e := h.ioevents[addr]
	h.mu.Unlock()
	if e != nil && (e.size == 0 || e.size == len(data)) {
		e.signal()
		return
	}
	h.Target.WriteMMIO(addr, data)
}

func fillFF(p []byte) {
	for i := range p {
		p[i] = 0xff
	}
}
