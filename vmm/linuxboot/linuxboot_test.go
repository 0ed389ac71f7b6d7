package linuxboot

import (
	"bytes"
	"encoding/binary"
	"errors"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/gosandbox/sandbox/vmm/guestmem"
)

const (
	mib = 1 << 20
	gib = 1 << 30
)

func readZP(t *testing.T, m *guestmem.Memory) []byte {
	t.Helper()
	zp := make([]byte, ZeroPageSize)
	if err := m.ReadAt(zp, ZeroPageAddr); err != nil {
		t.Fatal(err)
	}
	return zp
}

func TestLoadELFZeroPageOffsets(t *testing.T) {
	m := newMem(t, 256*mib)
	// Dirty the bss range first: the loader must clear it.
	junk := bytes.Repeat([]byte{0xee}, 0x3000)
	if err := m.WriteAt(junk, 0x1200000); err != nil {
		t.Fatal(err)
	}
	k := testKernel()
	initrd := bytes.Repeat([]byte("initrd!"), 1000)
	l, err := LoadELF(m, bytes.NewReader(k), int64(len(k)), Config{Cmdline: "console=ttyS0 quiet", Initrd: initrd})
	if err != nil {
		t.Fatal(err)
	}
	if l.Entry != 0x1000000 || l.BootParams != ZeroPageAddr || l.KernelStart != 0x1000000 || l.KernelEnd != 0x1203000 {
		t.Fatalf("loaded = %+v", l)
	}
	wantInitrd := uint64(256*mib-len(initrd)) &^ 0xfff
	if l.InitrdAddr != wantInitrd || l.InitrdSize != uint64(len(initrd)) {
		t.Fatalf("initrd at %#x+%#x, want %#x", l.InitrdAddr, l.InitrdSize, wantInitrd)
	}

	le := binary.LittleEndian
	zp := readZP(t, m)
	u16 := func(off int) uint16 { return le.Uint16(zp[off:]) }
	u32 := func(off int) uint32 { return le.Uint32(zp[off:]) }
	checks := []struct {
		name string
		off  int
		got  uint64
		want uint64
	}{
		{"boot_flag", 0x1fe, uint64(u16(0x1fe)), 0xaa55},
		{"header", 0x202, uint64(u32(0x202)), 0x53726448},
		{"version", 0x206, uint64(u16(0x206)), DefaultProtocol},
		{"vid_mode", 0x1fa, uint64(u16(0x1fa)), 0xffff},
		{"type_of_loader", 0x210, uint64(zp[0x210]), 0xff},
		{"loadflags", 0x211, uint64(zp[0x211]), 0x81},
		{"ramdisk_image", 0x218, uint64(u32(0x218)), wantInitrd},
		{"ramdisk_size", 0x21c, uint64(u32(0x21c)), uint64(len(initrd))},
		{"heap_end_ptr", 0x224, uint64(u16(0x224)), 0xfe00},
		{"cmd_line_ptr", 0x228, uint64(u32(0x228)), 0x20000},
		{"initrd_addr_max", 0x22c, uint64(u32(0x22c)), 0x7fffffff},
		{"xloadflags", 0x236, uint64(u16(0x236)), 1},
		{"cmdline_size", 0x238, uint64(u32(0x238)), 2047},
		{"ext_ramdisk_image", 0x0c0, uint64(u32(0x0c0)), 0},
		{"ext_ramdisk_size", 0x0c4, uint64(u32(0x0c4)), 0},
		{"ext_cmd_line_ptr", 0x0c8, uint64(u32(0x0c8)), 0},
		{"sentinel", 0x1ef, uint64(zp[0x1ef]), 0},
		{"e820_entries", 0x1e8, uint64(zp[0x1e8]), 3},
		{"e820[0].addr", 0x2d0, le.Uint64(zp[0x2d0:]), 0},
		{"e820[0].size", 0x2d8, le.Uint64(zp[0x2d8:]), 0x9fc00},
		{"e820[0].type", 0x2e0, uint64(u32(0x2e0)), 1},
		{"e820[1].addr", 0x2e4, le.Uint64(zp[0x2e4:]), 0x9fc00},
		{"e820[1].size", 0x2ec, le.Uint64(zp[0x2ec:]), 0x100000 - 0x9fc00},
		{"e820[1].type", 0x2f4, uint64(u32(0x2f4)), 2},
		{"e820[2].addr", 0x2f8, le.Uint64(zp[0x2f8:]), 0x100000},
		{"e820[2].size", 0x300, le.Uint64(zp[0x300:]), 256*mib - 0x100000},
		{"e820[2].type", 0x308, uint64(u32(0x308)), 1},
		{"e820[3] (unused)", 0x30c, le.Uint64(zp[0x30c:]), 0},
	}
	for _, c := range checks {
		if c.got != c.want {
			t.Errorf("%s at %#x = %#x, want %#x", c.name, c.off, c.got, c.want)
		}
	}

	cl := make([]byte, 21)
	m.ReadAt(cl, CmdlineAddr)
	if string(cl) != "console=ttyS0 quiet\x00\x00" {
		t.Errorf("command line in memory = %q", cl)
	}
	text := make([]byte, 4096)
	m.ReadAt(text, 0x1000000)
	if !bytes.Equal(text, k[elfHeaderSize+3*elfPhdrSize:][:4096]) {
		t.Error("text segment not loaded at its p_paddr")
	}
	data := make([]byte, 0x3000)
	m.ReadAt(data, 0x1200000)
	if !bytes.Equal(data[:512], bytes.Repeat([]byte{0xd0}, 512)) || !bytes.Equal(data[512:], make([]byte, 0x3000-512)) {
		t.Error("data segment not loaded or bss not cleared")
	}
	got := make([]byte, len(initrd))
	m.ReadAt(got, l.InitrdAddr)
	if !bytes.Equal(got, initrd) {
		t.Error("initrd not in memory at InitrdAddr")
	}
}

