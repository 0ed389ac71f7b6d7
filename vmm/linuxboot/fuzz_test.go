package linuxboot

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/gosandbox/sandbox/vmm/guestmem"
	"github.com/gosandbox/sandbox/vmm/linuxboot/linuxboottest"
)

// typed reports whether err is one of the package's typed errors.
func typed(err error) bool {
	return errors.Is(err, ErrFormat) || errors.Is(err, ErrCmdlineTooLong) || errors.Is(err, ErrInitrdTooLarge)
}

func FuzzParseBzImage(f *testing.F) {
	for _, c := range []Compression{Zstd, Gzip, XZ, LZ4, LZMA} {
		f.Add(makeBzImage(compress(f, c, testKernel())))
	}
	f.Add(makeBzImage(sizeAppend([]byte("\x28\xb5\x2f\xfd garbage"), 100)))
	if real := realKernelSeed(); real != nil {
		f.Add(real)
	}
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		z, err := ParseBzImage(b)
		if err != nil {
			if !errors.Is(err, ErrFormat) {
				t.Fatalf("untyped error %v", err)
			}
			return
		}
		if len(z.Header.Raw) < setupHeaderMin-offSetupSects || len(z.Payload()) != int(z.Header.PayloadLength) {
			t.Fatalf("inconsistent header %+v", z.Header)
		}
		v, err := z.VmlinuxLimit(4 << 20)
		if err != nil {
			if !errors.Is(err, ErrFormat) {
				t.Fatalf("untyped error %v", err)
			}
			return
		}
		if len(v) > 4<<20 || !IsELF(v) {
			t.Fatalf("Vmlinux returned %d bytes", len(v))
		}
	})
}

func FuzzLoadELF(f *testing.F) {
	f.Add(testKernel())
	f.Add(makeELF(0xffffffff81000010, testSeg{Paddr: 0x1000000, Vaddr: 0xffffffff81000000, Data: make([]byte, 64)}))
	f.Add(makeELF(0x100000, testSeg{Paddr: 0x100000, Data: []byte{1, 2, 3}, Memsz: 1 << 20}, testSeg{Paddr: 0x300000, Data: []byte{4}}))
	f.Add([]byte("\x7fELF"))
	if real := realKernelSeed(); real != nil {
		// The real vmlinux's ELF and program headers, its segments cut off.
		if z, err := ParseBzImage(real); err == nil {
			if v, err := z.Vmlinux(); err == nil {
				f.Add(v[:elfHeaderSize+3*elfPhdrSize])
			}
		}
	}
	mem, err := guestmem.New(32 << 20)
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { mem.Close() })
	f.Fuzz(func(t *testing.T, b []byte) {
		l, err := LoadELF(mem, bytes.NewReader(b), int64(len(b)), Config{Cmdline: "console=ttyS0", Initrd: []byte("07070")})
		if err != nil {
			if !typed(err) {
				t.Fatalf("untyped error %v", err)
			}
			return
		}
		if l.KernelStart < HighMemStart || l.KernelEnd > mem.End() || l.Entry < l.KernelStart || l.Entry >= l.KernelEnd {
			t.Fatalf("loaded outside the checked range: %+v", l)
		}
		if l.InitrdAddr < l.KernelEnd && l.InitrdAddr+l.InitrdSize > l.KernelStart {
			t.Fatalf("initrd overlaps the kernel: %+v", l)
		}
	})
}

