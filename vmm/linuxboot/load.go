package linuxboot

import (
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/gosandbox/sandbox/vmm/guestmem"
)

// LoadELF loads an uncompressed vmlinux (ELF64, x86-64) of size bytes: each
// PT_LOAD segment at its p_paddr (its bss zeroed), then the command line, the
// initramfs and the zero page. The returned Entry is startup_64's physical
// address, for the 64-bit boot protocol.
func LoadELF(mem *guestmem.Memory, vmlinux io.ReaderAt, size int64, cfg Config) (*Loaded, error) {
	img, err := parseELF(vmlinux, size)
	if err != nil {
		return nil, err
	}
	for _, s := range img.Segments {
		if s.Paddr < HighMemStart || !mem.Contains(s.Paddr, s.Memsz) {
			return nil, formatErr("ELF", -1, ErrOutsideRAM, "segment [%#x, +%#x) is not inside guest RAM at or above %#x (guest RAM ends at %#x)", s.Paddr, s.Memsz, HighMemStart, mem.End())
		}
	}
	entry, _ := img.PhysEntry()
	kStart, kEnd := img.Start(), img.End()
	plan, err := planBoot(mem.Regions(), kStart, kEnd, cfg, 0)
	if err != nil {
		return nil, err
	}
	file, _ := vmlinux.(*os.File)
	for _, s := range img.Segments {
		dst, err := mem.Slice(s.Paddr, s.Memsz)
		if err != nil {
			return nil, err
		}
		var mapped uint64
		if cfg.Mapper != nil && file != nil && s.Paddr%guestmem.PageSize == 0 && s.Offset%guestmem.PageSize == 0 {
			// Map whole pages of file bytes; the partial last page is
			// copied, so the bytes after p_filesz read as zero.
			if n := alignDown(s.Filesz, guestmem.PageSize); n > 0 {
				if err := cfg.Mapper.MapFile(s.Paddr, file, int64(s.Offset), n); err != nil {
					return nil, fmt.Errorf("linuxboot: map segment at %#x: %w", s.Paddr, err)
				}
				mapped = n
			}
		}
		rest := dst[mapped:s.Filesz]
		if n, err := vmlinux.ReadAt(rest, int64(s.Offset+mapped)); n != len(rest) {
			if err == nil || errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return nil, formatErr("ELF", int64(s.Offset), err, "reading segment at %#x", s.Paddr)
		}
		clear(dst[s.Filesz:])
	}
	if err := plan.write(mem, cfg); err != nil {
		return nil, err
	}
	return plan.loaded(entry, kStart, kEnd), nil
}

// LoadBzImage is the fallback path: it places the bzImage's protected-mode
// code at BzImageLoadAddr and enters it at startup_64 (BzImageLoadAddr +
// BzImageEntryOffset), so the kernel's own decompressor runs in the guest.
// The zero page carries the image's own setup header unless cfg.SetupHeader
// is set.
func LoadBzImage(mem *guestmem.Memory, z *BzImage, cfg Config) (*Loaded, error) {
	pm := z.ProtectedMode()
	kStart := uint64(BzImageLoadAddr)
	// The decompressor writes the kernel at max(load address aligned up,
	// pref_address) and needs init_size bytes there.
	align := uint64(max(z.Header.KernelAlignment, guestmem.PageSize))
	dest := max(alignUp(kStart, align), z.Header.PrefAddress)
	kEnd := max(kStart+uint64(len(pm)), dest+uint64(z.Header.InitSize))
	if kEnd < kStart || !mem.Contains(kStart, kEnd-kStart) {
		return nil, formatErr("bzImage", -1, ErrOutsideRAM, "kernel needs [%#x, %#x), guest RAM ends at %#x", kStart, kEnd, mem.End())
	}
	if cfg.SetupHeader == nil {
		cfg.SetupHeader = z.Header.Raw
	}
	plan, err := planBoot(mem.Regions(), kStart, kEnd, cfg, BzImageLoadAddr)
	if err != nil {
		return nil, err
	}
	if err := mem.WriteAt(pm, kStart); err != nil {
		return nil, err
	}
	if err := plan.write(mem, cfg); err != nil {
		return nil, err
	}
	return plan.loaded(kStart+BzImageEntryOffset, kStart, kEnd), nil
}

// IsELF reports whether b starts with the ELF magic number.
func IsELF(b []byte) bool { return len(b) >= 4 && string(b[:4]) == "\x7fELF" }

// IsBzImage reports whether b looks like a bzImage (boot_flag and "HdrS").
func IsBzImage(b []byte) bool {
	return len(b) >= offHeader+4 && b[offBootFlag] == 0x55 && b[offBootFlag+1] == 0xaa && string(b[offHeader:offHeader+4]) == "HdrS"
}
