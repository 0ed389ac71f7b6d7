package vmm

import (
	"context"
	"encoding/binary"
	"sync"
	"time"
)

// Under some nested setups (KVM inside QEMU's TCG emulation is one) the
// guest's XSETBV never reaches KVM, so CPUID leaf 0xD's EBX (the XSAVE size
// for the enabled features) does not follow XCR0. Linux then sees an
// inconsistent XSAVE layout, and Linux 7.1 crashes in fpstate_reset while
// falling back; with only x87 and SSE state left, signal frames still failed
// to restore there ("bad frame in rt_sigreturn"). When the host itself runs
// under a hypervisor, New runs a tiny probe guest that sets XCR0 and reads
// the size back; if it is wrong, the guest gets a CPUID without XSAVE at all
// (the kernel then uses FXSAVE, and user space gets SSE but no AVX), which
// works everywhere. Bare-metal hosts skip the probe.

// needsXSAVEProbe reports whether the probe is worth running: the host is
// itself virtualized and KVM offers XSAVE with AVX.
func needsXSAVEProbe(hostFlags map[string]bool, supported []cpuidEntry) bool {
	if !hostFlags["hypervisor"] {
		return false
	}
	for _, e := range supported {
		if e.Function == 1 {
			return e.ECX&(1<<26) != 0 && e.ECX&(1<<28) != 0
		}
	}
	return false
}

// probeResult captures what the probe guest reports on port 0x500.
type probeResult struct {
	mu   sync.Mutex
	vals []uint32
}

func (p *probeResult) ReadPort(port uint16, data []byte) {}
func (p *probeResult) WritePort(port uint16, data []byte) {
	if len(data) == 4 {
		p.mu.Lock()
		p.vals = append(p.vals, binary.LittleEndian.Uint32(data))
		p.mu.Unlock()
	}
}

const probeCodeAddr = 0x10000

// xsaveGuestCode enables OSXSAVE, sets XCR0 to x87|SSE|AVX, and writes
// CPUID(0xD,0).EBX and ECX to port 0x500, then resets.
var xsaveGuestCode = []byte{
	0x0f, 0x20, 0xe0, // mov rax,cr4
	0x0d, 0x00, 0x00, 0x04, 0x00, // or eax,1<<18 (OSXSAVE)
	0x0f, 0x22, 0xe0, // mov cr4,rax
	0x31, 0xc9, // xor ecx,ecx
	0xb8, 0x07, 0x00, 0x00, 0x00, // mov eax,7
	0x31, 0xd2, // xor edx,edx
	0x0f, 0x01, 0xd1, // xsetbv
	0xb8, 0x0d, 0x00, 0x00, 0x00, // mov eax,0xd
	0x31, 0xc9, // xor ecx,ecx
	0x0f, 0xa2, // cpuid
	0x89, 0xd8, // mov eax,ebx
	0x66, 0xba, 0x00, 0x05, // mov dx,0x500
	0xef,       // out dx,eax
	0x89, 0xc8, // mov eax,ecx
	0xef,       // out dx,eax
	0xb0, 0xfe, // mov al,0xfe
	0xe6, 0x64, // out 0x64,al
	0xf4, // hlt
}

// xsaveMemo keeps the probe's answer: it is a fact about the host's KVM,
// and under emulation the probe guest cost 100-200 ms of every New (a
// quarter of the time from sandbox.New to the first KVM_RUN). Only definite
// answers are kept; a probe that failed (no memory, no fds) runs again.
type xsaveMemo struct {
	mu    sync.Mutex
	known bool
	ok    bool
}

// get returns the remembered answer, or runs probe once to learn it.
func (m *xsaveMemo) get(probe func() (bool, error)) (bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.known {
		return m.ok, nil
	}
	ok, err := probe()
	if err != nil {
		return false, err
	}
	m.known, m.ok = true, ok
	return ok, nil
}

// hostXSAVE is the package's only process-wide state: the probe's answer
// for this host, learnt by the first New that needs it.
var hostXSAVE xsaveMemo

// xsaveSizeFollowsXCR0 runs the probe guest and reports whether leaf 0xD's
// EBX was 832 (legacy area + header + AVX) after XCR0=7.
func xsaveSizeFollowsXCR0() (bool, error) {
	pv, err := newVM(Config{Memory: 2 << 20, VCPUs: 1}, false)
	if err != nil {
		return false, err
	}
	defer pv.Close()
	res := &probeResult{}
	if err := pv.bus.AddPort(0x500, 1, res); err != nil {
		return false, err
	}
	if err := pv.mem.WriteAt(xsaveGuestCode, probeCodeAddr); err != nil {
		return false, err
	}
	if err := pv.SetupLongMode(probeCodeAddr, 0); err != nil {
		return false, err
	}
	if err := pv.Start(); err != nil {
		return false, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ex, err := pv.Wait(ctx)
	if err != nil {
		return false, err
	}
	res.mu.Lock()
	defer res.mu.Unlock()
	if ex.Reason != ExitReset || len(res.vals) != 2 {
		return false, nil
	}
	return res.vals[0] == 832, nil
}

// Feature bits that need XSAVE state beyond x87 and SSE.
var extendedXSAVEFeatures = []struct {
	fn, idx uint32
	reg     int // 0 EAX, 1 EBX, 2 ECX, 3 EDX
	mask    uint32
}{
	{1, 0, 2, 1<<12 | 1<<26 | 1<<27 | 1<<28 | 1<<29},                                // FMA, XSAVE, OSXSAVE, AVX, F16C
	{7, 0, 1, 1<<5 | 1<<16 | 1<<17 | 1<<21 | 1<<26 | 1<<27 | 1<<28 | 1<<30 | 1<<31}, // AVX2, AVX-512*
	{7, 0, 2, 1<<1 | 1<<3 | 1<<4 | 1<<6 | 1<<9 | 1<<10 | 1<<11 | 1<<12 | 1<<14},     // AVX-512 VBMI.., PKU, OSPKE, VAES, VPCLMULQDQ
	{7, 0, 3, 1<<2 | 1<<3 | 1<<8 | 1<<22 | 1<<23 | 1<<24 | 1<<25},                   // AVX-512 4VNNIW.., AMX
	{7, 1, 0, 1<<4 | 1<<5}, // AVX-VNNI, AVX512_BF16
}

// maskXSAVE returns supported without XSAVE and the features that need it.
func maskXSAVE(supported []cpuidEntry) []cpuidEntry {
	out := make([]cpuidEntry, 0, len(supported))
	for _, e := range supported {
		for _, f := range extendedXSAVEFeatures {
			if e.Function == f.fn && e.Index == f.idx {
				switch f.reg {
				case 0:
					e.EAX &^= f.mask
				case 1:
					e.EBX &^= f.mask
				case 2:
					e.ECX &^= f.mask
				case 3:
					e.EDX &^= f.mask
				}
			}
		}
		if e.Function == 0xd {
			continue
		}
		out = append(out, e)
	}
	return out
}
