package virtio

import (
	"encoding/binary"
	"fmt"
	"sync/atomic"

	"github.com/gosandbox/sandbox/vmm/guestmem"
)

// MaxQueueSize is the largest split virtqueue size (VIRTIO 1.2 2.7).
const MaxQueueSize = 32768

// Descriptor flags (VIRTIO 1.2 2.7.5).
const (
	DescFNext     = 1 // VIRTQ_DESC_F_NEXT
	DescFWrite    = 2 // VIRTQ_DESC_F_WRITE
	DescFIndirect = 4 // VIRTQ_DESC_F_INDIRECT
)

// Ring flags.
const (
	availFNoInterrupt = 1 // VIRTQ_AVAIL_F_NO_INTERRUPT
)

const descSize = 16

// QueueConfig describes a split virtqueue as the driver laid it out.
type QueueConfig struct {
	Index     int    // queue index within the device, for errors
	Size      uint16 // number of entries, a power of two
	MaxSize   uint16 // device maximum; 0 means MaxQueueSize
	DescAddr  uint64 // descriptor table, 16-byte aligned
	AvailAddr uint64 // driver (avail) ring, 2-byte aligned
	UsedAddr  uint64 // device (used) ring, 4-byte aligned
	EventIdx  bool   // VIRTIO_F_EVENT_IDX negotiated
	Indirect  bool   // VIRTIO_F_INDIRECT_DESC negotiated

	// Interrupt raises the queue's interrupt (used buffer notification).
	// nil means no interrupt.
	Interrupt func() error
	// Fail is called once, with the *QueueError, when the queue meets a
	// broken ring. nil means nothing is told.
	Fail func(error)
}

// Queue is the device side of a split virtqueue. Every value it reads from
// guest memory is validated before use; a violation returns a *QueueError,
// marks the queue broken (every later Pop returns the same error) and calls
// QueueConfig.Fail.
//
// A Queue is used by one goroutine at a time (Pop, Push, Notify, Wait);
// Kick and Kicks are safe for concurrent use.
type Queue struct {
	mem      *guestmem.Memory
	index    int
	size     uint16
	eventIdx bool
	indirect bool

	desc []byte // size*16 bytes
	// avail and used are the rings rounded out to 4-byte boundaries so that
	// every 16-bit index can be accessed through an aligned 32-bit atomic;
	// availOff and usedOff locate the ring start inside them.
	avail    []byte
	availOff int
	used     []byte

	lastAvail  uint16 // next avail entry to consume
	usedIdx    uint16 // next used entry to fill
	signalled  uint16 // used index at the last interrupt decision
	kicks      chan struct{}
	irq        func() error
	fail       func(error)
	err        error
	failCalled bool

	nKicks atomic.Uint64 // driver notifications seen (Kick calls)
	nIRQs  atomic.Uint64 // interrupts raised by Notify
}

