package linuxboot

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/gosandbox/sandbox/vmm/guestmem"
)

// Guest-physical addresses the loader uses (see the package doc's layout
// table). The VMM must keep its own structures out of these ranges.
const (
	// ZeroPageAddr is where the zero page (struct boot_params) goes; RSI
	// must hold it at entry.
	ZeroPageAddr = 0x7000
	// ZeroPageSize is the size of the zero page.
	ZeroPageSize = 0x1000
	// CmdlineAddr is where the NUL-terminated command line goes.
	CmdlineAddr = 0x20000
	// CmdlineMax is the room reserved for the command line at CmdlineAddr,
	// terminating NUL included.
	CmdlineMax = 0x10000
	// EBDAStart is the start of the range [EBDAStart, HighMemStart) the
	// e820 map reports as reserved (the VMM's MP table lives there).
	EBDAStart = 0x9fc00
	// HighMemStart is the lowest address a kernel segment or the
	// initramfs may occupy (1 MiB).
	HighMemStart = 0x100000
	// BzImageLoadAddr is where LoadBzImage puts the protected-mode code.
	BzImageLoadAddr = 0x100000
	// BzImageEntryOffset is the offset of startup_64 from the start of a
	// bzImage's protected-mode code.
	BzImageEntryOffset = 0x200

	// DefaultCmdlineSize is the cmdline_size assumed for a kernel whose
	// header does not say (bare ELF): x86's COMMAND_LINE_SIZE (2048) less
	// the terminating NUL, as kernels state it in their own headers.
	DefaultCmdlineSize = 2047
	// DefaultInitrdAddrMax is the initrd_addr_max assumed for a bare ELF.
	DefaultInitrdAddrMax = 0x7fffffff
	// DefaultProtocol is the boot protocol version written for a bare ELF.
	DefaultProtocol = 0x020f
)

// Zero-page offsets outside the setup header (zero-page.rst).
const (
	offExtRamdiskImage = 0x0c0
	offExtRamdiskSize  = 0x0c4
	offExtCmdLinePtr   = 0x0c8
	offE820Entries     = 0x1e8
	offSentinel        = 0x1ef
	offE820Table       = 0x2d0
	e820EntrySize      = 20
	// MaxE820Entries is the number of e820 entries the zero page holds.
	MaxE820Entries = 128
)

// E820 entry types.
const (
	E820RAM      = 1
	E820Reserved = 2
)

// E820Entry is one entry of the e820 memory map.
type E820Entry struct {
	Addr uint64
	Size uint64
	Type uint32
}

// E820 builds the memory map for guest RAM regions: RAM [0, EBDAStart),
// reserved [EBDAStart, HighMemStart), RAM from HighMemStart to the end of the
// first region, and every further region as RAM.
func E820(regions []guestmem.Region) []E820Entry {
	var out []E820Entry
	for i, r := range regions {
		if r.Size == 0 {
			continue
		}
		if i > 0 || r.GPA != 0 {
			out = append(out, E820Entry{r.GPA, r.Size, E820RAM})
			continue
		}
		out = append(out, E820Entry{0, min(r.Size, EBDAStart), E820RAM})
		out = append(out, E820Entry{EBDAStart, HighMemStart - EBDAStart, E820Reserved})
		if r.Size > HighMemStart {
			out = append(out, E820Entry{HighMemStart, r.Size - HighMemStart, E820RAM})
		}
	}
	return out
}

// Config says what to boot besides the kernel itself.
type Config struct {
	// Cmdline is the kernel command line. Its length is checked against
	// the kernel's cmdline_size (DefaultCmdlineSize for a bare ELF).
	Cmdline string
	// Initrd is an optional initramfs (a cpio archive, maybe compressed).
	// It is placed page-aligned as high as allowed below
	// min(initrd_addr_max, end of RAM below 4 GiB), clear of the kernel.
	Initrd []byte
	// InitrdFile is the initramfs as a file, instead of Initrd (set one of
	// them). With Mapper, its whole pages are mapped into guest memory
	// copy-on-write instead of copied, like the kernel's segments; the
	// same rules apply (never modified in place while a guest uses it).
	InitrdFile *os.File
	// SetupHeader is the raw setup header to copy into the zero page
	// (SetupHeader.Raw of the bzImage the vmlinux came from). Nil means
	// defaults for a bare ELF vmlinux. LoadBzImage uses the image's own.
	SetupHeader []byte
	// ExtraE820 lists further ranges (for example PCI MMCONFIG) appended to
	// the e820 map, normally as E820Reserved.
	ExtraE820 []E820Entry
	// Mapper, if set, lets LoadELF map page-aligned segment bytes from the
	// vmlinux file into guest memory copy-on-write instead of copying them
	// (when the vmlinux is an *os.File). The file must never be modified in
	// place while a guest uses it (the kernel package's cache files are
	// read-only and only ever replaced by rename).
	Mapper FileMapper
}

