package vmm

import (
	"context"
	"fmt"
	"strings"
)

// VCPUState is what a running vCPU was doing when VCPUStates looked: for
// telling a guest that waits for an interrupt it never got (halted, with
// the vector pending in IRR) from one that is busy or spinning.
type VCPUState struct {
	ID      int
	MPState string // KVM's multiprocessing state: "runnable", "halted", ...
	RIP     uint64
	RFLAGS  uint64
	TPR     uint8
	IRR     []uint8 // vectors pending in the local APIC
	ISR     []uint8 // vectors in service
}

// String formats the state on one line, e.g.
// "vCPU 1: halted, rip 0xffffffff81c3e4a2, IF 1, tpr 0, irr [0x22], isr []".
func (s VCPUState) String() string {
	return fmt.Sprintf("vCPU %d: %s, rip %#x, IF %d, tpr %d, irr %s, isr %s",
		s.ID, s.MPState, s.RIP, s.RFLAGS>>9&1, s.TPR, vectors(s.IRR), vectors(s.ISR))
}

func vectors(v []uint8) string {
	parts := make([]string, len(v))
	for i, x := range v {
		parts[i] = fmt.Sprintf("%#x", x)
	}
	return "[" + strings.Join(parts, " ") + "]"
}

var mpStates = []string{"runnable", "uninitialized", "init-received", "halted", "sipi-received", "stopped", "check-stop", "operating", "load", "ap-reset-hold", "suspended"}

// VCPUStates briefly takes each vCPU out of the guest (as Stop does, with
// immediate_exit and a signal to its thread) to read its registers, local
// APIC and multiprocessing state, then lets it run on. It is a diagnostic
// for a guest that stopped answering; ctx bounds the wait for each vCPU.
func (vm *VM) VCPUStates(ctx context.Context) ([]VCPUState, error) {
	var out []VCPUState
	for _, c := range vm.vcpus {
		st := VCPUState{ID: c.id}
		var err error
		if rerr := c.onThread(ctx, func() { err = c.readState(&st) }); rerr != nil {
			return out, rerr
		}
		if err != nil {
			return out, err
		}
		out = append(out, st)
	}
	return out, nil
}

// readState fills st; it runs on c's thread.
func (c *vcpu) readState(st *VCPUState) error {
	mp, err := getMPState(c.fd)
	if err != nil {
		return kvmErr("KVM_GET_MP_STATE", err)
	}
	if int(mp) < len(mpStates) {
		st.MPState = mpStates[mp]
	} else {
		st.MPState = fmt.Sprintf("state %d", mp)
	}
	var r Regs
	if err := ioctlPtr(c.fd, kvmGetRegs, &r); err != nil {
		return kvmErr("KVM_GET_REGS", err)
	}
	st.RIP, st.RFLAGS = r.RIP, r.RFLAGS
	l, err := lapicGet(c.fd)
	if err != nil {
		return kvmErr("KVM_GET_LAPIC", err)
	}
	st.TPR = l.Regs[0x80]
	st.IRR = apicVectors(l, 0x200)
	st.ISR = apicVectors(l, 0x100)
	return nil
}

// apicVectors lists the vectors set in the 256-bit local APIC register
// bank at off (eight 32-bit registers 16 bytes apart).
func apicVectors(l *lapicState, off int) []uint8 {
	var v []uint8
	for i := range 8 {
		for bit := range 32 {
			b := l.Regs[off+16*i+bit/8]
			if b&(1<<(bit%8)) != 0 {
				v = append(v, uint8(32*i+bit))
			}
		}
	}
	return v
}
