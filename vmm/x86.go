package vmm

import (
	"encoding/binary"
	"fmt"

	"github.com/gosandbox/sandbox/vmm/guestmem"
)

// Fixed guest-physical addresses the VMM writes before boot. The Linux
// loader (package linuxboot) keeps its zero page and command line clear of
// them.
const (
	GDTAddr        = 0x500  // 4 GDT entries
	IDTAddr        = 0x520  // empty IDT
	PML4Addr       = 0x9000 // page tables: PML4, PDPT, PD (identity map of the first 1 GiB)
	PDPTAddr       = 0xa000
	PDAddr         = 0xb000
	BootStack      = 0x8ff0 // initial RSP
	MPTableAddr    = 0x9fc00
	mpTableMaxSize = 0x400

	tssAddr         = 0xfffbd000
	identityMapAddr = 0xfffbc000
	ioapicAddr      = 0xfec00000
	lapicAddr       = 0xfee00000
)

// GDT selectors.
const (
	selCode = 0x08
	selData = 0x10
	selTSS  = 0x18
)

func gdtEntry(flags uint16, base, limit uint32) uint64 {
	return uint64(base&0xff000000)<<(56-24) |
		uint64(flags&0xf0ff)<<40 |
		uint64(limit&0x000f0000)<<(48-16) |
		uint64(base&0x00ffffff)<<16 |
		uint64(limit&0x0000ffff)
}

func segmentFromGDT(entry uint64, sel uint16) Segment {
	return Segment{
		Base:     (entry>>16)&0xffffff | (entry>>32)&0xff000000,
		Limit:    uint32(entry&0xffff | (entry>>32)&0xf0000),
		Selector: sel,
		Type:     uint8(entry>>40) & 0xf,
		S:        uint8(entry>>44) & 1,
		DPL:      uint8(entry>>45) & 3,
		Present:  uint8(entry>>47) & 1,
		AVL:      uint8(entry>>52) & 1,
		L:        uint8(entry>>53) & 1,
		DB:       uint8(entry>>54) & 1,
		G:        uint8(entry>>55) & 1,
	}
}

// writeLongModeTables writes the GDT, an empty IDT and identity-mapping page
// tables for the first 1 GiB, and returns the matching segment state.
func writeLongModeTables(mem *guestmem.Memory, sregs *Sregs) error {
	gdt := []uint64{
		0,
		gdtEntry(0xa09b, 0, 0xfffff), // code: 64-bit, present, exec/read, accessed
		gdtEntry(0xc093, 0, 0xfffff), // data: present, read/write, accessed
		gdtEntry(0x808b, 0, 0xfffff), // TSS: present, busy 64-bit TSS
	}
	buf := make([]byte, 8*len(gdt))
	for i, e := range gdt {
		binary.LittleEndian.PutUint64(buf[8*i:], e)
	}
	if err := mem.WriteAt(buf, GDTAddr); err != nil {
		return fmt.Errorf("vmm: write GDT: %w", err)
	}
	if err := mem.PutUint64(IDTAddr, 0); err != nil {
		return fmt.Errorf("vmm: write IDT: %w", err)
	}
	if err := mem.PutUint64(PML4Addr, PDPTAddr|3); err != nil {
		return err
	}
	if err := mem.PutUint64(PDPTAddr, PDAddr|3); err != nil {
		return err
	}
	pd := make([]byte, 4096)
	for i := uint64(0); i < 512; i++ {
		binary.LittleEndian.PutUint64(pd[8*i:], i<<21|0x83) // present, writable, 2 MiB page
	}
	if err := mem.WriteAt(pd, PDAddr); err != nil {
		return err
	}

	code := segmentFromGDT(gdt[1], selCode)
	data := segmentFromGDT(gdt[2], selData)
	tss := segmentFromGDT(gdt[3], selTSS)
	sregs.GDT = DTable{Base: GDTAddr, Limit: uint16(8*len(gdt) - 1)}
	sregs.IDT = DTable{Base: IDTAddr, Limit: 7}
	sregs.CS = code
	sregs.DS, sregs.ES, sregs.FS, sregs.GS, sregs.SS = data, data, data, data, data
	sregs.TR = tss
	sregs.CR0 = cr0PE | cr0MP | cr0ET | cr0NE | cr0WP | cr0PG
	sregs.CR3 = PML4Addr
	sregs.CR4 = cr4PAE
	sregs.EFER = eferLME | eferLMA
	return nil
}

