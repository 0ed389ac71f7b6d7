package blk

import (
	"bytes"
	"encoding/binary"
	"testing"

	"github.com/gosandbox/sandbox/virtio"
)

// boundedDisk fails the test on any access outside its size.
type boundedDisk struct {
	t *testing.T
	b []byte
}

func (d *boundedDisk) check(n int, off int64) {
	if off < 0 || off+int64(n) > int64(len(d.b)) {
		d.t.Fatalf("backing access [%d, +%d) outside a %d-byte disk", off, n, len(d.b))
	}
}

func (d *boundedDisk) ReadAt(p []byte, off int64) (int, error) {
	d.check(len(p), off)
	return copy(p, d.b[off:]), nil
}

func (d *boundedDisk) WriteAt(p []byte, off int64) (int, error) {
	d.check(len(p), off)
	return copy(d.b[off:], p), nil
}

// FuzzBlkRequest feeds arbitrary requests (header, data, discard segments,
// buffer splits) to the request handler. The backing must never be
// touched outside the disk, and the handler must answer with a valid
// status in the last writable byte.
func FuzzBlkRequest(f *testing.F) {
	req := func(typ uint32, sector uint64, out []byte, split uint8, in uint16) []byte {
		b := binary.LittleEndian.AppendUint32(nil, typ)
		b = binary.LittleEndian.AppendUint32(b, 0)
		b = binary.LittleEndian.AppendUint64(b, sector)
		b = append(b, split, byte(in), byte(in>>8))
		return append(b, out...)
	}
	seg := func(sector uint64, n, flags uint32) []byte {
		b := binary.LittleEndian.AppendUint64(nil, sector)
		b = binary.LittleEndian.AppendUint32(b, n)
		return binary.LittleEndian.AppendUint32(b, flags)
	}
	f.Add(req(TypeIn, 0, nil, 0, 513), false)
	f.Add(req(TypeIn, 15, nil, 3, 513), false)
	f.Add(req(TypeOut, 14, make([]byte, 1024), 7, 1), false)
	f.Add(req(TypeDiscard, 0, seg(2, 4, 0), 0, 1), false)
	f.Add(req(TypeWriteZeroes, 0, append(seg(15, 1, 1), seg(1<<60, 1<<31, 0)...), 0, 1), false)
	f.Add(req(TypeGetID, 0, nil, 0, 21), true)
	f.Add(req(TypeOut, ^uint64(0), make([]byte, 512), 1, 1), true)

	f.Fuzz(func(t *testing.T, data []byte, readOnly bool) {
		if len(data) < 19 {
			return
		}
		disk := &boundedDisk{t: t, b: make([]byte, 16*SectorSize)}
		d, err := New(disk, Options{Size: int64(len(disk.b)), ReadOnly: readOnly, Serial: "fuzz"})
		if err != nil {
			t.Fatal(err)
		}
		split := int(data[16])
		in := int(binary.LittleEndian.Uint16(data[17:]))
		out := append(append([]byte{}, data[:16]...), data[19:]...)
		// Split the readable part at split, the writable part in half.
		var ch virtio.Chain
		if split > 0 && split < len(out) {
			ch.Readable = [][]byte{out[:split], out[split:]}
		} else {
			ch.Readable = [][]byte{out}
		}
		w := make([]byte, in)
		if in > 1 {
			ch.Writable = [][]byte{w[:in/2], w[in/2:]}
		} else {
			ch.Writable = [][]byte{w}
		}
		r := &request{d: d}
		n := r.handle(&ch)
		if in == 0 {
			if n != 0 {
				t.Fatalf("used len %d without a status byte", n)
			}
			return
		}
		if int(n) != in {
			t.Fatalf("used len %d, writable %d", n, in)
		}
		if st := w[in-1]; st > StatusUnsupp {
			t.Fatalf("status %d", st)
		}
		if readOnly && !bytes.Equal(disk.b, make([]byte, len(disk.b))) {
			t.Fatal("read-only disk was written")
		}
	})
}