func TestLoadELFCopiesSetupHeader(t *testing.T) {
	m := newMem(t, 64*mib)
	z, err := ParseBzImage(makeBzImage(compress(t, Zstd, testKernel())))
	if err != nil {
		t.Fatal(err)
	}
	k := testKernel()
	if _, err := LoadELF(m, bytes.NewReader(k), int64(len(k)), Config{Cmdline: "x", SetupHeader: z.Header.Raw}); err != nil {
		t.Fatal(err)
	}
	zp := readZP(t, m)
	le := binary.LittleEndian
	if v := le.Uint32(zp[0x238:]); v != 2047 {
		t.Errorf("cmdline_size = %d, want the kernel's 2047", v)
	}
	if v := le.Uint32(zp[0x230:]); v != 0x200000 {
		t.Errorf("kernel_alignment = %#x, want the kernel's 0x200000", v)
	}
	if v := le.Uint16(zp[0x236:]); v != 3 {
		t.Errorf("xloadflags = %#x, want the kernel's 3", v)
	}
	if zp[0x210] != 0xff || zp[0x211] != 0x81 {
		t.Errorf("type_of_loader/loadflags = %#x/%#x", zp[0x210], zp[0x211])
	}
}

func TestE820(t *testing.T) {
	cases := []struct {
		size uint64
		want []E820Entry
	}{
		{256 * mib, []E820Entry{
			{0, 0x9fc00, E820RAM},
			{0x9fc00, 0x60400, E820Reserved},
			{0x100000, 256*mib - 0x100000, E820RAM},
		}},
		{5 * gib, []E820Entry{
			{0, 0x9fc00, E820RAM},
			{0x9fc00, 0x60400, E820Reserved},
			{0x100000, 3*gib - 0x100000, E820RAM},
			{4 * gib, 2 * gib, E820RAM},
		}},
		{512 * 1024, []E820Entry{
			{0, 512 * 1024, E820RAM},
			{0x9fc00, 0x60400, E820Reserved},
		}},
	}
	for _, c := range cases {
		if got := E820(guestmem.Layout(c.size)); !reflect.DeepEqual(got, c.want) {
			t.Errorf("E820(%#x) = %+v, want %+v", c.size, got, c.want)
		}
	}
}