// FileMapper maps file pages into guest memory privately (MAP_PRIVATE,
// copy-on-write), so that loading a kernel copies nothing and every VM
// booting the same file shares the host page cache.
type FileMapper interface {
	// MapFile maps n bytes of f from offset off at guest-physical gpa.
	// gpa, off and n are multiples of guestmem.PageSize, n > 0, and
	// [gpa, gpa+n) lies inside one RAM region.
	MapFile(gpa uint64, f *os.File, off int64, n uint64) error
}

// Loaded describes a kernel placed in guest memory.
type Loaded struct {
	Entry       uint64 // 64-bit entry point (startup_64, physical): RIP
	BootParams  uint64 // GPA of the zero page: RSI
	KernelStart uint64 // physical range the kernel occupies, including
	KernelEnd   uint64 // room it needs after itself (bss, decompression)
	CmdlineAddr uint64 // GPA of the NUL-terminated command line
	InitrdAddr  uint64 // GPA of the initramfs, 0 if none
	InitrdSize  uint64
	E820        []E820Entry // the memory map written to the zero page
}

// bootPlan is everything the zero page says, computed without touching
// guest memory.
type bootPlan struct {
	zeroPage   [ZeroPageSize]byte
	cmdline    []byte // with its NUL
	initrdAddr uint64
	initrdSize uint64
	e820       []E820Entry
}

func alignDown(x, a uint64) uint64 { return x &^ (a - 1) }
func alignUp(x, a uint64) uint64   { return (x + a - 1) &^ (a - 1) }

// planBoot builds the zero page for a kernel occupying [kStart, kEnd) in
// guest RAM laid out as regions. code32 is written to code32_start when
// non-zero (bzImage fallback).
func planBoot(regions []guestmem.Region, kStart, kEnd uint64, cfg Config, code32 uint32) (*bootPlan, error) {
	p := &bootPlan{}
	zp := p.zeroPage[:]
	le := binary.LittleEndian
	if cfg.SetupHeader != nil {
		h := cfg.SetupHeader
		if len(h) < setupHeaderMin-offSetupSects || len(h) > setupHeaderMax-offSetupSects {
			return nil, formatErr("setup header", -1, nil, "%d bytes, want %d to %d", len(h), setupHeaderMin-offSetupSects, setupHeaderMax-offSetupSects)
		}
		copy(zp[offSetupSects:], h)
		if le.Uint32(zp[offHeader:]) != hdrSMagic {
			return nil, formatErr("setup header", offHeader, nil, "no \"HdrS\" header magic")
		}
	} else {
		le.PutUint16(zp[offBootFlag:], bootFlagMagic)
		zp[offJump+1] = setupHeaderMin - offJump - 2
		le.PutUint32(zp[offHeader:], hdrSMagic)
		le.PutUint16(zp[offVersion:], DefaultProtocol)
		zp[offLoadFlags] = LoadedHigh
		le.PutUint32(zp[offInitrdAddrMax:], DefaultInitrdAddrMax)
		le.PutUint16(zp[offXLoadFlags:], XLFKernel64)
		le.PutUint32(zp[offCmdlineSize:], DefaultCmdlineSize)
	}
	version := le.Uint16(zp[offVersion:])
	cmdMax := uint64(255)
	if version >= 0x0206 {
		cmdMax = uint64(le.Uint32(zp[offCmdlineSize:]))
	}
	cmdMax = min(cmdMax, CmdlineMax-1)
	if strings.IndexByte(cfg.Cmdline, 0) >= 0 {
		return nil, &FormatError{Kind: "command line", Off: int64(strings.IndexByte(cfg.Cmdline, 0)), Reason: "contains a NUL byte"}
	}
	if uint64(len(cfg.Cmdline)) > cmdMax {
		return nil, &CmdlineError{Len: len(cfg.Cmdline), Max: int(cmdMax)}
	}
	p.cmdline = append([]byte(cfg.Cmdline), 0)
	initrdMax := uint64(0x37ffffff)
	if version >= 0x0203 {
		initrdMax = uint64(le.Uint32(zp[offInitrdAddrMax:]))
	}

	// Memory map.
	p.e820 = append(E820(regions), cfg.ExtraE820...)
	if len(p.e820) > MaxE820Entries {
		return nil, formatErr("e820", -1, nil, "%d entries, the zero page holds %d", len(p.e820), MaxE820Entries)
	}
	zp[offE820Entries] = byte(len(p.e820))
	for i, e := range p.e820 {
		b := zp[offE820Table+i*e820EntrySize:]
		le.PutUint64(b[0:], e.Addr)
		le.PutUint64(b[8:], e.Size)
		le.PutUint32(b[16:], e.Type)
	}

	// Initramfs: as high as allowed in low RAM, clear of the kernel.
	n, err := cfg.initrdSize()
	if err != nil {
		return nil, err
	}
	if n > 0 {
		var low uint64 // end of RAM below 4 GiB
		for _, r := range regions {
			if r.GPA < guestmem.MMIOHoleEnd {
				low = max(low, min(r.GPA+r.Size, guestmem.MMIOHoleEnd))
			}
		}
		top := min(low, initrdMax+1)
		addr, ok := uint64(0), false
		if n <= top {
			addr = alignDown(top-n, guestmem.PageSize)
			ok = addr >= HighMemStart
			if ok && addr < kEnd && addr+n > kStart {
				// Overlaps the kernel: try just below it.
				ok = n <= kStart
				if ok {
					addr = alignDown(kStart-n, guestmem.PageSize)
					ok = addr >= HighMemStart
				}
			}
		}
		if !ok {
			return nil, &InitrdError{Size: n, Top: top, KernelStart: kStart, KernelEnd: kEnd}
		}
		p.initrdAddr, p.initrdSize = addr, n
		le.PutUint32(zp[offRamdiskImage:], uint32(addr))
		le.PutUint32(zp[offExtRamdiskImage:], uint32(addr>>32))
		le.PutUint32(zp[offRamdiskSize:], uint32(n))
		le.PutUint32(zp[offExtRamdiskSize:], uint32(n>>32))
	}

	zp[offSentinel] = 0
	le.PutUint16(zp[offVidMode:], 0xffff) // "normal" video mode
	zp[offTypeOfLoader] = 0xff            // undefined loader
	zp[offLoadFlags] |= LoadedHigh | CanUseHeap
	le.PutUint16(zp[offHeapEndPtr:], 0xfe00)
	le.PutUint32(zp[offCmdLinePtr:], CmdlineAddr)
	le.PutUint32(zp[offExtCmdLinePtr:], 0)
	le.PutUint32(zp[offHardwareSubarc:], 0) // X86_SUBARCH_PC
	le.PutUint64(zp[offSetupData:], 0)
	if code32 != 0 {
		le.PutUint32(zp[offCode32Start:], code32)
	}
	return p, nil
}