const (
	cr0PE   = 1 << 0
	cr0MP   = 1 << 1
	cr0ET   = 1 << 4
	cr0NE   = 1 << 5
	cr0WP   = 1 << 16
	cr0PG   = 1 << 31
	cr4PAE  = 1 << 5
	eferLME = 1 << 8
	eferLMA = 1 << 10
)

// MSR numbers.
const (
	msrIA32TSC          = 0x10
	msrIA32SysenterCS   = 0x174
	msrIA32SysenterESP  = 0x175
	msrIA32SysenterEIP  = 0x176
	msrIA32MiscEnable   = 0x1a0
	msrMTRRDefType      = 0x2ff
	msrSTAR             = 0xc0000081
	msrLSTAR            = 0xc0000082
	msrCSTAR            = 0xc0000083
	msrSyscallMask      = 0xc0000084
	msrKernelGSBase     = 0xc0000102
	miscEnableFastStr   = 1
	mtrrEnableWriteBack = 1<<11 | 6
)

// bootMSRs are the MSR values Linux expects from its firmware: notably MTRRs
// enabled with write-back as the default type (otherwise all RAM is uncached).
func bootMSRs() []msrEntry {
	return []msrEntry{
		{Index: msrIA32SysenterCS},
		{Index: msrIA32SysenterESP},
		{Index: msrIA32SysenterEIP},
		{Index: msrSTAR},
		{Index: msrCSTAR},
		{Index: msrKernelGSBase},
		{Index: msrSyscallMask},
		{Index: msrLSTAR},
		{Index: msrIA32TSC},
		{Index: msrIA32MiscEnable, Data: miscEnableFastStr},
		{Index: msrMTRRDefType, Data: mtrrEnableWriteBack},
	}
}

// CPUID leaves and bits adjusted per vCPU.
const (
	cpuidHypervisor  = 1 << 31 // leaf 1 ECX
	cpuidTSCDeadline = 1 << 24 // leaf 1 ECX
	cpuidHTT         = 1 << 28 // leaf 1 EDX
	cpuidVMX         = 1 << 5  // leaf 1 ECX
	cpuidSVM         = 1 << 2  // leaf 0x80000001 ECX
	cpuidARAT        = 1 << 2  // leaf 6 EAX: the APIC timer always runs
)

// buildCPUID derives vCPU id's CPUID from what KVM supports: APIC IDs,
// topology for n vCPUs (one package, one thread per core), the hypervisor bit,
// the TSC-deadline timer when KVM emulates it (KVM_GET_SUPPORTED_CPUID never
// reports it; without it Linux calibrates the LAPIC timer against the PIT,
// which took 11 s of a 24 s boot under nested emulation), no PMU, and no
// VMX or SVM: a sandbox guest gets no nested virtualization, which keeps
// the host's nested-virtualization code out of its reach (and spares the
// guest kernel KVM's own start-up, 2.6 s of a boot under nested
// emulation). Leaf 0xD (XSAVE) is passed through as KVM reports it, which keeps
// its sizes consistent with the features it exposes; KVM itself updates the
// XCR0-dependent size when the guest sets XCR0.
func buildCPUID(supported []cpuidEntry, id, n int, tscDeadline bool) []cpuidEntry {
	out := make([]cpuidEntry, 0, len(supported))
	shift := uint32(0)
	for 1<<shift < n {
		shift++
	}
	for _, e := range supported {
		switch e.Function {
		case 0x1:
			e.EBX = e.EBX&0x0000ffff | uint32(id)<<24 | uint32(n)<<16
			e.ECX |= cpuidHypervisor
			e.ECX &^= cpuidVMX
			if tscDeadline {
				e.ECX |= cpuidTSCDeadline
			}
			if n > 1 {
				e.EDX |= cpuidHTT
			}
		case 0x4:
			// Deterministic cache parameters: cores per package, and
			// sharing of the last level.
			e.EAX &= 0x3ff
			level := (e.EAX >> 5) & 7
			if e.EAX&0x1f != 0 {
				e.EAX |= uint32(n-1) << 26
				if level >= 3 {
					e.EAX |= uint32(n-1) << 14
				}
			}
		case 0x6:
			// No thermal or power management, but ARAT (EAX bit 2) as KVM
			// offers it: KVM's local APIC timer never stops in idle. Without
			// it Linux keeps the PIT as its tick broadcast device, and the
			// in-kernel PIT's worker thread was seen spinning (soft lockup
			// of kvm-pit in the emulated KVM host) under a busy guest.
			e.EAX, e.EBX, e.ECX, e.EDX = e.EAX&cpuidARAT, 0, 0, 0
		case 0xa:
			e.EAX, e.EBX, e.ECX, e.EDX = 0, 0, 0, 0 // no PMU
		case 0xb, 0x1f:
			switch e.Index {
			case 0: // SMT level: one thread per core
				e.EAX, e.EBX, e.ECX = 0, 1, 1<<8
			case 1: // core level
				e.EAX, e.EBX, e.ECX = shift, uint32(n), 2<<8|1
			default:
				e.EAX, e.EBX, e.ECX = 0, 0, e.Index
			}
			e.EDX = uint32(id)
		case 0x80000001:
			e.ECX &^= cpuidSVM
		case 0x8000000a:
			e.EAX, e.EBX, e.ECX, e.EDX = 0, 0, 0, 0 // SVM features
		case 0x80000008:
			e.ECX = e.ECX&^0xff | uint32(n-1)
		}
		out = append(out, e)
	}
	return out
}

