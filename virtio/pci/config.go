package pci

import "encoding/binary"

// Standard config-space offsets (type 0 header).
const (
	regVendor      = 0x00
	regDevice      = 0x02
	regCommand     = 0x04
	regStatus      = 0x06
	regRevision    = 0x08
	regClass       = 0x09 // prog-if, subclass, class: 3 bytes
	regHeaderType  = 0x0E
	regBAR0        = 0x10
	regSubVendor   = 0x2C
	regSubsystem   = 0x2E
	regCapPtr      = 0x34
	regIntLine     = 0x3C
	regIntPin      = 0x3D
	configSpaceLen = 4096
	firstCap       = 0x40

	cmdMemory      = 1 << 1
	cmdBusMaster   = 1 << 2
	cmdINTxDisable = 1 << 10
	statusCapList  = 1 << 4

	barMem64 = 0x4 // memory BAR, 64-bit, not prefetchable
)

// configSpace is a function's 4 KiB configuration space with a per-byte
// write mask: a guest write changes only the bits the mask allows, so BAR
// sizing, read-only IDs and reserved registers fall out of the mask.
type configSpace struct {
	b    [configSpaceLen]byte
	mask [configSpaceLen]byte
	next int // where the next capability goes
	last int // offset of the last capability's next pointer, 0 if none
}

func (c *configSpace) put8(off int, v uint8)   { c.b[off] = v }
func (c *configSpace) put16(off int, v uint16) { binary.LittleEndian.PutUint16(c.b[off:], v) }
func (c *configSpace) put32(off int, v uint32) { binary.LittleEndian.PutUint32(c.b[off:], v) }
func (c *configSpace) get16(off int) uint16    { return binary.LittleEndian.Uint16(c.b[off:]) }
func (c *configSpace) get32(off int) uint32    { return binary.LittleEndian.Uint32(c.b[off:]) }

func (c *configSpace) writable(off, n int, mask uint32) {
	for i := range n {
		c.mask[off+i] = byte(mask >> (8 * i))
	}
}

// header fills a type 0 header.
func (c *configSpace) header(vendor, device uint16, rev uint8, class uint32, subVendor, subsystem uint16) {
	c.put16(regVendor, vendor)
	c.put16(regDevice, device)
	c.put8(regRevision, rev)
	c.b[regClass] = byte(class)
	c.b[regClass+1] = byte(class >> 8)
	c.b[regClass+2] = byte(class >> 16)
	c.put16(regSubVendor, subVendor)
	c.put16(regSubsystem, subsystem)
	c.writable(regCommand, 2, cmdMemory|cmdBusMaster|cmdINTxDisable)
	c.next = firstCap
}

// bar64 declares a 64-bit memory BAR at index i (i and i+1) of size bytes
// (a power of two, at least 16) at addr.
func (c *configSpace) bar64(i int, size, addr uint64) {
	off := regBAR0 + 4*i
	c.put32(off, uint32(addr)|barMem64)
	c.put32(off+4, uint32(addr>>32))
	c.writable(off, 4, ^uint32(size-1)&^0xF)
	c.writable(off+4, 4, ^uint32(0))
}

// barAddr returns the address a 64-bit memory BAR decodes.
func (c *configSpace) barAddr(i int) uint64 {
	off := regBAR0 + 4*i
	return uint64(c.get32(off)&^0xF) | uint64(c.get32(off+4))<<32
}

// intx sets the interrupt pin (1 = INTA) and line.
func (c *configSpace) intx(pin, line uint8) {
	c.put8(regIntPin, pin)
	c.put8(regIntLine, line)
	c.writable(regIntLine, 1, 0xff)
}

// addCap appends a capability with id and body (the bytes after id and
// next) and returns its offset.
func (c *configSpace) addCap(id uint8, body []byte) int {
	off := c.next
	c.b[off] = id
	copy(c.b[off+2:], body)
	if c.last == 0 {
		c.put8(regCapPtr, uint8(off))
		c.put16(regStatus, c.get16(regStatus)|statusCapList)
	} else {
		c.b[c.last] = uint8(off)
	}
	c.last = off + 1
	c.next = (off + 2 + len(body) + 3) &^ 3
	return off
}

func (c *configSpace) read(off int, p []byte) {
	for i := range p {
		if off+i < configSpaceLen {
			p[i] = c.b[off+i]
		} else {
			p[i] = 0xff
		}
	}
}

// write applies p at off through the write mask and reports whether any
// byte changed.
func (c *configSpace) write(off int, p []byte) bool {
	changed := false
	for i, v := range p {
		o := off + i
		if o >= configSpaceLen {
			break
		}
		m := c.mask[o]
		nv := c.b[o]&^m | v&m
		if nv != c.b[o] {
			changed = true
			c.b[o] = nv
		}
	}
	return changed
}

// overlaps reports whether [off, off+n) meets [start, start+size).
func overlaps(off, n, start, size int) bool {
	return off < start+size && start < off+n
}