func TestLoadELF5GiB(t *testing.T) {
	m := newMem(t, 5*gib)
	k := testKernel()
	initrd := make([]byte, 3*4096+5)
	l, err := LoadELF(m, bytes.NewReader(k), int64(len(k)), Config{Initrd: initrd,
		ExtraE820: []E820Entry{{0xe0000000, 0x10000000, E820Reserved}}})
	if err != nil {
		t.Fatal(err)
	}
	// initrd_addr_max (2 GiB - 1) is below the 3 GiB end of low RAM.
	if want := uint64(2*gib-len(initrd)) &^ 0xfff; l.InitrdAddr != want {
		t.Errorf("initrd at %#x, want %#x", l.InitrdAddr, want)
	}
	zp := readZP(t, m)
	if zp[0x1e8] != 5 {
		t.Fatalf("e820_entries = %d, want 5", zp[0x1e8])
	}
	le := binary.LittleEndian
	e3 := zp[0x2d0+3*20:]
	if le.Uint64(e3) != 4*gib || le.Uint64(e3[8:]) != 2*gib || le.Uint32(e3[16:]) != 1 {
		t.Errorf("e820[3] = % x, want RAM [4 GiB, +2 GiB)", e3[:20])
	}
	e4 := zp[0x2d0+4*20:]
	if le.Uint64(e4) != 0xe0000000 || le.Uint32(e4[16:]) != 2 {
		t.Errorf("e820[4] = % x, want the extra reserved entry", e4[:20])
	}
}

func hdrWithInitrdMax(t *testing.T, max uint32) []byte {
	z, err := ParseBzImage(makeBzImage(compress(t, Zstd, testKernel())))
	if err != nil {
		t.Fatal(err)
	}
	h := append([]byte(nil), z.Header.Raw...)
	binary.LittleEndian.PutUint32(h[offInitrdAddrMax-offSetupSects:], max)
	return h
}

