// Package virtiotest is a driver-side test double for gosandbox's virtio
// devices: it lays out split virtqueues in a guestmem.Memory the way a guest
// driver would, adds buffers, kicks, and reads used entries, so any device
// can be tested without a VM. It also provides pure-Go implementations of
// virtio.Interrupts and virtio.Ioevents (Host), a PCI-level driver that
// enumerates and programs a virtio-pci function through config ports and
// MMIO like Linux does (PCIDriver), a ready-wired virtio-pci bus with such
// a driver and leak checks at cleanup (PCIRig), and a conformance suite
// (TestDevice) that throws hostile rings at a device.
package virtiotest

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sync/atomic"

	"github.com/gosandbox/sandbox/virtio"
	"github.com/gosandbox/sandbox/vmm/guestmem"
)

// Buffer describes one descriptor the caller placed in guest memory.
type Buffer struct {
	Addr  uint64
	Len   uint32
	Write bool // device-writable
}

// Used is one entry the device returned.
type Used struct {
	Head uint16
	Len  uint32 // bytes the device says it wrote
	// Written holds a copy of the chain's device-writable buffers, cut to
	// Len bytes in total (only for chains added with Add).
	Written []byte
}

// ErrNoSpace is returned when a queue has no free descriptors or data space.
var ErrNoSpace = errors.New("virtiotest: queue is full")

// DriverQueue is the driver side of one split virtqueue in guest memory.
// It is not safe for concurrent use.
type DriverQueue struct {
	fence              atomic.Int32 // a locked instruction is a full memory barrier on x86
	Mem                *guestmem.Memory
	Size               uint16
	Desc, Avail, Used  uint64 // ring addresses
	DataBase           uint64 // data area for Add
	DataSize           uint64
	EventIdx           bool
	availIdx, lastUsed uint16
	free               []uint16
	chains             map[uint16]chainInfo
	kickedAt           uint16
}

type chainInfo struct {
	descs    []uint16
	writable []Buffer
	slot     int
}

// RingBytes returns the guest memory a queue of size n needs for its rings
// (descriptor table, avail ring, used ring, each aligned).
func RingBytes(n uint16) uint64 {
	d := 16 * uint64(n)
	a := (6 + 2*uint64(n) + 3) &^ 3
	u := (6 + 8*uint64(n) + 3) &^ 3
	return d + a + u
}

// NewDriverQueue lays out a queue of size n at base (16-byte aligned) with
// its rings followed by nothing; Add allocates data from [data,
// data+dataSize), split into n equal slots, one per chain in flight.
func NewDriverQueue(mem *guestmem.Memory, n uint16, base, data, dataSize uint64) *DriverQueue {
	q := &DriverQueue{
		Mem:      mem,
		Size:     n,
		Desc:     base,
		Avail:    base + 16*uint64(n),
		DataBase: data,
		DataSize: dataSize,
		chains:   make(map[uint16]chainInfo),
	}
	q.Used = (q.Avail + 6 + 2*uint64(n) + 3) &^ 3
	zero := make([]byte, RingBytes(n))
	mem.WriteAt(zero, base)
	for i := int(n) - 1; i >= 0; i-- {
		q.free = append(q.free, uint16(i))
	}
	return q
}

// Config returns the virtio.QueueConfig matching this layout.
func (q *DriverQueue) Config(index int) virtio.QueueConfig {
	return virtio.QueueConfig{
		Index: index, Size: q.Size, DescAddr: q.Desc, AvailAddr: q.Avail,
		UsedAddr: q.Used, EventIdx: q.EventIdx, Indirect: true,
	}
}

// FreeDescriptors returns how many descriptors are free.
func (q *DriverQueue) FreeDescriptors() int { return len(q.free) }

// InFlight returns how many chains the device has not returned yet.
func (q *DriverQueue) InFlight() int { return len(q.chains) }

// WriteDesc writes descriptor i raw, for hostile tests.
func (q *DriverQueue) WriteDesc(i uint16, addr uint64, length uint32, flags, next uint16) {
	WriteDescAt(q.Mem, q.Desc+16*uint64(i), addr, length, flags, next)
}

// WriteDescAt writes one descriptor at gpa (a descriptor table or an
// indirect table entry).
func WriteDescAt(mem *guestmem.Memory, gpa, addr uint64, length uint32, flags, next uint16) {
	var d [16]byte
	binary.LittleEndian.PutUint64(d[0:], addr)
	binary.LittleEndian.PutUint32(d[8:], length)
	binary.LittleEndian.PutUint16(d[12:], flags)
	binary.LittleEndian.PutUint16(d[14:], next)
	mem.WriteAt(d[:], gpa)
}

// PublishRaw puts head in the next avail slot and bumps the avail index by
// step (1 normally; more to fake a runaway index), for hostile tests.
func (q *DriverQueue) PublishRaw(head uint16, step uint16) {
	q.Mem.PutUint16(q.Avail+4+2*uint64(q.availIdx%q.Size), head)
	q.availIdx += step
	q.Mem.PutUint16(q.Avail+2, q.availIdx)
}

