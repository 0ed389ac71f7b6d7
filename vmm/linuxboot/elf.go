package linuxboot

import (
	"encoding/binary"
	"io"
	"sort"
)

// ELF64 constants (System V ABI, x86-64 supplement).
const (
	elfHeaderSize = 64
	elfPhdrSize   = 56
	elfClass64    = 2
	elfDataLSB    = 1
	elfVersion    = 1
	elfTypeExec   = 2
	elfMachineX86 = 62
	ptLoad        = 1

	// maxPhnum caps the program header count; a vmlinux has a handful.
	maxPhnum = 128
)

// Segment is one PT_LOAD segment of a vmlinux.
type Segment struct {
	Offset uint64 // file offset of the segment's bytes
	Paddr  uint64 // guest-physical load address
	Vaddr  uint64 // kernel virtual address
	Filesz uint64 // bytes copied from the file
	Memsz  uint64 // bytes occupied in memory; the rest is zeroed
}

// ELFImage is the parsed program-header view of a vmlinux.
type ELFImage struct {
	Entry    uint64    // e_entry as written in the file
	Segments []Segment // PT_LOAD segments with a non-zero size, sorted by Paddr
}

// ParseELF reads the ELF header and program headers of an x86-64 vmlinux of
// size bytes and validates its PT_LOAD segments (inside the file, p_filesz <=
// p_memsz, no address overflow, no overlaps, entry point inside a segment).
// It does not check the segments against guest memory; LoadELF does.
func ParseELF(r io.ReaderAt, size int64) (*ELFImage, error) { return parseELF(r, size) }

func parseELF(r io.ReaderAt, size int64) (*ELFImage, error) {
	const kind = "ELF"
	if size < elfHeaderSize {
		return nil, formatErr(kind, -1, nil, "file is %d bytes, too short for an ELF header", size)
	}
	var h [elfHeaderSize]byte
	if _, err := r.ReadAt(h[:], 0); err != nil {
		return nil, formatErr(kind, 0, err, "reading the ELF header")
	}
	le := binary.LittleEndian
	switch {
	case string(h[:4]) != "\x7fELF":
		return nil, formatErr(kind, 0, nil, "no ELF magic")
	case h[4] != elfClass64:
		return nil, formatErr(kind, 4, ErrUnsupported, "ELF class %d, want 64-bit (2)", h[4])
	case h[5] != elfDataLSB:
		return nil, formatErr(kind, 5, ErrUnsupported, "ELF data encoding %d, want little-endian (1)", h[5])
	case h[6] != elfVersion:
		return nil, formatErr(kind, 6, nil, "ELF version %d, want 1", h[6])
	case le.Uint16(h[16:]) != elfTypeExec:
		return nil, formatErr(kind, 16, ErrUnsupported, "ELF type %d, want an executable (2)", le.Uint16(h[16:]))
	case le.Uint16(h[18:]) != elfMachineX86:
		return nil, formatErr(kind, 18, ErrUnsupported, "ELF machine %d, want x86-64 (62)", le.Uint16(h[18:]))
	}
	entry := le.Uint64(h[24:])
	phoff := le.Uint64(h[32:])
	phentsize := le.Uint16(h[54:])
	phnum := le.Uint16(h[56:])
	if phentsize != elfPhdrSize {
		return nil, formatErr(kind, 54, nil, "e_phentsize %d, want %d", phentsize, elfPhdrSize)
	}
	if phnum == 0 || phnum > maxPhnum {
		return nil, formatErr(kind, 56, nil, "e_phnum %d, want 1 to %d", phnum, maxPhnum)
	}
	phlen := uint64(phnum) * elfPhdrSize
	if phoff > uint64(size) || phlen > uint64(size)-phoff {
		return nil, formatErr(kind, 32, nil, "program headers [%#x, +%#x) run past the end of the %d-byte file", phoff, phlen, size)
	}
	ph := make([]byte, phlen)
	if _, err := r.ReadAt(ph, int64(phoff)); err != nil {
		return nil, formatErr(kind, int64(phoff), err, "reading program headers")
	}
	img := &ELFImage{Entry: entry}
	for i := 0; i < int(phnum); i++ {
		p := ph[i*elfPhdrSize : (i+1)*elfPhdrSize]
		if le.Uint32(p[0:]) != ptLoad {
			continue
		}
		s := Segment{
			Offset: le.Uint64(p[8:]),
			Vaddr:  le.Uint64(p[16:]),
			Paddr:  le.Uint64(p[24:]),
			Filesz: le.Uint64(p[32:]),
			Memsz:  le.Uint64(p[40:]),
		}
		off := int64(phoff) + int64(i*elfPhdrSize)
		switch {
		case s.Filesz > s.Memsz:
			return nil, formatErr(kind, off, nil, "segment %d: p_filesz %#x > p_memsz %#x", i, s.Filesz, s.Memsz)
		case s.Offset > uint64(size) || s.Filesz > uint64(size)-s.Offset:
			return nil, formatErr(kind, off, nil, "segment %d: file bytes [%#x, +%#x) run past the end of the %d-byte file", i, s.Offset, s.Filesz, size)
		case s.Paddr+s.Memsz < s.Paddr:
			return nil, formatErr(kind, off, nil, "segment %d: p_paddr %#x + p_memsz %#x overflows", i, s.Paddr, s.Memsz)
		case s.Memsz > MaxVmlinuxSize:
			return nil, formatErr(kind, off, ErrTooLarge, "segment %d: p_memsz %#x is larger than %d bytes", i, s.Memsz, MaxVmlinuxSize)
		}
		if s.Memsz == 0 {
			continue
		}
		img.Segments = append(img.Segments, s)
	}
	if len(img.Segments) == 0 {
		return nil, formatErr(kind, -1, nil, "no loadable segments")
	}
	sort.Slice(img.Segments, func(i, j int) bool { return img.Segments[i].Paddr < img.Segments[j].Paddr })
	for i := 1; i < len(img.Segments); i++ {
		a, b := img.Segments[i-1], img.Segments[i]
		if a.Paddr+a.Memsz > b.Paddr {
			return nil, formatErr(kind, -1, nil, "segments at %#x (+%#x) and %#x overlap", a.Paddr, a.Memsz, b.Paddr)
		}
	}
	if _, ok := img.PhysEntry(); !ok {
		return nil, formatErr(kind, 24, nil, "entry point %#x lies in no loadable segment", entry)
	}
	return img, nil
}

// PhysEntry returns the guest-physical entry point: e_entry itself when it
// lies inside a segment's physical range (vmlinux links its entry as
// phys_startup_64), otherwise e_entry translated from a segment's virtual
// range to its physical one.
func (img *ELFImage) PhysEntry() (uint64, bool) {
	e := img.Entry
	for _, s := range img.Segments {
		if e >= s.Paddr && e-s.Paddr < s.Memsz {
			return e, true
		}
	}
	for _, s := range img.Segments {
		if e >= s.Vaddr && e-s.Vaddr < s.Memsz {
			return s.Paddr + (e - s.Vaddr), true
		}
	}
	return 0, false
}

// Start and End return the physical range [Start, End) the segments span.
func (img *ELFImage) Start() uint64 { return img.Segments[0].Paddr }

// End returns the first guest-physical address after the last segment.
func (img *ELFImage) End() uint64 {
	var end uint64
	for _, s := range img.Segments {
		end = max(end, s.Paddr+s.Memsz)
	}
	return end
}
