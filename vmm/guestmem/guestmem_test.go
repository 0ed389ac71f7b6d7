package guestmem

import (
	"errors"
	"os"
	"testing"
)

func TestLayoutSplitsAroundHole(t *testing.T) {
	rs := Layout(4 << 30)
	if len(rs) != 2 || rs[0].GPA != 0 || rs[0].Size != 3<<30 || rs[1].GPA != 4<<30 || rs[1].Size != 1<<30 {
		t.Fatalf("Layout(4GiB) = %+v", rs)
	}
	if rs := Layout(1 << 30); len(rs) != 1 || rs[0].Size != 1<<30 {
		t.Fatalf("Layout(1GiB) = %+v", rs)
	}
}

func TestNewRejectsBadSizes(t *testing.T) {
	for _, s := range []uint64{0, 100, MaxSize + PageSize} {
		_, err := New(s)
		var se *SizeError
		if !errors.As(err, &se) {
			t.Errorf("New(%d) = %v, want *SizeError", s, err)
		}
	}
}

func TestAccessorsCheckBounds(t *testing.T) {
	m, err := New(1 << 20)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if err := m.PutUint64(0x1000, 0x1122334455667788); err != nil {
		t.Fatal(err)
	}
	v, err := m.Uint64(0x1000)
	if err != nil || v != 0x1122334455667788 {
		t.Fatalf("Uint64 = %#x, %v", v, err)
	}
	if v, _ := m.Uint16(0x1000); v != 0x7788 {
		t.Fatalf("Uint16 = %#x", v)
	}
	bad := []struct{ gpa, n uint64 }{
		{1 << 20, 1}, {1<<20 - 1, 2}, {^uint64(0), 2}, {0, 1<<20 + 1}, {^uint64(0) - 1, 4},
	}
	for _, b := range bad {
		_, err := m.Slice(b.gpa, b.n)
		if !errors.Is(err, ErrOutOfRange) {
			t.Errorf("Slice(%#x, %d) = %v, want ErrOutOfRange", b.gpa, b.n, err)
		}
	}
	if _, err := m.Slice(1<<20-8, 8); err != nil {
		t.Errorf("last 8 bytes: %v", err)
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	if err := m.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if _, err := m.Slice(0, 8); !errors.Is(err, ErrClosed) {
		t.Fatalf("after Close: %v", err)
	}
}

func FuzzSlice(f *testing.F) {
	m, err := New(64 << 10)
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { m.Close() })
	f.Add(uint64(0), uint64(8))
	f.Add(uint64(64<<10-1), uint64(2))
	f.Add(^uint64(0), ^uint64(0))
	f.Fuzz(func(t *testing.T, gpa, n uint64) {
		b, err := m.Slice(gpa, n)
		if err == nil && uint64(len(b)) != n {
			t.Fatalf("len %d, want %d", len(b), n)
		}
		if err == nil && (gpa > 64<<10 || n > 64<<10-gpa) {
			t.Fatalf("accepted [%#x,+%d)", gpa, n)
		}
	})
}

func TestMapFileIsCopyOnWrite(t *testing.T) {
	m, err := New(1 << 20)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	path, f := pagedFile(t, 3, func(page int) byte { return byte(page * 7) })
	if err := m.MapFile(0x4000, f, PageSize, 2*PageSize); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 2*PageSize)
	if err := m.ReadAt(got, 0x4000); err != nil {
		t.Fatal(err)
	}
	if got[0] != 7 || got[PageSize] != 14 {
		t.Fatalf("mapped bytes %d %d, want 7 14", got[0], got[PageSize])
	}
	if err := m.PutUint32(0x4000, 0xdeadbeef); err != nil {
		t.Fatal(err)
	}
	after, _ := os.ReadFile(path)
	if after[PageSize] != 7 {
		t.Fatal("a guest write reached the file")
	}
	if err := m.MapFile(0x4001, f, 0, PageSize); err == nil {
		t.Fatal("unaligned MapFile accepted")
	}
	if err := m.MapFile(1<<20-PageSize, f, 0, 2*PageSize); !errors.Is(err, ErrOutOfRange) {
		t.Fatalf("MapFile past the end: %v", err)
	}
}

// pagedFile writes a file of n pages, every byte of page i being val(i),
// and opens it (closed at the end of the test).
func pagedFile(t *testing.T, n int, val func(page int) byte) (string, *os.File) {
	t.Helper()
	path := t.TempDir() + "/f"
	data := make([]byte, n*PageSize)
	for i := range data {
		data[i] = val(i / PageSize)
	}
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return path, f
}

// resident counts the resident pages of [gpa, gpa+n) (mincore).
func resident(t *testing.T, m *Memory, gpa, n uint64) int {
	t.Helper()
	b, err := m.Slice(gpa, n)
	if err != nil {
		t.Fatal(err)
	}
	vec := make([]byte, (n+PageSize-1)/PageSize)
	if err := mincore(b, vec); err != nil {
		t.Fatal(err)
	}
	k := 0
	for _, v := range vec {
		k += int(v & 1)
	}
	return k
}

func TestPopulate(t *testing.T) {
	m, err := New(4 << 20)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if got := resident(t, m, 1<<20, 1<<20); got != 0 {
		t.Fatalf("%d pages resident before anything touched them", got)
	}
	// Unaligned ends are rounded out to whole pages.
	if err := m.Populate(1<<20+100, 16*PageSize-200); errors.Is(err, ErrPopulateUnsupported) {
		t.Skipf("host kernel: %v", err)
	} else if err != nil {
		t.Fatal(err)
	}
	if got := resident(t, m, 1<<20, 16*PageSize); got != 16 {
		t.Errorf("%d of 16 pages resident after Populate", got)
	}
	if got := resident(t, m, 1<<20+16*PageSize, PageSize); got != 0 {
		t.Errorf("Populate went past its range")
	}

	// A file mapping gets its private copies, with the file's bytes, and
	// writes still do not reach the file.
	path, f := pagedFile(t, 4, func(page int) byte { return byte(page + 1) })
	if err := m.MapFile(2<<20, f, 0, 4*PageSize); err != nil {
		t.Fatal(err)
	}
	if err := m.Populate(2<<20, 4*PageSize); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 4*PageSize)
	if err := m.ReadAt(got, 2<<20); err != nil || got[0] != 1 || got[3*PageSize] != 4 {
		t.Fatalf("populated file pages read %d %d (%v), want 1 4", got[0], got[3*PageSize], err)
	}
	if err := m.PutUint32(2<<20, 0); err != nil {
		t.Fatal(err)
	}
	if after, _ := os.ReadFile(path); after[0] != 1 {
		t.Fatal("a guest write reached the file")
	}

	if err := m.Populate(4<<20-PageSize, 2*PageSize); !errors.Is(err, ErrOutOfRange) {
		t.Errorf("Populate past the end: %v", err)
	}
	if err := m.Populate(1<<63, 1<<63); !errors.Is(err, ErrOutOfRange) {
		t.Errorf("Populate of a wrapping range: %v", err)
	}
	m.Close()
	if err := m.Populate(0, PageSize); !errors.Is(err, ErrClosed) {
		t.Errorf("Populate after Close: %v", err)
	}
}