// NewQueue validates cfg against guest memory and returns the queue. The
// error is a *QueueError matching ErrQueueSize or ErrRingAddress.
func NewQueue(mem *guestmem.Memory, cfg QueueConfig) (*Queue, error) {
	maxSize := cfg.MaxSize
	if maxSize == 0 || maxSize > MaxQueueSize {
		maxSize = MaxQueueSize
	}
	qerr := func(what string, err error) error {
		return &QueueError{Queue: cfg.Index, What: what, Err: err}
	}
	n := cfg.Size
	if n == 0 || n > maxSize || n&(n-1) != 0 {
		return nil, qerr(fmt.Sprintf("size %d (max %d)", n, maxSize), ErrQueueSize)
	}
	q := &Queue{
		mem:      mem,
		index:    cfg.Index,
		size:     n,
		eventIdx: cfg.EventIdx,
		indirect: cfg.Indirect,
		kicks:    make(chan struct{}, 1),
		irq:      cfg.Interrupt,
		fail:     cfg.Fail,
	}
	if cfg.DescAddr%16 != 0 {
		return nil, qerr(fmt.Sprintf("descriptor table at %#x", cfg.DescAddr), ErrRingAddress)
	}
	var err error
	if q.desc, err = mem.Slice(cfg.DescAddr, uint64(n)*descSize); err != nil {
		return nil, qerr(fmt.Sprintf("descriptor table at %#x", cfg.DescAddr), ErrRingAddress)
	}
	// avail: flags, idx, ring[n], used_event.
	if cfg.AvailAddr%2 != 0 {
		return nil, qerr(fmt.Sprintf("avail ring at %#x", cfg.AvailAddr), ErrRingAddress)
	}
	start := cfg.AvailAddr &^ 3
	end := (cfg.AvailAddr + 6 + 2*uint64(n) + 3) &^ 3
	if q.avail, err = mem.Slice(start, end-start); err != nil {
		return nil, qerr(fmt.Sprintf("avail ring at %#x", cfg.AvailAddr), ErrRingAddress)
	}
	q.availOff = int(cfg.AvailAddr - start)
	// used: flags, idx, ring[n] of 8 bytes, avail_event.
	if cfg.UsedAddr%4 != 0 {
		return nil, qerr(fmt.Sprintf("used ring at %#x", cfg.UsedAddr), ErrRingAddress)
	}
	if q.used, err = mem.Slice(cfg.UsedAddr, (6+8*uint64(n)+3)&^3); err != nil {
		return nil, qerr(fmt.Sprintf("used ring at %#x", cfg.UsedAddr), ErrRingAddress)
	}
	return q, nil
}

// Size returns the queue size.
func (q *Queue) Size() uint16 { return q.size }

// Index returns the queue index within its device.
func (q *Queue) Index() int { return q.index }

// Err returns the error that broke the queue, or nil.
func (q *Queue) Err() error { return q.err }

// Kick records a driver notification. It never blocks; kicks coalesce.
func (q *Queue) Kick() {
	q.nKicks.Add(1)
	select {
	case q.kicks <- struct{}{}:
	default:
	}
}

// Kicks returns the channel that receives a value after Kick.
func (q *Queue) Kicks() <-chan struct{} { return q.kicks }

// Chain is one descriptor chain taken from the avail ring. Readable and
// Writable alias guest memory: the guest can change the bytes at any time,
// so a device copies values out before it validates them.
type Chain struct {
	Head     uint16   // head descriptor index, passed back to Push
	Readable [][]byte // device-readable buffers, in chain order
	Writable [][]byte // device-writable buffers, in chain order
}

// ReadableLen returns the total length of the readable buffers.
func (c *Chain) ReadableLen() int { return totalLen(c.Readable) }

// WritableLen returns the total length of the writable buffers.
func (c *Chain) WritableLen() int { return totalLen(c.Writable) }

// CopyFromGuest copies readable bytes, starting at offset off of the
// readable part, into dst and returns the number copied.
func (c *Chain) CopyFromGuest(dst []byte, off int) int { return gather(dst, c.Readable, off) }

// CopyToGuest copies src into the writable part at offset off and returns
// the number of bytes copied.
func (c *Chain) CopyToGuest(off int, src []byte) int { return scatter(c.Writable, off, src) }

func totalLen(bufs [][]byte) int {
	n := 0
	for _, b := range bufs {
		n += len(b)
	}
	return n
}

func gather(dst []byte, bufs [][]byte, off int) int {
	n := 0
	for _, b := range bufs {
		if len(dst) == 0 {
			break
		}
		if off >= len(b) {
			off -= len(b)
			continue
		}
		k := copy(dst, b[off:])
		off = 0
		dst = dst[k:]
		n += k
	}
	return n
}

func scatter(bufs [][]byte, off int, src []byte) int {
	n := 0
	for _, b := range bufs {
		if len(src) == 0 {
			break
		}
		if off >= len(b) {
			off -= len(b)
			continue
		}
		k := copy(b[off:], src)
		off = 0
		src = src[k:]
		n += k
	}
	return n
}

