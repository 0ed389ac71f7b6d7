package vmm

import (
	"context"
	"errors"
	"testing"
	"time"
)

// TestGuestXSAVELayoutIsConsistent checks what Linux checks at boot: with
// XCR0 = x87|SSE|AVX, CPUID(0xD,0).EBX must be the size of that state. New
// hides AVX where the host cannot keep that promise.
func TestGuestXSAVELayoutIsConsistent(t *testing.T) {
	requireKVM(t)
	vm, d := newTestVM(t, 1, nil)
	defer vm.Close()
	var hasAVX bool
	for _, e := range vm.supportedCPUID {
		if e.Function == 1 && e.ECX&(1<<26) != 0 && e.ECX&(1<<28) != 0 {
			hasAVX = true
		}
		if e.Function == 1 && e.ECX&(1<<26) == 0 && e.ECX&(1<<28) != 0 {
			t.Errorf("leaf 1 offers AVX without XSAVE")
		}
	}
	if !hasAVX {
		t.Logf("the guest gets no AVX on this host (%s)", vm.Host())
		return
	}
	if err := vm.Memory().WriteAt(xsaveGuestCode, codeAddr); err != nil {
		t.Fatal(err)
	}
	if err := vm.SetupLongMode(codeAddr, 0); err != nil {
		t.Fatal(err)
	}
	if err := vm.Start(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ex, err := vm.Wait(ctx)
	if err != nil || ex.Reason != ExitReset {
		t.Fatalf("Wait = %v, %v", ex, err)
	}
	if len(d.ports) != 2 {
		t.Fatalf("port writes %#x", d.ports)
	}
	// x87+SSE legacy area (512) + header (64) + AVX (256) = 832.
	if d.ports[0] != 832 {
		t.Errorf("CPUID(0xD,0).EBX after XCR0=7 is %d, want 832 (ECX=%d)", d.ports[0], d.ports[1])
	}
}

func TestMaskXSAVE(t *testing.T) {
	in := []cpuidEntry{
		{Function: 1, ECX: 1<<26 | 1<<27 | 1<<28 | 1<<12 | 1},
		{Function: 7, EBX: 1<<5 | 1<<16 | 1, ECX: 1 << 3},
		{Function: 0xd, Index: 0, EAX: 0x207, EBX: 576, ECX: 2696},
		{Function: 0xd, Index: 1, EAX: 0xf, ECX: 0x100},
		{Function: 0xd, Index: 2, EAX: 256, EBX: 576},
	}
	out := maskXSAVE(in)
	if len(out) != 2 {
		t.Fatalf("kept %d entries, want 2 (leaf 0xD dropped): %+v", len(out), out)
	}
	if out[0].ECX != 1 {
		t.Errorf("leaf 1 ECX = %#x: XSAVE/AVX/FMA not cleared", out[0].ECX)
	}
	if out[1].EBX != 1 || out[1].ECX != 0 {
		t.Errorf("leaf 7 = %+v: AVX2/AVX-512/PKU not cleared", out[1])
	}
}

func TestBuildCPUIDTopology(t *testing.T) {
	in := []cpuidEntry{
		{Function: 1, EBX: 0xff00ffff},
		{Function: 0xb, Index: 0},
		{Function: 0xb, Index: 1},
		{Function: 0xa, EAX: 0x12345},
	}
	out := buildCPUID(in, 3, 4, true)
	if apic := out[0].EBX >> 24; apic != 3 {
		t.Errorf("APIC ID = %d, want 3", apic)
	}
	if n := (out[0].EBX >> 16) & 0xff; n != 4 {
		t.Errorf("logical count = %d, want 4", n)
	}
	if out[0].ECX&cpuidHypervisor == 0 {
		t.Error("hypervisor bit not set")
	}
	if out[0].ECX&cpuidTSCDeadline == 0 {
		t.Error("TSC-deadline bit not set")
	}
	if buildCPUID(in, 0, 1, false)[0].ECX&cpuidTSCDeadline != 0 {
		t.Error("TSC-deadline bit set without KVM support")
	}
	if out[2].EBX != 4 || out[2].EAX != 2 || out[2].EDX != 3 {
		t.Errorf("leaf 0xB.1 = %+v", out[2])
	}
	if out[3].EAX != 0 {
		t.Error("PMU leaf not cleared")
	}
}

// TestBuildCPUIDHidesNestedVirt: the guest sees neither VMX nor SVM, even
// where KVM could nest them.
func TestBuildCPUIDHidesNestedVirt(t *testing.T) {
	in := []cpuidEntry{
		{Function: 1, ECX: cpuidVMX | 1},
		{Function: 0x80000001, ECX: cpuidSVM | 1},
		{Function: 0x8000000a, EAX: 1, EBX: 8, EDX: 0x1ff},
	}
	out := buildCPUID(in, 0, 1, false)
	if out[0].ECX&cpuidVMX != 0 || out[0].ECX&1 == 0 {
		t.Errorf("leaf 1 ECX = %#x, want VMX cleared and bit 0 kept", out[0].ECX)
	}
	if out[1].ECX&cpuidSVM != 0 || out[1].ECX&1 == 0 {
		t.Errorf("leaf 0x80000001 ECX = %#x, want SVM cleared and bit 0 kept", out[1].ECX)
	}
	if out[2] != (cpuidEntry{Function: 0x8000000a}) {
		t.Errorf("leaf 0x8000000a = %+v, want zeros", out[2])
	}
}

// TestBuildCPUIDKeepsOnlyARAT checks leaf 6: the always-running APIC timer
// as KVM offers it, no thermal or power management.
func TestBuildCPUIDKeepsOnlyARAT(t *testing.T) {
	for _, eax := range []uint32{0xffffffff, 0} {
		out := buildCPUID([]cpuidEntry{{Function: 6, EAX: eax, EBX: 1, ECX: 9, EDX: 3}}, 0, 1, false)
		want := cpuidEntry{Function: 6, EAX: eax & cpuidARAT}
		if out[0] != want {
			t.Errorf("leaf 6 from EAX %#x = %+v, want %+v", eax, out[0], want)
		}
	}
}

func TestXSAVEMemoProbesOnce(t *testing.T) {
	var m xsaveMemo
	calls := 0
	failing := func() (bool, error) { calls++; return false, errors.New("no fds") }
	if _, err := m.get(failing); err == nil {
		t.Fatal("a failed probe gave no error")
	}
	answer := func() (bool, error) { calls++; return true, nil }
	for i := 0; i < 3; i++ {
		ok, err := m.get(answer)
		if err != nil || !ok {
			t.Fatalf("get %d = %v, %v; want true, nil", i, ok, err)
		}
	}
	if calls != 2 {
		t.Errorf("probe ran %d times, want 2 (the failure is not remembered, the answer is)", calls)
	}
	if ok, err := m.get(failing); err != nil || !ok {
		t.Errorf("after an answer, get = %v, %v; want the remembered true", ok, err)
	}
}