func TestInitrdPlacement(t *testing.T) {
	k := testKernel() // occupies [16 MiB, 0x1203000)
	regions := guestmem.Layout(256 * mib)
	cases := []struct {
		name     string
		size     uint64
		max      uint32
		want     uint64
		tooLarge bool
	}{
		{"top of RAM", 10000, 0x7fffffff, (256*mib - 10000) &^ 0xfff, false},
		{"below initrd_addr_max", 4096, 64*mib - 1, 64*mib - 4096, false},
		{"odd max rounds down", 4096, 64*mib + 100, 64*mib - 4096, false},
		{"below the kernel when it would overlap", 2 * mib, 0x1100000 - 1, 0x1000000 - 2*mib, false},
		{"no room", 300 * mib, 0x7fffffff, 0, true},
		{"no room below max", 20 * mib, 0x1100000 - 1, 0, true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p, err := planBoot(regions, 0x1000000, 0x1203000, Config{Initrd: make([]byte, c.size), SetupHeader: hdrWithInitrdMax(t, c.max)}, 0)
			if c.tooLarge {
				var ie *InitrdError
				if !errors.Is(err, ErrInitrdTooLarge) || !errors.As(err, &ie) {
					t.Fatalf("err = %v, want ErrInitrdTooLarge", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if p.initrdAddr != c.want {
				t.Fatalf("initrd at %#x, want %#x", p.initrdAddr, c.want)
			}
			end := p.initrdAddr + c.size
			if p.initrdAddr%4096 != 0 || end-1 > uint64(c.max) || (p.initrdAddr < 0x1203000 && end > 0x1000000) {
				t.Fatalf("initrd [%#x, %#x) misplaced", p.initrdAddr, end)
			}
		})
	}
	_ = k
}

func TestCmdline(t *testing.T) {
	regions := guestmem.Layout(64 * mib)
	if _, err := planBoot(regions, 16*mib, 17*mib, Config{Cmdline: strings.Repeat("a", 2047)}, 0); err != nil {
		t.Fatalf("2047 bytes with the default cmdline_size: %v", err)
	}
	_, err := planBoot(regions, 16*mib, 17*mib, Config{Cmdline: strings.Repeat("a", 2048)}, 0)
	var ce *CmdlineError
	if !errors.Is(err, ErrCmdlineTooLong) || !errors.As(err, &ce) || ce.Max != 2047 || ce.Len != 2048 {
		t.Fatalf("2048 bytes: err = %v, want *CmdlineError{2048, 2047}", err)
	}
	// A kernel header's own limit applies.
	h := hdrWithInitrdMax(t, 0x7fffffff)
	binary.LittleEndian.PutUint32(h[offCmdlineSize-offSetupSects:], 100)
	if _, err := planBoot(regions, 16*mib, 17*mib, Config{Cmdline: strings.Repeat("a", 100), SetupHeader: h}, 0); err != nil {
		t.Fatalf("100 bytes with cmdline_size 100: %v", err)
	}
	if _, err := planBoot(regions, 16*mib, 17*mib, Config{Cmdline: strings.Repeat("a", 101), SetupHeader: h}, 0); !errors.Is(err, ErrCmdlineTooLong) {
		t.Fatalf("101 bytes with cmdline_size 100: err = %v", err)
	}
	if _, err := planBoot(regions, 16*mib, 17*mib, Config{Cmdline: "a\x00b"}, 0); !errors.Is(err, ErrFormat) {
		t.Fatalf("NUL in command line: err = %v", err)
	}
}

func TestCompressionRoundTrip(t *testing.T) {
	k := testKernel()
	// The kernel appends relocations after the ELF; Vmlinux keeps them.
	relocs := make([]byte, 5000)
	rand.New(rand.NewSource(1)).Read(relocs)
	want := append(append([]byte(nil), k...), relocs...)
	for _, c := range []Compression{Zstd, Gzip, XZ, LZ4, LZMA} {
		t.Run(string(c), func(t *testing.T) {
			img := makeBzImage(compress(t, c, want))
			z, err := ParseBzImage(img)
			if err != nil {
				t.Fatal(err)
			}
			if z.Compression() != c {
				t.Fatalf("detected %s", z.Compression())
			}
			got, err := z.Vmlinux()
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("round trip: %d bytes, want %d", len(got), len(want))
			}
			m := newMem(t, 64*mib)
			if _, err := LoadELF(m, bytes.NewReader(got), int64(len(got)), Config{SetupHeader: z.Header.Raw}); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func TestDecompressLimits(t *testing.T) {
	zeros := make([]byte, 8*mib)
	t.Run("bomb", func(t *testing.T) {
		// 8 MiB of output from a payload that declares 4 KiB.
		for _, c := range []Compression{Zstd, Gzip, XZ, LZ4} {
			p := compress(t, c, zeros)
			binary.LittleEndian.PutUint32(p[len(p)-4:], 4096)
			if _, err := Decompress(p, MaxVmlinuxSize); !errors.Is(err, ErrTooLarge) || !errors.Is(err, ErrFormat) {
				t.Errorf("%s: err = %v, want ErrTooLarge", c, err)
			}
		}
	})
	t.Run("declared over limit", func(t *testing.T) {
		z, err := ParseBzImage(makeBzImage(compress(t, Zstd, zeros)))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := z.VmlinuxLimit(1 * mib); !errors.Is(err, ErrTooLarge) {
			t.Fatalf("err = %v, want ErrTooLarge", err)
		}
	})
	t.Run("short output", func(t *testing.T) {
		p := compress(t, Gzip, zeros[:1000])
		binary.LittleEndian.PutUint32(p[len(p)-4:], 2000)
		if _, err := Decompress(p, MaxVmlinuxSize); !errors.Is(err, ErrFormat) || errors.Is(err, ErrTooLarge) {
			t.Fatalf("err = %v, want a size mismatch", err)
		}
	})
	t.Run("not ELF", func(t *testing.T) {
		z, err := ParseBzImage(makeBzImage(compress(t, Zstd, zeros[:4096])))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := z.Vmlinux(); !errors.Is(err, ErrFormat) {
			t.Fatalf("err = %v, want ErrFormat", err)
		}
	})
	t.Run("unknown and lzo", func(t *testing.T) {
		for _, p := range [][]byte{sizeAppend([]byte("nonsense stream"), 10), sizeAppend([]byte("\x89LZO\x00\r\n\x1a\n"), 10)} {
			if _, err := Decompress(p, MaxVmlinuxSize); !errors.Is(err, ErrUnsupported) {
				t.Errorf("err = %v, want ErrUnsupported", err)
			}
		}
	})
	t.Run("corrupt", func(t *testing.T) {
		p := compress(t, Zstd, testKernel())
		for i := 10; i < len(p)-4; i += 7 {
			p[i] ^= 0x5a
		}
		if _, err := Decompress(p, MaxVmlinuxSize); !errors.Is(err, ErrFormat) {
			t.Fatalf("err = %v, want ErrFormat", err)
		}
	})
}

func TestParseBzImageHostile(t *testing.T) {
	good := makeBzImage(compress(t, Zstd, testKernel()))
	le := binary.LittleEndian
	cases := []struct {
		name   string
		mutate func([]byte) []byte
		want   error
	}{
		{"truncated", func(b []byte) []byte { return b[:0x200] }, ErrFormat},
		{"empty", func(b []byte) []byte { return nil }, ErrFormat},
		{"bad boot_flag", func(b []byte) []byte { b[offBootFlag] = 0; return b }, ErrFormat},
		{"bad HdrS", func(b []byte) []byte { b[offHeader] = 'X'; return b }, ErrFormat},
		{"old protocol", func(b []byte) []byte { le.PutUint16(b[offVersion:], 0x020a); return b }, ErrUnsupported},
		{"32-bit only", func(b []byte) []byte { le.PutUint16(b[offXLoadFlags:], 0); return b }, ErrUnsupported},
		{"zImage", func(b []byte) []byte { b[offLoadFlags] = 0; return b }, ErrUnsupported},
		{"setup_sects past end", func(b []byte) []byte { b[offSetupSects] = 0xff; return b }, ErrFormat},
		{"payload past end", func(b []byte) []byte { le.PutUint32(b[offPayloadLength:], 1<<31); return b }, ErrFormat},
		{"payload offset overflow", func(b []byte) []byte { le.PutUint32(b[offPayloadOffset:], 0xffffffff); return b }, ErrFormat},
		{"short header", func(b []byte) []byte { b[offJump+1] = 0x10; return b }, ErrFormat},
		{"bad alignment", func(b []byte) []byte { le.PutUint32(b[offKernelAlign:], 0x300000); return b }, ErrFormat},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			b := c.mutate(append([]byte(nil), good...))
			z, err := ParseBzImage(b)
			var fe *FormatError
			if z != nil || !errors.Is(err, c.want) || !errors.As(err, &fe) {
				t.Fatalf("ParseBzImage = %v, %v; want %v", z, err, c.want)
			}
		})
	}
}

func TestLoadELFHostile(t *testing.T) {
	m := newMem(t, 64*mib)
	le := binary.LittleEndian
	good := testKernel()
	ph := func(b []byte, i, field int) []byte { return b[elfHeaderSize+i*elfPhdrSize+field:] }
	cases := []struct {
		name string
		elf  func() []byte
		want error
	}{
		{"empty", func() []byte { return nil }, ErrFormat},
		{"truncated header", func() []byte { return good[:40] }, ErrFormat},
		{"truncated segment", func() []byte { return good[:len(good)-100] }, ErrFormat},
		{"bad magic", func() []byte { b := clone(good); b[1] = 'X'; return b }, ErrFormat},
		{"32-bit", func() []byte { b := clone(good); b[4] = 1; return b }, ErrUnsupported},
		{"big-endian", func() []byte { b := clone(good); b[5] = 2; return b }, ErrUnsupported},
		{"arm64", func() []byte { b := clone(good); le.PutUint16(b[18:], 183); return b }, ErrUnsupported},
		{"relocatable object", func() []byte { b := clone(good); le.PutUint16(b[16:], 1); return b }, ErrUnsupported},
		{"phentsize", func() []byte { b := clone(good); le.PutUint16(b[54:], 32); return b }, ErrFormat},
		{"no phdrs", func() []byte { b := clone(good); le.PutUint16(b[56:], 0); return b }, ErrFormat},
		{"too many phdrs", func() []byte { b := clone(good); le.PutUint16(b[56:], 0xffff); return b }, ErrFormat},
		{"phoff past end", func() []byte { b := clone(good); le.PutUint64(b[32:], 1<<62); return b }, ErrFormat},
		{"filesz > memsz", func() []byte { b := clone(good); le.PutUint64(ph(b, 1, 40), 10); return b }, ErrFormat},
		{"offset overflow", func() []byte { b := clone(good); le.PutUint64(ph(b, 0, 8), ^uint64(0)-10); return b }, ErrFormat},
		{"paddr overflow", func() []byte { b := clone(good); le.PutUint64(ph(b, 1, 24), ^uint64(0)-100); return b }, ErrFormat},
		{"huge memsz", func() []byte { b := clone(good); le.PutUint64(ph(b, 1, 40), 1<<40); return b }, ErrTooLarge},
		{"overlap", func() []byte { b := clone(good); le.PutUint64(ph(b, 1, 24), 0x1000800); return b }, ErrFormat},
		{"outside RAM", func() []byte { b := clone(good); le.PutUint64(ph(b, 1, 24), 64*mib-0x1000); return b }, ErrOutsideRAM},
		{"in the MMIO hole", func() []byte { b := clone(good); le.PutUint64(ph(b, 1, 24), 3*gib+4096); return b }, ErrOutsideRAM},
		{"below 1 MiB", func() []byte { b := clone(good); le.PutUint64(ph(b, 1, 24), 0x7000); return b }, ErrOutsideRAM},
		{"entry outside", func() []byte { b := clone(good); le.PutUint64(b[24:], 0x500); return b }, ErrFormat},
		{"no PT_LOAD", func() []byte { return makeELF(0x1000000) }, ErrFormat},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			b := c.elf()
			l, err := LoadELF(m, bytes.NewReader(b), int64(len(b)), Config{})
			if l != nil || !errors.Is(err, c.want) {
				t.Fatalf("LoadELF = %+v, %v; want %v", l, err, c.want)
			}
		})
	}
}

func clone(b []byte) []byte { return append([]byte(nil), b...) }

func TestVirtualEntry(t *testing.T) {
	k := makeELF(0xffffffff81000010, testSeg{Paddr: 0x1000000, Vaddr: 0xffffffff81000000, Data: make([]byte, 64)})
	m := newMem(t, 32*mib)
	l, err := LoadELF(m, bytes.NewReader(k), int64(len(k)), Config{})
	if err != nil {
		t.Fatal(err)
	}
	if l.Entry != 0x1000010 {
		t.Fatalf("entry %#x, want the physical 0x1000010", l.Entry)
	}
}

func TestLoadBzImage(t *testing.T) {
	img := makeBzImage(compress(t, Gzip, testKernel()))
	z, err := ParseBzImage(img)
	if err != nil {
		t.Fatal(err)
	}
	m := newMem(t, 64*mib)
	l, err := LoadBzImage(m, z, Config{Cmdline: "console=ttyS0", Initrd: []byte("cpio")})
	if err != nil {
		t.Fatal(err)
	}
	if l.Entry != 0x100200 || l.KernelStart != 0x100000 || l.KernelEnd != 0x1000000+0x400000 {
		t.Fatalf("loaded = %+v", l)
	}
	pm := make([]byte, len(z.ProtectedMode()))
	m.ReadAt(pm, 0x100000)
	if !bytes.Equal(pm, z.ProtectedMode()) {
		t.Fatal("protected-mode code not at 1 MiB")
	}
	zp := readZP(t, m)
	if v := binary.LittleEndian.Uint32(zp[0x214:]); v != 0x100000 {
		t.Errorf("code32_start = %#x", v)
	}
	if v := binary.LittleEndian.Uint32(zp[0x260:]); v != 0x400000 {
		t.Errorf("init_size = %#x, want the image's", v)
	}
	if _, err := LoadBzImage(newMem(t, 16*mib), z, Config{}); !errors.Is(err, ErrOutsideRAM) {
		t.Fatalf("16 MiB guest: err = %v, want ErrOutsideRAM", err)
	}
}

// realKernel returns the default kernel's bzImage from the Go module cache,
// or skips.
func realKernel(tb testing.TB) []byte {
	tb.Helper()
	dir := os.Getenv("GOMODCACHE")
	if dir == "" {
		home, _ := os.UserHomeDir()
		dir = filepath.Join(home, "go", "pkg", "mod")
	}
	b, err := os.ReadFile(filepath.Join(dir, "github.com/gokrazy/kernel.amd64@v0.0.0-20260705070735-de680abf072b/vmlinuz"))
	if err != nil {
		tb.Skipf("default kernel not in the module cache: %v", err)
	}
	return b
}

func TestRealKernel(t *testing.T) {
	b := realKernel(t)
	z, err := ParseBzImage(b)
	if err != nil {
		t.Fatal(err)
	}
	if z.Compression() != Zstd || z.Header.Version < 0x020f {
		t.Fatalf("compression %s, version %#x", z.Compression(), z.Header.Version)
	}
	v, err := z.Vmlinux()
	if err != nil {
		t.Fatal(err)
	}
	m := newMem(t, 256*mib)
	l, err := LoadELF(m, bytes.NewReader(v), int64(len(v)), Config{Cmdline: "console=ttyS0", SetupHeader: z.Header.Raw, Initrd: make([]byte, 1*mib)})
	if err != nil {
		t.Fatal(err)
	}
	// startup_64 begins with "mov %rsi, %r15".
	ins := make([]byte, 3)
	m.ReadAt(ins, l.Entry)
	if !bytes.Equal(ins, []byte{0x49, 0x89, 0xf7}) {
		t.Fatalf("bytes at entry %#x = % x, want startup_64's mov %%rsi,%%r15", l.Entry, ins)
	}
	if l.KernelStart != 0x1000000 || l.InitrdAddr < l.KernelEnd {
		t.Fatalf("loaded = %+v", l)
	}
}

func BenchmarkDecompressZstd(b *testing.B) {
	data := realKernel(b)
	z, err := ParseBzImage(data)
	if err != nil {
		b.Fatal(err)
	}
	b.SetBytes(int64(len(z.Payload())))
	for b.Loop() {
		if _, err := z.Vmlinux(); err != nil {
			b.Fatal(err)
		}
	}
}

// TestKernelStyleCLI compresses with the command-line tools the kernel build
// uses (same flags as scripts/Makefile.lib), when they are installed.
func TestKernelStyleCLI(t *testing.T) {
	want := append(testKernel(), make([]byte, 3000)...)
	// Real x86 code, full of E8/E9 branches for the BCJ filter: this test
	// binary's first 128 KiB.
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	exe, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	want = append(want, exe[:min(len(exe), 128<<10)]...)
	cases := []struct {
		tool string
		args []string
		c    Compression
		err  error
	}{
		{"xz", []string{"--check=crc32", "--x86", "--lzma2=dict=32MiB", "-c"}, XZ, nil},
		{"xz", []string{"--check=crc64", "--x86", "--lzma2", "-c"}, XZ, nil},
		{"xz", []string{"--check=sha256", "--x86=start=4096", "--lzma2", "-c"}, XZ, nil},
		{"xz", []string{"--check=none", "-T2", "--block-size=16384", "--x86", "--lzma2", "-c"}, XZ, nil},
		{"xz", []string{"--check=crc32", "--delta", "--lzma2", "-c"}, XZ, ErrUnsupported},
		{"xz", []string{"--check=crc32", "--lzma2=dict=32MiB", "-c"}, XZ, nil},
		{"lzma", []string{"-9", "-c"}, LZMA, nil},
		{"bzip2", []string{"-9", "-c"}, Bzip2, nil},
		{"gzip", []string{"-n", "-9", "-c"}, Gzip, nil},
		{"zstd", []string{"-22", "--ultra", "-c", "-q"}, Zstd, nil},
		{"lz4", []string{"-l", "-9", "-c"}, LZ4, nil},
	}
	for _, c := range cases {
		t.Run(c.tool+strings.Join(c.args, ""), func(t *testing.T) {
			path, err := exec.LookPath(c.tool)
			if err != nil {
				t.Skipf("%s not installed", c.tool)
			}
			cmd := exec.Command(path, c.args...)
			cmd.Stdin = bytes.NewReader(want)
			out, err := cmd.Output()
			if err != nil {
				t.Fatal(err)
			}
			p := sizeAppend(out, len(want))
			if DetectCompression(p) != c.c {
				t.Fatalf("detected %s, want %s", DetectCompression(p), c.c)
			}
			got, err := Decompress(p, MaxVmlinuxSize)
			if c.err != nil {
				if !errors.Is(err, c.err) {
					t.Fatalf("err = %v, want %v", err, c.err)
				}
				return
			}
			if err != nil || !bytes.Equal(got, want) {
				t.Fatalf("round trip: %d bytes, err %v", len(got), err)
			}
		})
	}
}

// BenchmarkLoadELFReal loads the default kernel's vmlinux into fresh guest
// memory (page faults included), as every boot does.
func BenchmarkLoadELFReal(b *testing.B) {
	z, err := ParseBzImage(realKernel(b))
	if err != nil {
		b.Fatal(err)
	}
	v, err := z.Vmlinux()
	if err != nil {
		b.Fatal(err)
	}
	cfg := Config{Cmdline: "console=ttyS0", SetupHeader: z.Header.Raw}
	b.SetBytes(int64(len(v)))
	for b.Loop() {
		m, err := guestmem.New(256 * mib)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := LoadELF(m, bytes.NewReader(v), int64(len(v)), cfg); err != nil {
			b.Fatal(err)
		}
		m.Close()
	}
}

// BenchmarkBootParams is the cost of everything but the kernel copy.
func BenchmarkBootParams(b *testing.B) {
	regions := guestmem.Layout(5 * gib)
	initrd := make([]byte, 4*mib)
	for b.Loop() {
		if _, err := planBoot(regions, 16*mib, 80*mib, Config{Cmdline: "console=ttyS0 quiet", Initrd: initrd}, 0); err != nil {
			b.Fatal(err)
		}
	}
}
