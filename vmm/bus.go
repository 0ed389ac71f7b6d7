package vmm

import (
	"fmt"
	"sort"
	"sync"
)

// PortDevice handles guest port I/O. The VMM calls it from vCPU goroutines,
// possibly several at once, with data of the access width (1, 2 or 4
// bytes, little-endian). ReadPort fills data; bytes it leaves alone read as
// 0xff. Handlers must not block for long: the vCPU waits for them.
type PortDevice interface {
	ReadPort(port uint16, data []byte)
	WritePort(port uint16, data []byte)
}

// MMIODevice handles guest MMIO accesses; addr is the absolute guest-physical
// address. The same rules as for PortDevice apply.
type MMIODevice interface {
	ReadMMIO(addr uint64, data []byte)
	WriteMMIO(addr uint64, data []byte)
}

type portRange struct {
	base, size uint16
	dev        PortDevice
}

type mmioRange struct {
	base, size uint64
	dev        MMIODevice
}

// Bus dispatches port I/O and MMIO exits to devices. Ranges may not overlap.
type Bus struct {
	mu    sync.RWMutex
	ports []portRange // sorted by base
	mmio  []mmioRange // sorted by base

	// Unhandled counts accesses no device claimed (port, then MMIO).
	unhandledPort, unhandledMMIO uint64
}

// AddPort claims ports [base, base+size) for dev.
func (b *Bus) AddPort(base, size uint16, dev PortDevice) error {
	if size == 0 || uint32(base)+uint32(size) > 1<<16 {
		return fmt.Errorf("vmm: port range %#x+%d is invalid", base, size)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, r := range b.ports {
		if base < r.base+r.size && r.base < base+size {
			return fmt.Errorf("vmm: port range %#x+%d overlaps %#x+%d", base, size, r.base, r.size)
		}
	}
	b.ports = append(b.ports, portRange{base, size, dev})
	sort.Slice(b.ports, func(i, j int) bool { return b.ports[i].base < b.ports[j].base })
	return nil
}

// AddMMIO claims guest-physical [base, base+size) for dev.
func (b *Bus) AddMMIO(base, size uint64, dev MMIODevice) error {
	if size == 0 || base+size < base {
		return fmt.Errorf("vmm: MMIO range %#x+%#x is invalid", base, size)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, r := range b.mmio {
		if base < r.base+r.size && r.base < base+size {
			return fmt.Errorf("vmm: MMIO range %#x+%#x overlaps %#x+%#x", base, size, r.base, r.size)
		}
	}
	b.mmio = append(b.mmio, mmioRange{base, size, dev})
	sort.Slice(b.mmio, func(i, j int) bool { return b.mmio[i].base < b.mmio[j].base })
	return nil
}

// RemoveMMIO releases the range that starts at base.
func (b *Bus) RemoveMMIO(base uint64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for i, r := range b.mmio {
		if r.base == base {
			b.mmio = append(b.mmio[:i], b.mmio[i+1:]...)
			return
		}
	}
}

func (b *Bus) findPort(port uint16) PortDevice {
	b.mu.RLock()
	defer b.mu.RUnlock()
	i := sort.Search(len(b.ports), func(i int) bool { return b.ports[i].base+b.ports[i].size > port })
	if i < len(b.ports) && b.ports[i].base <= port {
		return b.ports[i].dev
	}
	return nil
}

func (b *Bus) findMMIO(addr uint64) MMIODevice {
	b.mu.RLock()
	defer b.mu.RUnlock()
	i := sort.Search(len(b.mmio), func(i int) bool { return b.mmio[i].base+b.mmio[i].size > addr })
	if i < len(b.mmio) && b.mmio[i].base <= addr {
		return b.mmio[i].dev
	}
	return nil
}

// Port performs a port access as the guest would.
func (b *Bus) Port(port uint16, data []byte, write bool) {
	d := b.findPort(port)
	if d == nil {
		b.unhandled(&b.unhandledPort, data, write)
		return
	}
	access(data, write, func() { d.ReadPort(port, data) }, func() { d.WritePort(port, data) })
}

// MMIO performs an MMIO access as the guest would.
func (b *Bus) MMIO(addr uint64, data []byte, write bool) {
	d := b.findMMIO(addr)
	if d == nil {
		b.unhandled(&b.unhandledMMIO, data, write)
		return
	}
	access(data, write, func() { d.ReadMMIO(addr, data) }, func() { d.WriteMMIO(addr, data) })
}

// access runs a device's read or write handler; reads start as all ones,
// so bytes a device leaves alone read as 0xff.
func access(data []byte, write bool, read, wr func()) {
	if write {
		wr()
		return
	}
	for i := range data {
		data[i] = 0xff
	}
	read()
}

// unhandled counts an access no device claimed; a read of it sees 0xff.
func (b *Bus) unhandled(counter *uint64, data []byte, write bool) {
	if !write {
		for i := range data {
			data[i] = 0xff
		}
	}
	b.mu.Lock()
	*counter++
	b.mu.Unlock()
}
