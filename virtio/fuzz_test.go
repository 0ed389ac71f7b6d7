package virtio_test

import (
	"encoding/binary"
	"errors"
	"testing"

	"github.com/gosandbox/sandbox/virtio"
	"github.com/gosandbox/sandbox/vmm/guestmem"
)

// FuzzChainWalk lays random bytes out as a descriptor table, avail ring and
// indirect tables, then pops chains until the queue is empty or broken. The
// queue must never panic, hang or return a buffer outside guest RAM, and
// every error must be a *virtio.QueueError.
func FuzzChainWalk(f *testing.F) {
	// Seeds: a valid one-descriptor chain, a loop, an indirect table.
	desc := func(addr uint64, l uint32, flags, next uint16) []byte {
		var d [16]byte
		binary.LittleEndian.PutUint64(d[0:], addr)
		binary.LittleEndian.PutUint32(d[8:], l)
		binary.LittleEndian.PutUint16(d[12:], flags)
		binary.LittleEndian.PutUint16(d[14:], next)
		return d[:]
	}
	seed := func(sizeLog, mode byte, availIdx uint16, ring []uint16, descs ...[]byte) []byte {
		b := []byte{sizeLog, mode, byte(availIdx), byte(availIdx >> 8)}
		for _, r := range ring {
			b = binary.LittleEndian.AppendUint16(b, r)
		}
		for len(b) < 4+2*16 {
			b = append(b, 0)
		}
		for _, d := range descs {
			b = append(b, d...)
		}
		return b
	}
	f.Add(seed(2, 0, 1, []uint16{0}, desc(0x8000, 64, 0, 0)))
	f.Add(seed(2, 1, 1, []uint16{0}, desc(0x8000, 64, virtio.DescFNext, 1), desc(0x8100, 64, virtio.DescFWrite|virtio.DescFNext, 0)))
	f.Add(seed(3, 3, 2, []uint16{1, 0}, desc(0x8000, 64, virtio.DescFWrite, 0), desc(0x9000, 32, virtio.DescFIndirect, 0)))
	f.Add(seed(0, 2, 5, []uint16{0}, desc(0xfff0, 32, 0, 0)))
	f.Add(seed(4, 1, 0xffff, []uint16{0}, desc(0, 0, 0, 0)))

	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) < 4 {
			return
		}
		const memSize = 64 << 10
		mem, err := guestmem.New(memSize)
		if err != nil {
			t.Skip(err)
		}
		defer mem.Close()
		size := uint16(1) << (data[0] % 6)
		eventIdx := data[1]&1 != 0
		indirect := data[1]&2 != 0
		const descAddr, availAddr, usedAddr = 0x1000, 0x2000, 0x3000
		avail := make([]byte, 4+2*int(size)+2)
		binary.LittleEndian.PutUint16(avail[2:], binary.LittleEndian.Uint16(data[2:]))
		rest := data[4:]
		n := copy(avail[4:], rest)
		rest = rest[min(n, len(rest)):]
		mem.WriteAt(avail, availAddr)
		// Descriptor table, then the same bytes again at 0x9000 as
		// candidate indirect tables.
		tbl := make([]byte, 16*int(size))
		copy(tbl, rest)
		mem.WriteAt(tbl, descAddr)
		ind := make([]byte, 0x1000)
		copy(ind, rest)
		mem.WriteAt(ind, 0x9000)
		var fails int
		q, err := virtio.NewQueue(mem, virtio.QueueConfig{
			Size: size, DescAddr: descAddr, AvailAddr: availAddr, UsedAddr: usedAddr,
			EventIdx: eventIdx, Indirect: indirect,
			Fail: func(error) { fails++ },
		})
		if err != nil {
			t.Fatal(err)
		}
		var ch virtio.Chain
		for i := 0; i <= int(size); i++ {
			ok, err := q.Pop(&ch)
			if err != nil {
				var qe *virtio.QueueError
				if !errors.As(err, &qe) {
					t.Fatalf("Pop error %T %v is not a *QueueError", err, err)
				}
				if fails != 1 {
					t.Fatalf("Fail called %d times", fails)
				}
				return
			}
			if !ok {
				break
			}
			if len(ch.Readable)+len(ch.Writable) > int(size) {
				t.Fatalf("chain of %d descriptors in a queue of %d", len(ch.Readable)+len(ch.Writable), size)
			}
			for _, b := range append(append([][]byte{}, ch.Readable...), ch.Writable...) {
				_ = append([]byte(nil), b...) // every buffer is readable host memory
			}
			q.Push(ch.Head, uint32(ch.WritableLen()))
			q.Notify()
		}
		if fails != 0 {
			t.Fatalf("Fail called without an error from Pop")
		}
	})
}