func FuzzBootParams(f *testing.F) {
	z, err := ParseBzImage(makeBzImage(compress(f, Zstd, testKernel())))
	if err != nil {
		f.Fatal(err)
	}
	f.Add([]byte(nil), "console=ttyS0", uint32(256<<8), uint32(4096), uint64(16<<20), uint64(1<<20))
	f.Add(z.Header.Raw, "quiet", uint32(5<<18), uint32(1<<20), uint64(16<<20), uint64(40<<20))
	f.Add(z.Header.Raw, "", uint32(300), uint32(1<<30), uint64(1<<20), uint64(1<<30))
	f.Fuzz(func(t *testing.T, hdr []byte, cmdline string, pages uint32, initrd uint32, kStart, kLen uint64) {
		if len(hdr) == 0 {
			hdr = nil
		}
		if pages == 0 || initrd > 64<<20 {
			return
		}
		size := uint64(pages) * guestmem.PageSize
		regions := guestmem.Layout(min(size, guestmem.MaxSize))
		kEnd := kStart + kLen
		if kEnd < kStart {
			return
		}
		p, err := planBoot(regions, kStart, kEnd, Config{Cmdline: cmdline, SetupHeader: hdr, Initrd: make([]byte, initrd)}, 0)
		if err != nil {
			if !typed(err) {
				t.Fatalf("untyped error %v", err)
			}
			return
		}
		zp := p.zeroPage[:]
		le := binary.LittleEndian
		if le.Uint32(zp[offHeader:]) != hdrSMagic || le.Uint32(zp[offCmdLinePtr:]) != CmdlineAddr || zp[offTypeOfLoader] != 0xff {
			t.Fatal("zero page misses required fields")
		}
		if len(p.cmdline) != len(cmdline)+1 || len(p.cmdline) > CmdlineMax {
			t.Fatalf("command line of %d bytes", len(p.cmdline))
		}
		n := int(zp[offE820Entries])
		if n != len(p.e820) || n > MaxE820Entries {
			t.Fatalf("%d e820 entries, plan has %d", n, len(p.e820))
		}
		for i, e := range p.e820 {
			if i > 0 && e.Addr < p.e820[i-1].Addr+p.e820[i-1].Size {
				t.Fatalf("e820 not sorted or overlapping: %+v", p.e820)
			}
		}
		if initrd > 0 {
			a, end := p.initrdAddr, p.initrdAddr+uint64(initrd)
			if a < HighMemStart || a%guestmem.PageSize != 0 || end > regions[0].Size || (a < kEnd && end > kStart) {
				t.Fatalf("initrd [%#x, %#x) misplaced (RAM %#x, kernel [%#x, %#x))", a, end, regions[0].Size, kStart, kEnd)
			}
			if uint64(le.Uint32(zp[offRamdiskImage:]))|uint64(le.Uint32(zp[offExtRamdiskImage:]))<<32 != a {
				t.Fatal("ramdisk_image does not match the plan")
			}
		}
	})
}

// realKernelSeed returns the default kernel's real setup code and header
// with its 16 MB payload replaced by a small zstd one (the real file is
// not committed; it comes from the Go module cache when present), or nil.
func realKernelSeed() []byte {
	dir := os.Getenv("GOMODCACHE")
	if dir == "" {
		home, _ := os.UserHomeDir()
		dir = filepath.Join(home, "go", "pkg", "mod")
	}
	b, err := os.ReadFile(filepath.Join(dir, "github.com/gokrazy/kernel.amd64@v0.0.0-20260705070735-de680abf072b/vmlinuz"))
	if err != nil {
		return nil
	}
	z, err := ParseBzImage(b)
	if err != nil {
		return nil
	}
	payload, err := linuxboottest.Compress("zstd", testKernel())
	if err != nil {
		return nil
	}
	off := z.pmOff + int(z.Header.PayloadOffset)
	out := append(append([]byte(nil), b[:off]...), payload...)
	binary.LittleEndian.PutUint32(out[offPayloadLength:], uint32(len(payload)))
	return out
}

func FuzzDecompress(f *testing.F) {
	k := testKernel()
	for _, c := range []Compression{Zstd, Gzip, XZ, LZ4, LZMA} {
		f.Add(compress(f, c, k))
	}
	if xzPath, err := exec.LookPath("xz"); err == nil {
		// The kernel's own xz flavour: x86 BCJ, then LZMA2, CRC32 checks.
		cmd := exec.Command(xzPath, "--check=crc32", "--x86", "--lzma2", "-c")
		cmd.Stdin = bytes.NewReader(k)
		if out, err := cmd.Output(); err == nil {
			f.Add(sizeAppend(out, len(k)))
		}
	}
	f.Fuzz(func(t *testing.T, p []byte) {
		out, err := Decompress(p, 1<<20)
		if err != nil {
			if !errors.Is(err, ErrFormat) {
				t.Fatalf("untyped error %v", err)
			}
			return
		}
		if want := binary.LittleEndian.Uint32(p[len(p)-4:]); uint32(len(out)) != want || len(out) > 1<<20 {
			t.Fatalf("%d bytes out, declared %d", len(out), want)
		}
	})
}

func FuzzBCJ(f *testing.F) {
	f.Add([]byte{0xe8, 1, 2, 3, 0, 0xe9, 0xff, 0xff, 0xff, 0xff, 0x90, 0xe8, 0xe8, 0, 0, 0, 0xff}, uint32(0))
	f.Fuzz(func(t *testing.T, b []byte, start uint32) {
		n := len(b)
		bcjX86Decode(b, start)
		if len(b) != n {
			t.Fatal("length changed")
		}
	})
}