// Segments returns the sub-buffers covering [off, off+n) of bufs, appended
// to dst. Fewer bytes are covered when bufs is shorter.
func Segments(dst [][]byte, bufs [][]byte, off, n int) [][]byte {
	for _, b := range bufs {
		if n <= 0 {
			break
		}
		if off >= len(b) {
			off -= len(b)
			continue
		}
		b = b[off:]
		off = 0
		if len(b) > n {
			b = b[:n]
		}
		dst = append(dst, b)
		n -= len(b)
	}
	return dst
}

func (q *Queue) broken(what string, err error) error {
	q.err = &QueueError{Queue: q.index, What: what, Err: err}
	if !q.failCalled {
		q.failCalled = true
		if q.fail != nil {
			q.fail(q.err)
		}
	}
	return q.err
}

// Pending returns how many chains the driver has made available that the
// device has not taken yet.
func (q *Queue) Pending() (int, error) {
	if q.err != nil {
		return 0, q.err
	}
	n := q.availIdx() - q.lastAvail
	if n > q.size {
		return 0, q.broken(fmt.Sprintf("avail index %d with %d consumed", q.availIdx(), q.lastAvail), ErrAvailIndex)
	}
	return int(n), nil
}

// Pop takes the next available descriptor chain into c, reusing c's
// slices. It reports false when the avail ring is empty. On a ring
// violation it returns a *QueueError and the queue stays broken.
func (q *Queue) Pop(c *Chain) (bool, error) {
	n, err := q.Pending()
	if err != nil || n == 0 {
		return false, err
	}
	slot := int(q.lastAvail % q.size)
	head := binary.LittleEndian.Uint16(q.avail[q.availOff+4+2*slot:])
	q.lastAvail++
	if err := q.walk(c, head); err != nil {
		return false, err
	}
	return true, nil
}

func (q *Queue) walk(c *Chain, head uint16) error {
	c.Head = head
	c.Readable = c.Readable[:0]
	c.Writable = c.Writable[:0]
	if head >= q.size {
		return q.broken(fmt.Sprintf("avail entry %d", q.lastAvail-1), ErrDescIndex)
	}
	table := q.desc
	count := uint32(q.size)
	idx := uint32(head)
	ttl := int(q.size)
	inIndirect := false
	for {
		if ttl == 0 {
			return q.broken(fmt.Sprintf("chain from head %d", head), ErrChainTooLong)
		}
		d := table[idx*descSize : idx*descSize+descSize]
		addr := binary.LittleEndian.Uint64(d[0:])
		length := binary.LittleEndian.Uint32(d[8:])
		flags := binary.LittleEndian.Uint16(d[12:])
		next := binary.LittleEndian.Uint16(d[14:])
		what := func() string {
			if inIndirect {
				return fmt.Sprintf("indirect descriptor %d of chain %d", idx, head)
			}
			return fmt.Sprintf("descriptor %d of chain %d", idx, head)
		}
		if flags&DescFIndirect != 0 {
			switch {
			case !q.indirect, inIndirect, flags&DescFNext != 0,
				length == 0, length%descSize != 0:
				return q.broken(what(), ErrIndirect)
			}
			t, err := q.mem.Slice(addr, uint64(length))
			if err != nil {
				return q.broken(what(), ErrDescAddress)
			}
			table, count, idx, inIndirect = t, length/descSize, 0, true
			continue // the pointer itself does not count against the TTL
		}
		ttl--
		buf, err := q.mem.Slice(addr, uint64(length))
		if err != nil {
			return q.broken(what(), ErrDescAddress)
		}
		if flags&DescFWrite != 0 {
			c.Writable = append(c.Writable, buf)
		} else {
			if len(c.Writable) > 0 {
				return q.broken(what(), ErrDescOrder)
			}
			c.Readable = append(c.Readable, buf)
		}
		if flags&DescFNext == 0 {
			return nil
		}
		if uint32(next) >= count {
			return q.broken(what()+fmt.Sprintf(" next %d", next), ErrDescIndex)
		}
		idx = uint32(next)
	}
}