// writeMPTable writes an Intel MultiProcessor table for n vCPUs at
// MPTableAddr so the guest finds its CPUs and the IOAPIC without ACPI.
func writeMPTable(mem *guestmem.Memory, n int) error {
	const (
		hdrLen  = 44
		cpuLen  = 20
		busLen  = 8
		apicLen = 8
		intLen  = 8
		nIRQ    = 16
	)
	ioapicID := uint8(n)
	size := 16 + hdrLen + n*cpuLen + busLen + apicLen + nIRQ*intLen + 2*intLen
	if size > mpTableMaxSize {
		return &ConfigError{Field: "VCPUs", Why: fmt.Sprintf("%d vCPUs do not fit the MP table", n)}
	}
	b := make([]byte, size)
	// Floating pointer structure.
	copy(b[0:], "_MP_")
	binary.LittleEndian.PutUint32(b[4:], MPTableAddr+16)
	b[8] = 1 // length in 16-byte units
	b[9] = 4 // spec revision 1.4
	b[10] = checksum(b[0:16])
	// Configuration table header.
	h := b[16:]
	copy(h[0:], "PCMP")
	binary.LittleEndian.PutUint16(h[4:], uint16(size-16))
	h[6] = 4
	copy(h[8:], "GOSANDBX")
	copy(h[16:], "MICROVM     ")
	binary.LittleEndian.PutUint16(h[34:], uint16(n+1+1+nIRQ+2))
	binary.LittleEndian.PutUint32(h[36:], lapicAddr)
	p := h[hdrLen:]
	for i := 0; i < n; i++ {
		p[0] = 0 // processor
		p[1] = uint8(i)
		p[2] = 0x14 // local APIC version
		p[3] = 1    // enabled
		if i == 0 {
			p[3] |= 2 // boot processor
		}
		binary.LittleEndian.PutUint32(p[4:], 0x600) // family 6
		binary.LittleEndian.PutUint32(p[8:], 0x201) // FPU, APIC
		p = p[cpuLen:]
	}
	p[0] = 1 // bus
	p[1] = 0
	copy(p[2:8], "ISA   ")
	p = p[busLen:]
	p[0] = 2 // IOAPIC
	p[1] = ioapicID
	p[2] = 0x11
	p[3] = 1
	binary.LittleEndian.PutUint32(p[4:], ioapicAddr)
	p = p[apicLen:]
	for irq := 0; irq < nIRQ; irq++ {
		p[0] = 3 // I/O interrupt
		p[1] = 0 // INT
		p[4] = 0 // source bus
		p[5] = uint8(irq)
		p[6] = ioapicID
		p[7] = uint8(irq)
		p = p[intLen:]
	}
	// Local interrupts: ExtINT on LINT0, NMI on LINT1, all local APICs.
	for lint, typ := range []uint8{3, 1} {
		p[0] = 4
		p[1] = typ
		p[6] = 0xff
		p[7] = uint8(lint)
		p = p[intLen:]
	}
	h[7] = checksum(h[:size-16])
	return mem.WriteAt(b, MPTableAddr)
}

func checksum(b []byte) uint8 {
	var s uint8
	for _, c := range b {
		s += c
	}
	return -s
}
