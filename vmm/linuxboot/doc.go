// Package linuxboot loads an x86-64 Linux kernel into guest memory for the
// 64-bit boot protocol (Documentation/arch/x86/boot.rst): it parses and
// decompresses bzImage files, loads the PT_LOAD segments of an uncompressed
// vmlinux ELF at their physical addresses, places the command line and the
// initramfs, and builds the zero page (struct boot_params) with its e820
// memory map.
//
// The VMM (package vmm) does the rest of the CPU state: page tables that
// identity-map low memory, a GDT with __BOOT_CS (0x10) and __BOOT_DS (0x18),
// RIP = Loaded.Entry, RSI = Loaded.BootParams, and CPUID.
//
// # Guest-physical layout
//
// The loader uses fixed addresses so that the VMM can keep its own structures
// out of the way:
//
//	GPA range              what                                owner
//	0x00000-0x004ff        real-mode IVT/BDA, left zero        -
//	0x00500-0x06fff        GDT, IDT, boot stack                vmm
//	0x07000-0x07fff        zero page (ZeroPageAddr)            linuxboot
//	0x09000-0x0cfff        identity page tables                vmm
//	0x20000-0x2ffff        command line (CmdlineAddr)          linuxboot
//	0x9fc00-0xfffff        EBDA (MP table), e820 reserved      vmm
//	0x100000-...           bzImage protected-mode code          linuxboot (LoadBzImage)
//	p_paddr (16 MiB)-...   vmlinux PT_LOAD segments            linuxboot (LoadELF)
//	top of RAM below 4 GiB initramfs, page aligned, highest     linuxboot
//	                       address allowed by initrd_addr_max
//
// Kernel segments must lie at or above HighMemStart; everything below it
// belongs to the fixed structures above.
//
// # Loading cost
//
// Copying a 56 MB vmlinux into fresh guest memory costs tens to hundreds of
// milliseconds, mostly page faults. With Config.Mapper set (a FileMapper,
// implemented by guestmem.Memory.MapFile with mmap MAP_PRIVATE|MAP_FIXED),
// LoadELF maps the page-aligned part of each segment from the vmlinux file
// copy-on-write instead: under a millisecond, and the host page cache is
// shared by every VM booting the same kernel.
//
// # Untrusted files
//
// Kernel and initramfs files are treated as hostile input: every offset,
// length and address read from them is checked before use, decompression is
// capped (a "zip bomb" fails with ErrTooLarge), and every failure is a
// *FormatError or one of the sentinel errors below, never a panic or a write
// outside guest RAM.
//
// # Why this is hand-written
//
// No maintained Go library builds x86 boot_params. The ELF reader here reads
// only the file header and program headers: debug/elf would also parse and
// allocate section and string tables, which the loader does not need and
// which would only widen the surface exposed to a hostile file.
// Decompression uses well-kept libraries: github.com/klauspost/compress/zstd,
// compress/gzip, compress/bzip2, github.com/ulikunitz/xz/lzma (lzma, and the
// raw LZMA2 inside xz) and github.com/pierrec/lz4/v4 (the legacy lz4 frame
// the kernel uses). The .xz container and its x86 BCJ filter are read here
// (xz.go), because kernel xz payloads use that filter and no maintained Go
// library implements it.
package linuxboot
