package pci

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"sync/atomic"

	"github.com/gosandbox/sandbox/virtio"
	"github.com/gosandbox/sandbox/vmm/guestmem"
)

// Space says which address space a Range is in.
type Space int

// Address spaces.
const (
	SpacePort Space = iota // x86 I/O ports
	SpaceMMIO              // guest-physical memory
)

// Range is a span of guest address space the bus wants to receive.
type Range struct {
	Space Space
	Base  uint64
	Size  uint64
}

// DefaultIRQLines are the legacy interrupt lines the bus hands out
// round-robin for INTx when Config.IRQLines is empty.
var defaultIRQLines = []uint8{5, 9, 10, 11}

// Config configures a Bus.
type Config struct {
	// Mem is guest memory; required. It must outlive the Bus.
	Mem *guestmem.Memory
	// Interrupts delivers MSI-X messages and legacy INTx; required.
	Interrupts virtio.Interrupts
	// Ioevents, when non-nil, binds queue notify addresses to events so a
	// kick never reaches WriteMMIO. When nil, WriteMMIO handles kicks.
	Ioevents virtio.Ioevents
	// IRQLines are the legacy interrupt lines (IOAPIC pins) for INTx,
	// assigned to devices round-robin. Empty means 5, 9, 10, 11.
	IRQLines []uint8
	// Logger receives debug records (guest errors, BAR moves). nil discards.
	Logger *slog.Logger
}

// ErrBusFull is returned by AddVirtio when all slots are taken.
var ErrBusFull = errors.New("pci: all 31 device slots are taken; use fewer devices")

// ErrConfig is matched by errors from New for an invalid Config.
var ErrConfig = errors.New("pci: invalid configuration")

// function is one PCI function on bus 0.
type function interface {
	readConfig(off int, p []byte)
	writeConfig(off int, p []byte)
	// decodedBARs returns the BARs the function currently decodes (memory
	// decoding enabled).
	decodedBARs() []barRange
	accessBAR(bar int, off uint64, p []byte, write bool)
	close() error
}

type barRange struct {
	bar        int
	base, size uint64
}

type decodeEntry struct {
	barRange
	fn function
}

// Bus is the PCI host bridge and bus 0. Its methods are safe for concurrent
// use by several vCPU goroutines.
type Bus struct {
	mem   *guestmem.Memory
	irqs  virtio.Interrupts
	ioev  virtio.Ioevents
	log   *slog.Logger
	lines []uint8

	confAddr atomic.Uint32 // conf1 address register

	mu      sync.RWMutex
	slots   [MaxDevices + 1]function
	decode  []decodeEntry
	nextBAR uint64
	nextIRQ int
	closed  bool

	intxMu  sync.Mutex
	intx    map[uint8]virtio.IRQLine
	asserts map[uint8]map[int]bool // line -> slots asserting it
}