// Push returns the chain with head index head to the driver, with written
// bytes written into its writable buffers. It publishes the used index with
// release semantics; call Notify afterwards to interrupt the driver.
func (q *Queue) Push(head uint16, written uint32) {
	slot := int(q.usedIdx % q.size)
	e := q.used[4+8*slot:]
	binary.LittleEndian.PutUint32(e[0:], uint32(head))
	binary.LittleEndian.PutUint32(e[4:], written)
	q.usedIdx++
	q.storeUsedIdx(q.usedIdx)
}

// NeedInterrupt reports whether the driver wants an interrupt for the used
// entries pushed since the previous call: it honours used_event when
// VIRTIO_F_EVENT_IDX is negotiated and VIRTQ_AVAIL_F_NO_INTERRUPT otherwise.
func (q *Queue) NeedInterrupt() bool {
	newIdx, old := q.usedIdx, q.signalled
	if newIdx == old {
		return false
	}
	q.signalled = newIdx
	if q.eventIdx {
		ev := q.load16(q.avail, q.availOff+4+2*int(q.size))
		return newIdx-ev-1 < newIdx-old
	}
	return q.load16(q.avail, q.availOff)&availFNoInterrupt == 0
}

// Notify raises the queue's interrupt if NeedInterrupt says so.
func (q *Queue) Notify() error {
	if q.irq == nil || !q.NeedInterrupt() {
		return nil
	}
	q.nIRQs.Add(1)
	return q.irq()
}

// Arm asks the driver to kick on the next avail entry (by writing
// avail_event under VIRTIO_F_EVENT_IDX; without it the device never
// suppresses kicks) and reports whether the avail ring is empty afterwards,
// that is whether the caller may block on Kicks without missing work.
func (q *Queue) Arm() (idle bool) {
	if q.err != nil {
		return true
	}
	if q.eventIdx {
		q.store16(q.used, 4+8*int(q.size), q.lastAvail)
	}
	return q.availIdx() == q.lastAvail
}

// Wait blocks until the avail ring may hold new chains or stop is closed;
// it reports false when stopped or when the queue is broken. It re-arms kick notification first, so a
// driver that published buffers just before is not missed.
func (q *Queue) Wait(stop <-chan struct{}) bool {
	for {
		select {
		case <-stop:
			return false
		default:
		}
		if q.err != nil {
			return false
		}
		if !q.Arm() {
			return true
		}
		select {
		case <-stop:
			return false
		case <-q.kicks:
		}
	}
}

// String describes the ring as the guest sees it, for diagnosing a stalled
// device: the avail and used indexes with the event indexes each side asked
// for, and how many kicks and interrupts the queue has seen. It reads only
// ring words (atomically) and counters, so it is safe to call from any
// goroutine while the queue is in use.
func (q *Queue) String() string {
	s := fmt.Sprintf("queue %d (size %d): avail idx %d, used idx %d", q.index, q.size, q.availIdx(), q.load16(q.used, 2))
	if q.eventIdx {
		s += fmt.Sprintf(", used_event %d, avail_event %d", q.load16(q.avail, q.availOff+4+2*int(q.size)), q.load16(q.used, 4+8*int(q.size)))
	} else {
		s += fmt.Sprintf(", avail flags %#x", q.load16(q.avail, q.availOff))
	}
	return s + fmt.Sprintf(", %d kicks, %d interrupts", q.nKicks.Load(), q.nIRQs.Load())
}

func (q *Queue) availIdx() uint16 { return q.load16(q.avail, q.availOff+2) }

func (q *Queue) storeUsedIdx(v uint16) {
	// The device owns the whole first word of the used ring (flags, idx);
	// flags stay 0: this device never asks the driver to suppress kicks
	// other than through avail_event.
	q.store32(q.used, 0, uint32(v)<<16)
}