// write puts the plan's zero page, command line and initramfs into memory.
// initrdSize is the size of the configured initramfs.
func (cfg *Config) initrdSize() (uint64, error) {
	if cfg.InitrdFile == nil {
		return uint64(len(cfg.Initrd)), nil
	}
	if len(cfg.Initrd) > 0 {
		return 0, errors.New("linuxboot: Config sets both Initrd and InitrdFile; set one")
	}
	st, err := cfg.InitrdFile.Stat()
	if err != nil {
		return 0, fmt.Errorf("linuxboot: stat initramfs: %w", err)
	}
	return uint64(st.Size()), nil
}

func (p *bootPlan) write(mem *guestmem.Memory, cfg Config) error {
	if err := mem.WriteAt(p.zeroPage[:], ZeroPageAddr); err != nil {
		return err
	}
	if err := mem.WriteAt(p.cmdline, CmdlineAddr); err != nil {
		return err
	}
	if len(cfg.Initrd) > 0 {
		return mem.WriteAt(cfg.Initrd, p.initrdAddr)
	}
	if cfg.InitrdFile == nil || p.initrdSize == 0 {
		return nil
	}
	dst, err := mem.Slice(p.initrdAddr, p.initrdSize)
	if err != nil {
		return err
	}
	var mapped uint64
	if cfg.Mapper != nil {
		if n := alignDown(p.initrdSize, guestmem.PageSize); n > 0 {
			if err := cfg.Mapper.MapFile(p.initrdAddr, cfg.InitrdFile, 0, n); err != nil {
				return fmt.Errorf("linuxboot: map initramfs: %w", err)
			}
			mapped = n
		}
	}
	if k, err := cfg.InitrdFile.ReadAt(dst[mapped:], int64(mapped)); uint64(k) != p.initrdSize-mapped {
		return fmt.Errorf("linuxboot: read initramfs: %w", err)
	}
	return nil
}

func (p *bootPlan) loaded(entry, kStart, kEnd uint64) *Loaded {
	l := &Loaded{
		Entry:       entry,
		BootParams:  ZeroPageAddr,
		KernelStart: kStart,
		KernelEnd:   kEnd,
		CmdlineAddr: CmdlineAddr,
		E820:        p.e820,
	}
	if p.initrdSize > 0 {
		l.InitrdAddr, l.InitrdSize = p.initrdAddr, p.initrdSize
	}
	return l
}