// AddBuffers publishes a chain over buffers the caller placed in memory.
func (q *DriverQueue) AddBuffers(bufs []Buffer) (uint16, error) {
	return q.add(bufs, -1)
}

func (q *DriverQueue) add(bufs []Buffer, slot int) (uint16, error) {
	if len(bufs) == 0 || len(bufs) > len(q.free) {
		return 0, ErrNoSpace
	}
	ids := make([]uint16, len(bufs))
	for i := range bufs {
		ids[i] = q.free[len(q.free)-1]
		q.free = q.free[:len(q.free)-1]
	}
	var writable []Buffer
	for i, b := range bufs {
		var flags, next uint16
		if i+1 < len(bufs) {
			flags |= virtio.DescFNext
			next = ids[i+1]
		}
		if b.Write {
			flags |= virtio.DescFWrite
			writable = append(writable, b)
		}
		q.WriteDesc(ids[i], b.Addr, b.Len, flags, next)
	}
	q.chains[ids[0]] = chainInfo{descs: ids, writable: writable, slot: slot}
	q.PublishRaw(ids[0], 1)
	return ids[0], nil
}

func (q *DriverQueue) slotSize() uint64 { return q.DataSize / uint64(q.Size) }

// Add copies each of out into guest memory as a device-readable buffer,
// reserves device-writable buffers of the lengths in in, and publishes the
// chain. The data lives in the slot of the chain's head descriptor.
func (q *DriverQueue) Add(out [][]byte, in ...int) (uint16, error) {
	if len(out)+len(in) == 0 || len(out)+len(in) > len(q.free) {
		return 0, ErrNoSpace
	}
	head := q.free[len(q.free)-1]
	base := q.DataBase + uint64(head)*q.slotSize()
	off := uint64(0)
	var bufs []Buffer
	for _, b := range out {
		if off+uint64(len(b)) > q.slotSize() {
			return 0, fmt.Errorf("%w: %d bytes do not fit a %d-byte slot", ErrNoSpace, off+uint64(len(b)), q.slotSize())
		}
		q.Mem.WriteAt(b, base+off)
		bufs = append(bufs, Buffer{Addr: base + off, Len: uint32(len(b))})
		off += uint64(len(b))
	}
	for _, n := range in {
		if off+uint64(n) > q.slotSize() {
			return 0, fmt.Errorf("%w: %d bytes do not fit a %d-byte slot", ErrNoSpace, off+uint64(n), q.slotSize())
		}
		q.Mem.WriteAt(make([]byte, n), base+off)
		bufs = append(bufs, Buffer{Addr: base + off, Len: uint32(n), Write: true})
		off += uint64(n)
	}
	return q.add(bufs, int(head))
}

// NeedKick reports whether the driver must notify the device about the
// chains published since the previous NeedKick (honouring avail_event
// under VIRTIO_F_EVENT_IDX).
func (q *DriverQueue) NeedKick() bool {
	newIdx, old := q.availIdx, q.kickedAt
	q.kickedAt = newIdx
	if newIdx == old {
		return false
	}
	if !q.EventIdx {
		flags, _ := q.Mem.Uint16(q.Used)
		return flags&1 == 0
	}
	ev, _ := q.Mem.Uint16(q.Used + 4 + 8*uint64(q.Size))
	return newIdx-ev-1 < newIdx-old
}

// UsedIdx returns the device's used index.
func (q *DriverQueue) UsedIdx() uint16 {
	v, _ := q.Mem.Uint16(q.Used + 2)
	return v
}

// PopUsed returns the next used entry, if any, and frees its descriptors.
func (q *DriverQueue) PopUsed() (Used, bool, error) {
	if q.UsedIdx() == q.lastUsed {
		return Used{}, false, nil
	}
	e := q.Used + 4 + 8*uint64(q.lastUsed%q.Size)
	id, _ := q.Mem.Uint32(e)
	n, _ := q.Mem.Uint32(e + 4)
	q.lastUsed++
	if q.EventIdx {
		q.Mem.PutUint16(q.Avail+4+2*uint64(q.Size), q.lastUsed)
		// A full barrier, as Linux's virtio_mb: the used_event store
		// must be visible before the driver reads the used index again
		// (x86 reorders a store with a later load), or an interrupt the
		// device decided against is waited for forever.
		q.fence.Add(0)
	}
	ci, ok := q.chains[uint16(id)]
	if id >= uint32(q.Size) || !ok {
		return Used{}, false, fmt.Errorf("virtiotest: device returned unknown head %d", id)
	}
	delete(q.chains, uint16(id))
	for i := len(ci.descs) - 1; i >= 0; i-- {
		q.free = append(q.free, ci.descs[i])
	}
	u := Used{Head: uint16(id), Len: n}
	left := int(n)
	for _, b := range ci.writable {
		if left <= 0 {
			break
		}
		k := min(left, int(b.Len))
		buf := make([]byte, k)
		q.Mem.ReadAt(buf, b.Addr)
		u.Written = append(u.Written, buf...)
		left -= k
	}
	return u, true, nil
}