// New returns a bus holding only the host bridge.
func New(cfg Config) (*Bus, error) {
	if cfg.Mem == nil || cfg.Interrupts == nil {
		return nil, fmt.Errorf("%w: Mem and Interrupts are required", ErrConfig)
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	lines := append([]uint8(nil), cfg.IRQLines...)
	if len(lines) == 0 {
		lines = append(lines, defaultIRQLines...)
	}
	b := &Bus{
		mem:     cfg.Mem,
		irqs:    cfg.Interrupts,
		ioev:    cfg.Ioevents,
		log:     log,
		lines:   lines,
		nextBAR: BARWindowBase,
		intx:    make(map[uint8]virtio.IRQLine),
		asserts: make(map[uint8]map[int]bool),
	}
	for _, n := range lines {
		l, err := cfg.Interrupts.IRQLine(n)
		if err != nil {
			return nil, fmt.Errorf("pci: legacy interrupt line %d: %w", n, err)
		}
		b.intx[n] = l
		b.asserts[n] = make(map[int]bool)
	}
	b.slots[0] = newHostBridge()
	return b, nil
}

// Ranges returns the port and MMIO ranges the VMM must route to the bus.
func (b *Bus) Ranges() []Range {
	return []Range{
		{Space: SpacePort, Base: ConfigPortBase, Size: ConfigPortCount},
		{Space: SpaceMMIO, Base: ECAMBase, Size: ECAMSize},
		{Space: SpaceMMIO, Base: BARWindowBase, Size: BARWindowSize},
	}
}

// add places fn in the next free slot; alloc hands out BAR space.
func (b *Bus) add(mk func(slot int, line uint8, alloc func(size uint64) (uint64, error)) (function, error)) (function, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return nil, virtio.ErrClosed
	}
	slot := 0
	for i := 1; i < len(b.slots); i++ {
		if b.slots[i] == nil {
			slot = i
			break
		}
	}
	if slot == 0 {
		return nil, ErrBusFull
	}
	alloc := func(size uint64) (uint64, error) {
		base := (b.nextBAR + size - 1) &^ (size - 1)
		if base+size > BARWindowBase+BARWindowSize {
			return 0, fmt.Errorf("pci: BAR window %#x-%#x is full", BARWindowBase, BARWindowBase+BARWindowSize-1)
		}
		b.nextBAR = base + size
		return base, nil
	}
	line := b.lines[b.nextIRQ%len(b.lines)]
	fn, err := mk(slot, line, alloc)
	if err != nil {
		return nil, err
	}
	b.nextIRQ++
	b.slots[slot] = fn
	b.rebuildDecodeLocked()
	return fn, nil
}

func (b *Bus) rebuildDecodeLocked() {
	b.decode = b.decode[:0]
	for _, fn := range b.slots {
		if fn == nil {
			continue
		}
		for _, r := range fn.decodedBARs() {
			b.decode = append(b.decode, decodeEntry{r, fn})
		}
	}
}

// setINTx records whether slot asserts line and drives the line with the
// OR of all its devices.
func (b *Bus) setINTx(line uint8, slot int, high bool) {
	b.intxMu.Lock()
	defer b.intxMu.Unlock()
	set, ok := b.asserts[line]
	if !ok {
		return
	}
	before := len(set) > 0
	if high {
		set[slot] = true
	} else {
		delete(set, slot)
	}
	if after := len(set) > 0; after != before || high {
		if err := b.intx[line].SetLevel(after); err != nil {
			b.log.Debug("pci: INTx", "line", line, "err", err)
		}
	}
}

// Close closes every device on the bus and releases its interrupts and
// events. It is safe to call more than once.
func (b *Bus) Close() error {
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return nil
	}
	b.closed = true
	slots := b.slots
	b.slots = [MaxDevices + 1]function{}
	b.decode = nil
	b.mu.Unlock()
	var errs []error
	for _, fn := range slots {
		if fn != nil {
			errs = append(errs, fn.close())
		}
	}
	return errors.Join(errs...)
}

// ReadPort handles guest reads of ports 0xCF8-0xCFF.
func (b *Bus) ReadPort(port uint16, data []byte) {
	fill(data, 0xff)
	switch {
	case port == ConfigAddressPort && len(data) == 4:
		binary.LittleEndian.PutUint32(data, b.confAddr.Load())
	case port >= ConfigDataPort && port < ConfigDataPort+4:
		fn, reg, ok := b.conf1Target(int(port - ConfigDataPort))
		if ok && reg+len(data) <= 256 {
			fn.readConfig(reg, data)
		}
	}
}

