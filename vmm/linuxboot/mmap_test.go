package linuxboot

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"github.com/gosandbox/sandbox/vmm/guestmem"
	"github.com/gosandbox/sandbox/vmm/linuxboot/linuxboottest"
)

// recordingMapper checks and records the calls LoadELF makes, and maps
// with guest memory's own MapFile.
type recordingMapper struct {
	t     testing.TB
	mem   *guestmem.Memory
	calls [][3]uint64
}

func (m *recordingMapper) MapFile(gpa uint64, f *os.File, off int64, n uint64) error {
	if gpa%guestmem.PageSize != 0 || off%guestmem.PageSize != 0 || n%guestmem.PageSize != 0 || n == 0 {
		m.t.Errorf("MapFile(%#x, %#x, %#x) is not page aligned", gpa, off, n)
	}
	m.calls = append(m.calls, [3]uint64{gpa, uint64(off), n})
	return m.mem.MapFile(gpa, f, off, n)
}

func writeTemp(t testing.TB, data []byte) *os.File {
	path := filepath.Join(t.TempDir(), "vmlinux")
	if err := os.WriteFile(path, data, 0o444); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

func TestLoadELFMapped(t *testing.T) {
	text := bytes.Repeat([]byte{0x49, 0x89, 0xf7, 0x90}, 3*4096/4+100) // 3 pages + 400 bytes
	data := bytes.Repeat([]byte{0xd0}, 2*4096)
	k := linuxboottest.ELFPageAligned(0x1000000,
		linuxboottest.Segment{Paddr: 0x1000000, Data: text, Memsz: 0x8000},
		linuxboottest.Segment{Paddr: 0x1200000, Data: data})
	f := writeTemp(t, k)
	mem := newMem(t, 64*mib)
	mapper := &recordingMapper{t: t, mem: mem}
	l, err := LoadELF(mem, f, int64(len(k)), Config{Mapper: mapper})
	if err != nil {
		t.Fatal(err)
	}
	if len(mapper.calls) != 2 || mapper.calls[0][0] != 0x1000000 || mapper.calls[0][2] != 3*4096 || mapper.calls[1][2] != 2*4096 {
		t.Fatalf("MapFile calls %x", mapper.calls)
	}
	got := make([]byte, 0x8000)
	mem.ReadAt(got, 0x1000000)
	if !bytes.Equal(got[:len(text)], text) || !bytes.Equal(got[len(text):], make([]byte, 0x8000-len(text))) {
		t.Fatal("mapped text segment wrong, or bytes after p_filesz not zero")
	}
	got = make([]byte, len(data))
	mem.ReadAt(got, 0x1200000)
	if !bytes.Equal(got, data) {
		t.Fatal("mapped data segment wrong")
	}
	// Guest writes stay private: the file is unchanged.
	mem.WriteAt([]byte{0xff}, 0x1000000)
	head := make([]byte, 1)
	f.ReadAt(head, int64(mapper.calls[0][1]))
	if head[0] != 0x49 || l.Entry != 0x1000000 {
		t.Fatal("guest write reached the file")
	}
}

// BenchmarkLoadELFRealMapped is BenchmarkLoadELFReal with the segments
// mapped from the file instead of copied.
func BenchmarkLoadELFRealMapped(b *testing.B) {
	z, err := ParseBzImage(realKernel(b))
	if err != nil {
		b.Fatal(err)
	}
	v, err := z.Vmlinux()
	if err != nil {
		b.Fatal(err)
	}
	f := writeTemp(b, v)
	cfg := Config{Cmdline: "console=ttyS0", SetupHeader: z.Header.Raw}
	for b.Loop() {
		m, err := guestmem.New(256 * mib)
		if err != nil {
			b.Fatal(err)
		}
		cfg.Mapper = m
		if _, err := LoadELF(m, f, int64(len(v)), cfg); err != nil {
			b.Fatal(err)
		}
		m.Close()
	}
}

func TestGuestMemoryMapFileErrors(t *testing.T) {
	mem := newMem(t, 4*mib)
	content := bytes.Repeat([]byte{0x5a}, 8192)
	f := writeTemp(t, content)
	m := mem
	if err := m.MapFile(0x1001, f, 0, 4096); err == nil {
		t.Error("unaligned gpa accepted")
	}
	if err := m.MapFile(3*mib, f, 0, 2*mib); err == nil {
		t.Error("range past guest RAM accepted")
	}
	if err := m.MapFile(1*mib, f, 0, 8192); err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 8192)
	mem.ReadAt(b, 1*mib)
	if !bytes.Equal(b, content) {
		t.Error("mapped pages do not show the file")
	}
}

func TestInitrdFileIsMapped(t *testing.T) {
	mem := newMem(t, 64*mib)
	k := linuxboottest.ELFPageAligned(16*mib, linuxboottest.Segment{Paddr: 16 * mib, Vaddr: 16 * mib, Data: bytes.Repeat([]byte{0x90}, 8192)})
	kf := writeTemp(t, k)
	initrd := make([]byte, 3*4096+100) // whole pages mapped, the tail copied
	for i := range initrd {
		initrd[i] = byte(i * 7)
	}
	inf := writeTemp(t, initrd)
	mapper := &recordingMapper{t: t, mem: mem}
	l, err := LoadELF(mem, kf, int64(len(k)), Config{InitrdFile: inf, Mapper: mapper})
	if err != nil {
		t.Fatal(err)
	}
	if l.InitrdSize != uint64(len(initrd)) || l.InitrdAddr%4096 != 0 {
		t.Fatalf("initrd at %#x size %d", l.InitrdAddr, l.InitrdSize)
	}
	got := make([]byte, len(initrd))
	if err := mem.ReadAt(got, l.InitrdAddr); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, initrd) {
		t.Fatal("the guest does not see the initramfs file's bytes")
	}
	var mappedInitrd bool
	for _, c := range mapper.calls {
		if c[0] == l.InitrdAddr && c[2] == 3*4096 {
			mappedInitrd = true
		}
	}
	if !mappedInitrd {
		t.Fatalf("initramfs pages were copied, not mapped: calls %v", mapper.calls)
	}
	if _, err := LoadELF(mem, kf, int64(len(k)), Config{Initrd: initrd, InitrdFile: inf}); err == nil {
		t.Fatal("both Initrd and InitrdFile accepted")
	}
}
