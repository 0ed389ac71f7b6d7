package vmm

import (
	"context"
	"fmt"
	"runtime"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// kickSignal forces a vCPU thread out of KVM_RUN. The Go runtime already
// handles SIGURG on every thread (it uses it for goroutine preemption), so
// sending it changes no signal disposition and is harmless to the rest of the
// process; combined with kvm_run.immediate_exit it cannot be lost.
const kickSignal = unix.SIGURG

type vcpu struct {
	id  int
	fd  int
	vm  *VM
	run runPage

	mu     sync.Mutex // guards tid, closed and reqs against kick
	tid    int
	closed bool
	reqs   []vcpuRequest // run on the vCPU's thread between two KVM_RUNs

	exits uint64 // exits handled by the VMM (this vCPU's goroutine only)
}

func (vm *VM) newVCPU(id, mmapSize int) (*vcpu, error) {
	fd, err := ioctlRetry(vm.vmfd, kvmCreateVCPU, uintptr(id))
	if err != nil {
		return nil, kvmErr("KVM_CREATE_VCPU", err)
	}
	c := &vcpu{id: id, fd: int(fd), vm: vm}
	unix.CloseOnExec(c.fd)
	mem, err := unix.Mmap(c.fd, 0, mmapSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		unix.Close(c.fd)
		return nil, fmt.Errorf("vmm: mmap kvm_run of vCPU %d: %w", id, err)
	}
	if len(mem) < 4096 {
		unix.Munmap(mem)
		unix.Close(c.fd)
		return nil, fmt.Errorf("vmm: kvm_run of vCPU %d is only %d bytes", id, len(mem))
	}
	c.run = runPage{mem: mem}
	if err := c.setupCPU(); err != nil {
		c.close()
		return nil, err
	}
	return c, nil
}

// setupCPU sets CPUID, MSRs, FPU and the local APIC's LINT pins.
func (c *vcpu) setupCPU() error {
	vm := c.vm
	if err := setCPUID(c.fd, buildCPUID(vm.supportedCPUID, c.id, vm.cfg.VCPUs, vm.tscDeadline)); err != nil {
		return kvmErr("KVM_SET_CPUID2", err)
	}
	msrs := bootMSRs()
	n, err := setMSRs(c.fd, msrs)
	if err != nil {
		return kvmErr("KVM_SET_MSRS", err)
	}
	if n != len(msrs) {
		return fmt.Errorf("vmm: KVM_SET_MSRS set %d of %d MSRs; MSR %#x was refused", n, len(msrs), msrs[n].Index)
	}
	f := fpu{FCW: 0x37f, MXCSR: 0x1f80}
	if err := ioctlPtr(c.fd, kvmSetFPU, &f); err != nil {
		return kvmErr("KVM_SET_FPU", err)
	}
	l, err := lapicGet(c.fd)
	if err != nil {
		return kvmErr("KVM_GET_LAPIC", err)
	}
	setLVT := func(off int, mode uint32) {
		v := uint32(l.Regs[off]) | uint32(l.Regs[off+1])<<8 | uint32(l.Regs[off+2])<<16 | uint32(l.Regs[off+3])<<24
		v = v&^0x700 | mode<<8
		l.Regs[off], l.Regs[off+1], l.Regs[off+2], l.Regs[off+3] = byte(v), byte(v>>8), byte(v>>16), byte(v>>24)
	}
	setLVT(0x350, 7) // LINT0: ExtINT
	setLVT(0x360, 4) // LINT1: NMI
	return kvmErr("KVM_SET_LAPIC", lapicSet(c.fd, l))
}

// GetRegs returns vCPU i's general-purpose registers.
func (vm *VM) GetRegs(i int) (Regs, error) {
	var r Regs
	if i < 0 || i >= len(vm.vcpus) {
		return r, fmt.Errorf("vmm: no vCPU %d", i)
	}
	return r, kvmErr("KVM_GET_REGS", ioctlPtr(vm.vcpus[i].fd, kvmGetRegs, &r))
}

// SetupLongMode puts the boot vCPU in 64-bit mode with identity-mapped page
// tables for the first 1 GiB, RIP=entry and RSI=rsi (the zero page for
// Linux). Call it before Start.
func (vm *VM) SetupLongMode(entry, rsi uint64) error {
	vm.mu.Lock()
	started := vm.started
	vm.mu.Unlock()
	if started {
		return ErrRunning
	}
	c := vm.vcpus[0]
	var s Sregs
	if err := ioctlPtr(c.fd, kvmGetSregs, &s); err != nil {
		return kvmErr("KVM_GET_SREGS", err)
	}
	if err := writeLongModeTables(vm.mem, &s); err != nil {
		return err
	}
	if err := ioctlPtr(c.fd, kvmSetSregs, &s); err != nil {
		return kvmErr("KVM_SET_SREGS", err)
	}
	r := Regs{RIP: entry, RSI: rsi, RFLAGS: 2, RSP: BootStack, RBP: BootStack}
	return kvmErr("KVM_SET_REGS", ioctlPtr(c.fd, kvmSetRegs, &r))
}

func (c *vcpu) kick() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return
	}
	c.run.setImmediateExit(1)
	if c.tid != 0 {
		unix.Tgkill(unix.Getpid(), c.tid, kickSignal)
	}
}