// WritePort handles guest writes of ports 0xCF8-0xCFF.
func (b *Bus) WritePort(port uint16, data []byte) {
	switch {
	case port == ConfigAddressPort && len(data) == 4:
		b.confAddr.Store(binary.LittleEndian.Uint32(data))
	case port >= ConfigDataPort && port < ConfigDataPort+4:
		fn, reg, ok := b.conf1Target(int(port - ConfigDataPort))
		if ok && reg+len(data) <= 256 {
			b.writeConfig(fn, reg, data)
		}
	}
	// Byte accesses to 0xCF8-0xCFB (e.g. Linux's type-1 probe writing
	// 0xCFB, or the 0xCF9 reset register) are ignored.
}

func (b *Bus) conf1Target(byteOff int) (function, int, bool) {
	a := b.confAddr.Load()
	if a&(1<<31) == 0 {
		return nil, 0, false
	}
	bus, dev, fn := (a>>16)&0xff, (a>>11)&0x1f, (a>>8)&7
	reg := int(a&0xfc) + byteOff
	f := b.lookup(bus, dev, fn)
	return f, reg, f != nil
}

func (b *Bus) lookup(bus, dev, fn uint32) function {
	if bus != 0 || fn != 0 {
		return nil
	}
	b.mu.RLock()
	defer b.mu.RUnlock()
	return b.slots[dev]
}

func (b *Bus) writeConfig(fn function, reg int, data []byte) {
	fn.writeConfig(reg, data)
	// A write may have moved a BAR or toggled memory decoding.
	if overlaps(reg, len(data), regCommand, 2) || overlaps(reg, len(data), regBAR0, 24) {
		b.mu.Lock()
		b.rebuildDecodeLocked()
		b.mu.Unlock()
	}
}

// ReadMMIO handles guest reads in the ECAM window and BAR window.
func (b *Bus) ReadMMIO(addr uint64, data []byte) {
	b.mmio(addr, data, false)
}

// WriteMMIO handles guest writes in the ECAM window and BAR window.
func (b *Bus) WriteMMIO(addr uint64, data []byte) {
	b.mmio(addr, data, true)
}

func (b *Bus) mmio(addr uint64, data []byte, write bool) {
	if !write {
		fill(data, 0xff)
	}
	if len(data) == 0 || len(data) > 8 {
		return
	}
	if addr >= ECAMBase && addr-ECAMBase < ECAMSize {
		off := addr - ECAMBase
		bus, dev, fn := uint32(off>>20), uint32(off>>15)&0x1f, uint32(off>>12)&7
		reg := int(off & 0xfff)
		if reg+len(data) > configSpaceLen {
			return
		}
		f := b.lookup(bus, dev, fn)
		if f == nil {
			return
		}
		if write {
			b.writeConfig(f, reg, data)
		} else {
			f.readConfig(reg, data)
		}
		return
	}
	b.mu.RLock()
	var hit *decodeEntry
	for i := range b.decode {
		d := &b.decode[i]
		if addr >= d.base && addr-d.base < d.size && addr-d.base+uint64(len(data)) <= d.size {
			hit = d
			break
		}
	}
	var fn function
	var bar int
	var off uint64
	if hit != nil {
		fn, bar, off = hit.fn, hit.bar, addr-hit.base
	}
	b.mu.RUnlock()
	if fn != nil {
		fn.accessBAR(bar, off, data, write)
	}
}

func fill(p []byte, v byte) {
	for i := range p {
		p[i] = v
	}
}

// hostBridge is device 0: a host bridge with no BARs.
type hostBridge struct {
	mu sync.Mutex
	cs configSpace
}

func newHostBridge() *hostBridge {
	h := &hostBridge{}
	h.cs.header(VendorRedHat, DeviceHostBridge, 0, 0x060000, VendorRedHat, 0x1100)
	return h
}

func (h *hostBridge) readConfig(off int, p []byte) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.cs.read(off, p)
}

func (h *hostBridge) writeConfig(off int, p []byte) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.cs.write(off, p)
}

func (h *hostBridge) decodedBARs() []barRange             { return nil }
func (h *hostBridge) accessBAR(int, uint64, []byte, bool) {}
func (h *hostBridge) close() error                        { return nil }
