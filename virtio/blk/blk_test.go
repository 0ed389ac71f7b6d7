package blk_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/gosandbox/sandbox/virtio"
	"github.com/gosandbox/sandbox/virtio/blk"
	"github.com/gosandbox/sandbox/virtio/virtiotest"
)

const diskSize = 1 << 20

func tempDisk(t testing.TB, size int64) *os.File {
	t.Helper()
	f, err := os.Create(filepath.Join(t.TempDir(), "disk.img"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	return f
}

func hdr(typ uint32, sector uint64) []byte {
	b := make([]byte, 16)
	binary.LittleEndian.PutUint32(b[0:], typ)
	binary.LittleEndian.PutUint64(b[8:], sector)
	return b
}

func seg(sector uint64, n, flags uint32) []byte {
	b := make([]byte, 16)
	binary.LittleEndian.PutUint64(b[0:], sector)
	binary.LittleEndian.PutUint32(b[8:], n)
	binary.LittleEndian.PutUint32(b[12:], flags)
	return b
}

// do sends one request and returns the status byte and data written.
func do(t *testing.T, h *virtiotest.Harness, out [][]byte, dataIn int) (uint8, []byte) {
	t.Helper()
	h.Add(0, out, dataIn, 1)
	u := h.WaitUsed(0)
	if len(u.Written) < 1 || int(u.Len) != len(u.Written) {
		t.Fatalf("used len %d, written %d", u.Len, len(u.Written))
	}
	if int(u.Len) != dataIn+1 {
		t.Fatalf("used len %d, want the writable length %d", u.Len, dataIn+1)
	}
	w := u.Written
	return w[len(w)-1], w[:len(w)-1]
}

func newDev(t testing.TB, f *os.File, opts blk.Options) *blk.Device {
	t.Helper()
	d, err := blk.New(f, opts)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func TestReadWrite(t *testing.T) {
	f := tempDisk(t, diskSize)
	h := virtiotest.NewHarness(t, newDev(t, f, blk.Options{Serial: "gosandbox-disk0"}), virtiotest.HarnessOptions{DataPerQueue: 256 * 160 << 10})
	data := bytes.Repeat([]byte("gosandbox"), 1024)[:8192]
	// Split the data over two descriptors at an odd boundary.
	if st, _ := do(t, h, [][]byte{hdr(blk.TypeOut, 10), data[:1000], data[1000:]}, 0); st != blk.StatusOK {
		t.Fatalf("write status %d", st)
	}
	onDisk := make([]byte, len(data))
	f.ReadAt(onDisk, 10*512)
	if !bytes.Equal(onDisk, data) {
		t.Fatal("file content differs from what was written")
	}
	st, got := do(t, h, [][]byte{hdr(blk.TypeIn, 10)}, 8192)
	if st != blk.StatusOK || !bytes.Equal(got, data) {
		t.Fatalf("read status %d, data equal %v", st, bytes.Equal(got, data))
	}
	if st, _ := do(t, h, [][]byte{hdr(blk.TypeFlush, 0)}, 0); st != blk.StatusOK {
		t.Fatalf("flush status %d", st)
	}
	st, id := do(t, h, [][]byte{hdr(blk.TypeGetID, 0)}, blk.IDLen)
	if st != blk.StatusOK || strings.TrimRight(string(id), "\x00") != "gosandbox-disk0" {
		t.Fatalf("GET_ID status %d id %q", st, id)
	}
	if st, _ := do(t, h, [][]byte{hdr(99, 0)}, 0); st != blk.StatusUnsupp {
		t.Fatalf("unknown type status %d", st)
	}
}

func TestOutOfRange(t *testing.T) {
	f := tempDisk(t, diskSize)
	h := virtiotest.NewHarness(t, newDev(t, f, blk.Options{}), virtiotest.HarnessOptions{DataPerQueue: 256 * 160 << 10})
	last := uint64(diskSize/512 - 1)
	tests := []struct {
		name   string
		out    [][]byte
		in     int
		status uint8
	}{
		{"read last sector", [][]byte{hdr(blk.TypeIn, last)}, 512, blk.StatusOK},
		{"read past end", [][]byte{hdr(blk.TypeIn, last)}, 1024, blk.StatusIOErr},
		{"read at capacity", [][]byte{hdr(blk.TypeIn, last+1)}, 512, blk.StatusIOErr},
		{"read huge sector", [][]byte{hdr(blk.TypeIn, 1<<63)}, 512, blk.StatusIOErr},
		{"read sector wraps", [][]byte{hdr(blk.TypeIn, ^uint64(0))}, 512, blk.StatusIOErr},
		{"read partial sector", [][]byte{hdr(blk.TypeIn, 0)}, 100, blk.StatusIOErr},
		{"write past end", [][]byte{hdr(blk.TypeOut, last), make([]byte, 1024)}, 0, blk.StatusIOErr},
		{"write partial sector", [][]byte{hdr(blk.TypeOut, 0), make([]byte, 100)}, 0, blk.StatusIOErr},
		{"discard past end", [][]byte{hdr(blk.TypeDiscard, 0), seg(last, 2, 0)}, 0, blk.StatusIOErr},
		{"discard with unmap flag", [][]byte{hdr(blk.TypeDiscard, 0), seg(0, 1, 1)}, 0, blk.StatusUnsupp},
		{"write zeroes reserved flag", [][]byte{hdr(blk.TypeWriteZeroes, 0), seg(0, 1, 2)}, 0, blk.StatusUnsupp},
		{"discard no segment", [][]byte{hdr(blk.TypeDiscard, 0)}, 0, blk.StatusUnsupp},
		{"discard ragged segment", [][]byte{hdr(blk.TypeDiscard, 0), make([]byte, 20)}, 0, blk.StatusUnsupp},
		{"short header", [][]byte{make([]byte, 8)}, 0, blk.StatusIOErr},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if st, _ := do(t, h, tc.out, tc.in); st != tc.status {
				t.Fatalf("status %d, want %d", st, tc.status)
			}
		})
	}
	// A request with no writable byte is returned with length 0 and does
	// not break the device.
	h.Add(0, [][]byte{hdr(blk.TypeIn, 0)})
	if u := h.WaitUsed(0); u.Len != 0 {
		t.Fatalf("status-less request: used len %d", u.Len)
	}
	if err := h.FailErr(); err != nil {
		t.Fatalf("device failed: %v", err)
	}
}

func TestReadOnly(t *testing.T) {
	f := tempDisk(t, diskSize)
	f.WriteAt([]byte("original"), 0)
	d := newDev(t, f, blk.Options{ReadOnly: true})
	if d.Features()&blk.FeatureRO == 0 || d.Features()&blk.FeatureDiscard != 0 {
		t.Fatalf("features %#x", d.Features())
	}
	h := virtiotest.NewHarness(t, d, virtiotest.HarnessOptions{DataPerQueue: 256 * 160 << 10})
	for _, out := range [][][]byte{
		{hdr(blk.TypeOut, 0), make([]byte, 512)},
		{hdr(blk.TypeWriteZeroes, 0), seg(0, 1, 0)},
		{hdr(blk.TypeDiscard, 0), seg(0, 1, 0)},
	} {
		if st, _ := do(t, h, out, 0); st != blk.StatusIOErr {
			t.Fatalf("write to read-only disk: status %d", st)
		}
	}
	got := make([]byte, 8)
	f.ReadAt(got, 0)
	if string(got) != "original" {
		t.Fatalf("read-only disk changed: %q", got)
	}
	st, data := do(t, h, [][]byte{hdr(blk.TypeIn, 0)}, 512)
	if st != blk.StatusOK || string(data[:8]) != "original" {
		t.Fatalf("read: %d %q", st, data[:8])
	}
}

func TestReaderAtNeedsReadOnly(t *testing.T) {
	r := strings.NewReader(strings.Repeat("x", 4096))
	if _, err := blk.New(r, blk.Options{Size: 4096}); !errors.Is(err, blk.ErrOptions) {
		t.Fatalf("writable over a ReaderAt: %v", err)
	}
	if _, err := blk.New(r, blk.Options{ReadOnly: true}); !errors.Is(err, blk.ErrOptions) {
		t.Fatalf("no size: %v", err)
	}
	if _, err := blk.New(r, blk.Options{ReadOnly: true, Size: 4096, Serial: strings.Repeat("s", 21)}); !errors.Is(err, blk.ErrOptions) {
		t.Fatalf("long serial: %v", err)
	}
	d, err := blk.New(r, blk.Options{ReadOnly: true, Size: 4096 + 100})
	if err != nil {
		t.Fatal(err)
	}
	if d.Capacity() != 8 {
		t.Fatalf("capacity %d, want 8", d.Capacity())
	}
	cfg := make([]byte, 8)
	d.ReadConfig(0, cfg)
	if binary.LittleEndian.Uint64(cfg) != 8 {
		t.Fatalf("config capacity %d", binary.LittleEndian.Uint64(cfg))
	}
}

func allocated(t *testing.T, f *os.File) int64 {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

func TestDiscardPunchesHoles(t *testing.T) {
	f := tempDisk(t, diskSize)
	h := virtiotest.NewHarness(t, newDev(t, f, blk.Options{}), virtiotest.HarnessOptions{DataPerQueue: 256 * 160 << 10})
	data := bytes.Repeat([]byte{0xAB}, 64<<10)
	if st, _ := do(t, h, [][]byte{hdr(blk.TypeOut, 0), data}, 0); st != blk.StatusOK {
		t.Fatalf("write status %d", st)
	}
	f.Sync()
	before := allocated(t, f)
	if before < int64(len(data)) {
		t.Skipf("filesystem reports %d bytes allocated after a 64 KiB write", before)
	}
	// Discard the first 32 KiB, write zeroes (may unmap) over the next 16.
	if st, _ := do(t, h, [][]byte{hdr(blk.TypeDiscard, 0), seg(0, 64, 0)}, 0); st != blk.StatusOK {
		t.Fatalf("discard status %d", st)
	}
	if st, _ := do(t, h, [][]byte{hdr(blk.TypeWriteZeroes, 0), seg(64, 32, 1)}, 0); st != blk.StatusOK {
		t.Fatalf("write zeroes status %d", st)
	}
	after := allocated(t, f)
	if after > before-48<<10 {
		t.Fatalf("allocated %d bytes before, %d after punching 48 KiB", before, after)
	}
	st, got := do(t, h, [][]byte{hdr(blk.TypeIn, 0)}, 64<<10)
	if st != blk.StatusOK {
		t.Fatalf("read status %d", st)
	}
	if !bytes.Equal(got[:48<<10], make([]byte, 48<<10)) || !bytes.Equal(got[48<<10:], data[48<<10:]) {
		t.Fatal("content after discard/write zeroes is wrong")
	}
	// WRITE_ZEROES without unmap zeroes in place and keeps the space.
	before = allocated(t, f)
	if st, _ := do(t, h, [][]byte{hdr(blk.TypeWriteZeroes, 0), seg(96, 32, 0)}, 0); st != blk.StatusOK {
		t.Fatalf("write zeroes (no unmap) status %d", st)
	}
	if after := allocated(t, f); after < before {
		t.Fatalf("write zeroes without unmap released space: %d -> %d bytes", before, after)
	}
	st, got = do(t, h, [][]byte{hdr(blk.TypeIn, 96)}, 16<<10)
	if st != blk.StatusOK || !bytes.Equal(got, make([]byte, 16<<10)) {
		t.Fatalf("range after write zeroes: status %d, zero %v", st, bytes.Equal(got, make([]byte, 16<<10)))
	}
}

// memDisk is a non-file backing: WRITE_ZEROES falls back to writing zeros.
type memDisk struct{ b []byte }

func (m *memDisk) ReadAt(p []byte, off int64) (int, error)  { return copy(p, m.b[off:]), nil }
func (m *memDisk) WriteAt(p []byte, off int64) (int, error) { return copy(m.b[off:], p), nil }

func TestWriteZeroesWithoutFile(t *testing.T) {
	m := &memDisk{b: bytes.Repeat([]byte{1}, 8192)}
	d, err := blk.New(m, blk.Options{Size: 8192})
	if err != nil {
		t.Fatal(err)
	}
	h := virtiotest.NewHarness(t, d, virtiotest.HarnessOptions{DataPerQueue: 256 * 160 << 10})
	if st, _ := do(t, h, [][]byte{hdr(blk.TypeWriteZeroes, 0), seg(2, 4, 0)}, 0); st != blk.StatusOK {
		t.Fatalf("status %d", st)
	}
	if !bytes.Equal(m.b[1024:3072], make([]byte, 2048)) || m.b[1023] != 1 || m.b[3072] != 1 {
		t.Fatal("write zeroes touched the wrong bytes")
	}
}

func TestConformance(t *testing.T) {
	virtiotest.TestDevice(t, func(t *testing.T) virtio.Device {
		return newDev(t, tempDisk(t, diskSize), blk.Options{})
	}, 0)
}

func BenchmarkRead4K(b *testing.B) {
	f := tempDisk(b, 64<<20)
	f.WriteAt(bytes.Repeat([]byte{7}, 64<<20), 0)
	d, _ := blk.New(f, blk.Options{})
	h := virtiotest.NewHarness(b, d, virtiotest.HarnessOptions{DataPerQueue: 256 * 160 << 10})
	h0 := hdr(blk.TypeIn, 0)
	b.SetBytes(4096)
	b.ResetTimer()
	i := 0
	for b.Loop() {
		binary.LittleEndian.PutUint64(h0[8:], uint64(i%16384)*8)
		h.Add(0, [][]byte{h0}, 4096, 1)
		h.WaitUsed(0)
		i++
	}
}