// vcpuRequest is a function to run on a vCPU's thread; done is closed
// after it ran (ran true) or when the vCPU stopped first.
type vcpuRequest struct {
	fn   func()
	ran  *bool
	done chan struct{}
}

// onThread runs fn on c's thread between two KVM_RUNs (vCPU ioctls such as
// KVM_GET_LAPIC take the vCPU's mutex, which KVM_RUN holds while the guest
// runs) and waits for it. It fails when the vCPU is not running or stops
// first, or when ctx ends first (fn may still run later).
func (c *vcpu) onThread(ctx context.Context, fn func()) error {
	ran := new(bool)
	r := vcpuRequest{fn: fn, ran: ran, done: make(chan struct{})}
	c.mu.Lock()
	if c.closed || c.tid == 0 {
		c.mu.Unlock()
		return fmt.Errorf("vmm: vCPU %d is not running", c.id)
	}
	c.reqs = append(c.reqs, r)
	c.run.setImmediateExit(1)
	unix.Tgkill(unix.Getpid(), c.tid, kickSignal)
	c.mu.Unlock()
	select {
	case <-r.done:
		if !*ran {
			return fmt.Errorf("vmm: vCPU %d stopped", c.id)
		}
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// serveRequests runs the pending onThread requests; with stopped set it
// only releases their callers.
func (c *vcpu) serveRequests(stopped bool) {
	c.mu.Lock()
	rs := c.reqs
	c.reqs = nil
	c.mu.Unlock()
	for _, r := range rs {
		if !stopped {
			r.fn()
			*r.ran = true
		}
		close(r.done)
	}
}

func (c *vcpu) close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil
	}
	c.closed = true
	var err error
	if c.run.mem != nil {
		err = unix.Munmap(c.run.mem)
		c.run.mem = nil
	}
	if e := unix.Close(c.fd); err == nil {
		err = e
	}
	return err
}

// runVCPU is the vCPU's goroutine: it owns one OS thread (never unlocked,
// so the thread ends with the goroutine) and loops on KVM_RUN.
func (vm *VM) runVCPU(c *vcpu) {
	defer vm.wg.Done()
	runtime.LockOSThread()
	c.mu.Lock()
	c.tid = unix.Gettid()
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		c.tid = 0
		c.mu.Unlock()
		c.serveRequests(true)
	}()
	defer func() {
		if r := recover(); r != nil {
			vm.finish(&Exit{Reason: ExitError, VCPU: c.id, Detail: fmt.Sprintf("VMM panic on vCPU %d: %v", c.id, r)})
		}
	}()
	first := c.id == 0
	for !vm.stopping.Load() {
		if first {
			first = false
			vm.mu.Lock()
			vm.phases.FirstRun = time.Now()
			vm.mu.Unlock()
		}
		_, err := ioctl(c.fd, kvmRun, 0)
		if err == unix.EINTR || err == unix.EAGAIN {
			c.run.setImmediateExit(0)
			c.serveRequests(false)
			continue
		}
		if err != nil {
			vm.finish(&Exit{Reason: ExitError, VCPU: c.id, Detail: "KVM_RUN failed", Err: kvmErr("KVM_RUN", err)})
			return
		}
		c.exits++
		if e := c.handleExit(); e != nil {
			vm.finish(e)
			return
		}
	}
}

// handleExit dispatches one KVM exit; a non-nil Exit ends the VM.
func (c *vcpu) handleExit() *Exit {
	vm := c.vm
	reason := c.run.exitReason()
	switch reason {
	case exitIO:
		io := c.run.io()
		size := uint64(io.Size)
		total := size * uint64(io.Count)
		if size == 0 || size > 8 || io.DataOffset > uint64(len(c.run.mem)) || total > uint64(len(c.run.mem))-io.DataOffset {
			return &Exit{Reason: ExitError, VCPU: c.id, KVMReason: reason, Detail: fmt.Sprintf("malformed I/O exit: port %#x size %d count %d", io.Port, io.Size, io.Count)}
		}
		data := c.run.mem[io.DataOffset : io.DataOffset+total]
		for i := uint64(0); i < uint64(io.Count); i++ {
			vm.bus.Port(io.Port, data[i*size:(i+1)*size], io.Direction == 1)
		}
	case exitMMIO:
		m := c.run.mmio()
		n := m.Len
		if n == 0 || n > 8 {
			return &Exit{Reason: ExitError, VCPU: c.id, KVMReason: reason, Detail: fmt.Sprintf("malformed MMIO exit: %#x len %d", m.PhysAddr, m.Len)}
		}
		vm.bus.MMIO(m.PhysAddr, m.Data[:n], m.IsWrite != 0)
	case exitIntr, exitIRQWindowOpen:
	case exitHLT:
		return &Exit{Reason: ExitHalt, VCPU: c.id, KVMReason: reason}
	case exitShutdown:
		if p := vm.panicLine.Load(); p != nil {
			return &Exit{Reason: ExitPanic, VCPU: c.id, KVMReason: reason, Detail: *p}
		}
		return &Exit{Reason: ExitTripleFault, VCPU: c.id, KVMReason: reason, Detail: "the guest triple-faulted (KVM_EXIT_SHUTDOWN)"}
	case exitSystemEvent:
		typ := c.run.exitU32(0)
		switch typ {
		case 1:
			return &Exit{Reason: ExitPoweroff, VCPU: c.id, KVMReason: reason}
		case 2:
			return &Exit{Reason: ExitReset, VCPU: c.id, KVMReason: reason}
		default:
			return &Exit{Reason: ExitPanic, VCPU: c.id, KVMReason: reason, Detail: fmt.Sprintf("system event %d", typ)}
		}
	case exitFailEntry:
		w := c.run.exitWords(0, 1)
		return &Exit{Reason: ExitFailEntry, VCPU: c.id, KVMReason: reason, Data: w,
			Detail: fmt.Sprintf("KVM could not enter the guest: hardware_entry_failure_reason=%#x", w[0])}
	case exitInternalError:
		sub := c.run.exitU32(0)
		nd := c.run.exitU32(4)
		if nd > 16 {
			nd = 16
		}
		d := c.run.exitWords(8, int(nd))
		e := &Exit{Reason: ExitInternalError, VCPU: c.id, KVMReason: reason, Suberror: sub, Data: d,
			Detail: fmt.Sprintf("KVM internal error: suberror %d (%s), data %#x", sub, internalSuberror(sub), d)}
		if r, err := vm.GetRegs(c.id); err == nil {
			e.Detail += fmt.Sprintf(", rip=%#x", r.RIP)
		}
		return e
	default:
		return &Exit{Reason: ExitError, VCPU: c.id, KVMReason: reason, Detail: fmt.Sprintf("unexpected KVM exit reason %d", reason)}
	}
	return nil
}

func internalSuberror(s uint32) string {
	switch s {
	case 1:
		return "emulation failure"
	case 2:
		return "simultaneous exception"
	case 3:
		return "delivery event"
	case 4:
		return "unexpected exit reason"
	}
	return "unknown"
}

// Exits returns how many exits each vCPU has handled in the VMM so far.
// It is exact once the VM has stopped.
func (vm *VM) Exits() []uint64 {
	out := make([]uint64, len(vm.vcpus))
	for i, c := range vm.vcpus {
		out[i] = c.exits
	}
	return out
}

// SetupLongModeAP puts vCPU i (i > 0) directly into 64-bit mode at entry
// and makes it runnable, instead of waiting for the boot vCPU's INIT/SIPI.
// It is for hand-written test guests; Linux starts its APs itself.
func (vm *VM) SetupLongModeAP(i int, entry uint64) error {
	if i <= 0 || i >= len(vm.vcpus) {
		return fmt.Errorf("vmm: no application processor %d", i)
	}
	c := vm.vcpus[i]
	var s Sregs
	if err := ioctlPtr(c.fd, kvmGetSregs, &s); err != nil {
		return kvmErr("KVM_GET_SREGS", err)
	}
	if err := writeLongModeTables(vm.mem, &s); err != nil {
		return err
	}
	if err := ioctlPtr(c.fd, kvmSetSregs, &s); err != nil {
		return kvmErr("KVM_SET_SREGS", err)
	}
	r := Regs{RIP: entry, RFLAGS: 2, RSP: BootStack - uint64(i)*0x100}
	if err := ioctlPtr(c.fd, kvmSetRegs, &r); err != nil {
		return kvmErr("KVM_SET_REGS", err)
	}
	return kvmErr("KVM_SET_MP_STATE", setMPState(c.fd, mpStateRunnable))
}
