package vmm

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gosandbox/sandbox/vmm/guestmem"
)

// Defaults for Config fields left zero.
const (
	DefaultMemory     = 256 << 20
	DefaultVCPUs      = 1
	DefaultConsoleLog = 64 << 10
	MaxVCPUs          = 32
)

// Config describes a VM. The zero value is valid: one vCPU, 256 MiB.
type Config struct {
	// Memory is the guest RAM in bytes, a multiple of 4096. Zero means
	// DefaultMemory.
	Memory uint64
	// VCPUs is the number of virtual CPUs, 1..MaxVCPUs. Zero means 1.
	VCPUs int
	// Console receives what the guest writes to its serial port (COM1).
	// Nil drops it; the tail is kept in ConsoleLog either way. A slow
	// writer slows the guest.
	Console io.Writer
	// ConsoleLogSize bounds the in-memory console log. Zero means 64 KiB.
	ConsoleLogSize int
	// Logger receives debug records. Nil means silent.
	Logger *slog.Logger
}

func (c *Config) validate() error {
	if c.Memory == 0 {
		c.Memory = DefaultMemory
	}
	if c.VCPUs == 0 {
		c.VCPUs = DefaultVCPUs
	}
	if c.ConsoleLogSize == 0 {
		c.ConsoleLogSize = DefaultConsoleLog
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	switch {
	case c.Memory%guestmem.PageSize != 0:
		return &ConfigError{"Memory", "must be a multiple of 4096 bytes"}
	case c.Memory < 2<<20:
		return &ConfigError{"Memory", "must be at least 2 MiB"}
	case c.Memory > guestmem.MaxSize:
		return &ConfigError{"Memory", "must be at most 1 TiB"}
	case c.VCPUs < 1 || c.VCPUs > MaxVCPUs:
		return &ConfigError{"VCPUs", fmt.Sprintf("must be between 1 and %d", MaxVCPUs)}
	case c.ConsoleLogSize < 0:
		return &ConfigError{"ConsoleLogSize", "must not be negative"}
	}
	return nil
}

// VM is one KVM virtual machine with its memory, vCPUs, in-kernel irqchip
// and PIT, and the legacy devices a Linux guest needs (COM1, i8042 reset,
// CMOS, the boot-phase port). Its methods are safe for concurrent use.
type VM struct {
	cfg    Config
	log    *slog.Logger
	host   *Host
	kvm    *os.File
	vmfd   int
	mem    *guestmem.Memory
	vcpus  []*vcpu
	bus    *Bus
	serial *Serial
	conlog *RingLog

	supportedCPUID []cpuidEntry
	tscDeadline    bool // KVM emulates the TSC-deadline timer

	mu      sync.Mutex // guards the fields below
	phases  Phases
	started bool
	closed  bool
	routes  map[uint32]routingEntry // extra GSI routes (MSI)

	stopping   atomic.Bool
	exitOnce   sync.Once
	exit       *Exit
	done       chan struct{} // closed when every vCPU goroutine returned
	exited     chan struct{} // closed when the exit reason is set
	wg         sync.WaitGroup
	populate   []memRange     // guest memory to populate alongside the boot (LoadLinux)
	bg         sync.WaitGroup // the populating goroutine
	panicLine  atomic.Pointer[string]
	poweroff   atomic.Bool
	panicTimer *time.Timer
}

// New creates a VM: it opens /dev/kvm, checks capabilities, maps guest
// memory, creates the irqchip, PIT and vCPUs, and wires the legacy devices.
// The guest does not run until Start. New works on any KVM host, PVM
// included (tiny test guests run there); callers booting Linux should check
// Probe().CanBootLinux() first (BootLinux does).
func New(cfg Config) (*VM, error) { return newVM(cfg, true) }

func newVM(cfg Config, probe bool) (_ *VM, err error) {
	created := time.Now()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	vm := &VM{
		cfg:    cfg,
		log:    cfg.Logger,
		vmfd:   -1,
		bus:    &Bus{},
		done:   make(chan struct{}),
		exited: make(chan struct{}),
		routes: map[uint32]routingEntry{},
	}
	vm.phases.Created = created
	defer func() {
		if err != nil {
			vm.release()
		}
	}()
	if vm.kvm, err = openKVM(); err != nil {
		return nil, err
	}
	kfd := int(vm.kvm.Fd())
	if vm.host, err = probeFD(kfd); err != nil {
		return nil, err
	}
	if vm.host.MaxVCPUs > 0 && cfg.VCPUs > vm.host.MaxVCPUs {
		return nil, &ConfigError{"VCPUs", fmt.Sprintf("this host allows at most %d", vm.host.MaxVCPUs)}
	}
	fd, err := ioctlRetry(kfd, kvmCreateVM, 0)
	if err != nil {
		return nil, kvmErr("KVM_CREATE_VM", err)
	}
	vm.vmfd = int(fd)
	unix.CloseOnExec(vm.vmfd)

	if _, err := ioctl(vm.vmfd, kvmSetTSSAddr, tssAddr); err != nil {
		return nil, kvmErr("KVM_SET_TSS_ADDR", err)
	}
	ident := uint64(identityMapAddr)
	if err := ioctlPtr(vm.vmfd, kvmSetIdentityMapAddr, &ident); err != nil {
		return nil, kvmErr("KVM_SET_IDENTITY_MAP_ADDR", err)
	}
	// Guest memory is registered before the in-kernel irqchip exists:
	// after it, each memslot change waits for the irqchip's devices (an
	// SRCU grace period), which made registration 6-9 ms of New on PVM
	// hosts against under 1 ms for memory, irqchip and PIT in this order.
	if vm.mem, err = guestmem.New(cfg.Memory); err != nil {
		return nil, err
	}
	if err := vm.registerMemory(); err != nil {
		return nil, err
	}
	if _, err := ioctl(vm.vmfd, kvmCreateIRQChip, 0); err != nil {
		return nil, kvmErr("KVM_CREATE_IRQCHIP", err)
	}
	pit := pitConfig{}
	if err := ioctlPtr(vm.vmfd, kvmCreatePIT2, &pit); err != nil {
		return nil, kvmErr("KVM_CREATE_PIT2", err)
	}

	if vm.supportedCPUID, err = getSupportedCPUID(kfd); err != nil {
		return nil, kvmErr("KVM_GET_SUPPORTED_CPUID", err)
	}
	if flags, _ := cpuFlags(); probe && needsXSAVEProbe(flags, vm.supportedCPUID) {
		ok, perr := hostXSAVE.get(xsaveSizeFollowsXCR0)
		if !ok {
			vm.log.Debug("XSAVE size does not follow XCR0 on this host; hiding XSAVE from the guest", "probe_err", perr)
			vm.supportedCPUID = maskXSAVE(vm.supportedCPUID)
		}
	}
	if n, _ := ioctl(kfd, kvmCheckExtension, capTSCDeadline); n > 0 {
		vm.tscDeadline = true
	}
	mmapSize, err := ioctl(kfd, kvmGetVCPUMmapSize, 0)
	if err != nil {
		return nil, kvmErr("KVM_GET_VCPU_MMAP_SIZE", err)
	}
	for i := 0; i < cfg.VCPUs; i++ {
		c, err := vm.newVCPU(i, int(mmapSize))
		if err != nil {
			return nil, err
		}
		vm.vcpus = append(vm.vcpus, c)
	}
	if err := vm.addLegacyDevices(); err != nil {
		return nil, err
	}
	if err := writeMPTable(vm.mem, cfg.VCPUs); err != nil {
		return nil, err
	}
	vm.log.Debug("vm created", "host", vm.host.String(), "memory", cfg.Memory, "vcpus", cfg.VCPUs)
	return vm, nil
}

func (vm *VM) addLegacyDevices() error {
	vm.conlog = NewRingLog(vm.cfg.ConsoleLogSize)
	vm.serial = NewSerial(vm.cfg.Console, vm.conlog, func() { vm.pulseIRQ(COM1IRQ) }, vm.consoleLine)
	adds := []struct {
		base, size uint16
		dev        PortDevice
	}{
		{COM1Port, 8, vm.serial},
		{0x60, 1, &i8042{reset: vm.guestReset}},
		{0x64, 1, &i8042{reset: vm.guestReset}},
		{0x70, 2, &cmos{}},
		{0x80, 1, sink{}}, // POST codes
		{0xed, 1, sink{}}, // I/O delay port
		{BootPort, 1, &bootPort{vm: vm}},
	}
	for _, a := range adds {
		if err := vm.bus.AddPort(a.base, a.size, a.dev); err != nil {
			return err
		}
	}
	return nil
}

// Host describes the KVM host the VM runs on.
func (vm *VM) Host() *Host { return vm.host }

// Memory returns the guest's RAM.
func (vm *VM) Memory() *guestmem.Memory { return vm.mem }

// Bus returns the device bus, to add devices before Start.
func (vm *VM) Bus() *Bus { return vm.bus }

// VCPUs returns the number of vCPUs.
func (vm *VM) VCPUs() int { return len(vm.vcpus) }

// ConsoleLog returns the tail of the guest's serial console output.
func (vm *VM) ConsoleLog() []byte { return vm.conlog.Bytes() }

// Phases returns the boot-phase timestamps recorded so far.
func (vm *VM) Phases() Phases {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	return vm.phases
}

// String describes the VM in one line.
func (vm *VM) String() string {
	state := "created"
	vm.mu.Lock()
	switch {
	case vm.closed:
		state = "closed"
	case vm.exit != nil:
		state = "exited: " + vm.exit.Reason.String()
	case vm.started:
		state = "running"
	}
	vm.mu.Unlock()
	return fmt.Sprintf("vm(%d vCPUs, %d MiB, %s)", len(vm.vcpus), vm.cfg.Memory>>20, state)
}

func (vm *VM) bootMarker(v uint8) {
	now := time.Now()
	vm.mu.Lock()
	switch v {
	case PhaseInitStarted:
		if vm.phases.InitExec.IsZero() {
			vm.phases.InitExec = now
		}
	case PhaseAgentReady:
		if vm.phases.AgentReady.IsZero() {
			vm.phases.AgentReady = now
		}
	case PhasePoweroff:
		vm.poweroff.Store(true)
	}
	vm.mu.Unlock()
	vm.log.Debug("boot marker", "value", v)
}

// consoleLine watches the console for a kernel panic.
func (vm *VM) consoleLine(line string) {
	if i := strings.Index(line, "Kernel panic - not syncing"); i >= 0 && vm.panicLine.Load() == nil {
		l := line[i:]
		vm.panicLine.Store(&l)
		// A panicking kernel with panic=-1 resets at once; if it hangs
		// instead (panic=0), end the VM shortly after its last words.
		t := time.AfterFunc(2*time.Second, func() {
			vm.finish(&Exit{Reason: ExitPanic, Detail: l})
		})
		vm.mu.Lock()
		vm.panicTimer = t
		vm.mu.Unlock()
	}
}

// guestReset handles the i8042 reset command: the guest rebooted, powered
// off (after a PhasePoweroff marker) or panicked.
func (vm *VM) guestReset() {
	switch {
	case vm.panicLine.Load() != nil:
		vm.finish(&Exit{Reason: ExitPanic, Detail: *vm.panicLine.Load()})
	case vm.poweroff.Load():
		vm.finish(&Exit{Reason: ExitPoweroff})
	default:
		vm.finish(&Exit{Reason: ExitReset})
	}
}

// SetIRQLevel sets the level of an in-kernel irqchip input (GSI).
func (vm *VM) SetIRQLevel(gsi uint32, high bool) error {
	l := irqLevel{IRQ: gsi}
	if high {
		l.Level = 1
	}
	return kvmErr("KVM_IRQ_LINE", ioctlPtr(vm.vmfd, kvmIRQLine, &l))
}

// pulseIRQ raises and lowers an edge-triggered ISA interrupt.
func (vm *VM) pulseIRQ(gsi uint32) {
	if err := vm.SetIRQLevel(gsi, true); err != nil {
		vm.log.Debug("irq", "gsi", gsi, "err", err)
		return
	}
	vm.SetIRQLevel(gsi, false)
}

// SignalMSI injects one message-signalled interrupt.
func (vm *VM) SignalMSI(addr uint64, data uint32) error {
	_, err := signalMSI(vm.vmfd, addr, data)
	return kvmErr("KVM_SIGNAL_MSI", err)
}

// GSIs 0-23 are the IOAPIC's pins; MSI routes take the GSIs above, up to
// KVM's limit of routing entries.
const (
	firstMSIGSI = 24
	maxGSI      = 4096
)

// defaultRoutes is KVM's default GSI routing: GSIs 0-15 to the PIC and
// IOAPIC, 16-23 to the IOAPIC only. Setting any route replaces the whole
// table, so it is always sent along.
func defaultRoutes() []routingEntry {
	var rs []routingEntry
	for gsi := uint32(0); gsi < 24; gsi++ {
		if gsi < 16 {
			chip := uint32(0)
			if gsi >= 8 {
				chip = 1
			}
			rs = append(rs, routingEntry{GSI: gsi, Type: routingIRQChip, U: [8]uint32{chip, gsi % 8}})
		}
		rs = append(rs, routingEntry{GSI: gsi, Type: routingIRQChip, U: [8]uint32{2, gsi}})
	}
	return rs
}

// AllocMSIRoute reserves a GSI and routes it to the MSI message (addr,
// data). Pair it with AddIRQFD to let an eventfd raise the interrupt without
// a trip through Go on a vCPU thread.
func (vm *VM) AllocMSIRoute(addr uint64, data uint32) (uint32, error) {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	gsi := uint32(firstMSIGSI)
	for ; gsi < maxGSI; gsi++ {
		if _, used := vm.routes[gsi]; !used {
			break
		}
	}
	if gsi == maxGSI {
		return 0, fmt.Errorf("vmm: all %d MSI routes are in use", maxGSI-firstMSIGSI)
	}
	vm.routes[gsi] = msiRoute(gsi, addr, data)
	if err := vm.commitRoutesLocked(); err != nil {
		delete(vm.routes, gsi)
		return 0, err
	}
	return gsi, nil
}

// UpdateMSIRoute re-targets a GSI from AllocMSIRoute.
func (vm *VM) UpdateMSIRoute(gsi uint32, addr uint64, data uint32) error {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	if _, ok := vm.routes[gsi]; !ok {
		return fmt.Errorf("vmm: GSI %d is not an MSI route", gsi)
	}
	vm.routes[gsi] = msiRoute(gsi, addr, data)
	return vm.commitRoutesLocked()
}

// FreeMSIRoute drops a GSI from AllocMSIRoute.
func (vm *VM) FreeMSIRoute(gsi uint32) error {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	delete(vm.routes, gsi)
	return vm.commitRoutesLocked()
}

func msiRoute(gsi uint32, addr uint64, data uint32) routingEntry {
	return routingEntry{GSI: gsi, Type: routingMSI, U: [8]uint32{uint32(addr), uint32(addr >> 32), data}}
}

func (vm *VM) commitRoutesLocked() error {
	rs := defaultRoutes()
	for _, r := range vm.routes {
		rs = append(rs, r)
	}
	return kvmErr("KVM_SET_GSI_ROUTING", setGSIRouting(vm.vmfd, rs))
}

// AddIRQFD makes a write to eventfd fd raise GSI gsi.
func (vm *VM) AddIRQFD(fd int, gsi uint32) error {
	a := irqfdArg{FD: uint32(fd), GSI: gsi}
	return kvmErr("KVM_IRQFD", ioctlPtr(vm.vmfd, kvmIRQFD, &a))
}

// RemoveIRQFD undoes AddIRQFD.
func (vm *VM) RemoveIRQFD(fd int, gsi uint32) error {
	a := irqfdArg{FD: uint32(fd), GSI: gsi, Flags: irqfdFlagDeassign}
	return kvmErr("KVM_IRQFD deassign", ioctlPtr(vm.vmfd, kvmIRQFD, &a))
}

// Ioevent describes a guest write that KVM turns into an eventfd signal.
type Ioevent struct {
	Addr      uint64  // guest-physical MMIO address, or port number if PIO
	Len       uint32  // access width: 0 (any), 1, 2, 4 or 8
	Datamatch *uint64 // if set, only writes of this value signal
	PIO       bool    // port I/O instead of MMIO
}

func (e Ioevent) arg(fd int, deassign bool) ioeventfdArg {
	a := ioeventfdArg{Addr: e.Addr, Len: e.Len, FD: int32(fd)}
	if e.Datamatch != nil {
		a.Flags |= ioeventfdFlagDatamatch
		a.Datamatch = *e.Datamatch
	}
	if e.PIO {
		a.Flags |= ioeventfdFlagPIO
	}
	if deassign {
		a.Flags |= ioeventfdFlagDeassign
	}
	return a
}

// AddIoevent makes guest writes matching e signal eventfd fd inside KVM,
// without an exit to the VMM.
func (vm *VM) AddIoevent(e Ioevent, fd int) error {
	a := e.arg(fd, false)
	return kvmErr("KVM_IOEVENTFD", ioctlPtr(vm.vmfd, kvmIOEventFD, &a))
}

// RemoveIoevent undoes AddIoevent.
func (vm *VM) RemoveIoevent(e Ioevent, fd int) error {
	a := e.arg(fd, true)
	return kvmErr("KVM_IOEVENTFD deassign", ioctlPtr(vm.vmfd, kvmIOEventFD, &a))
}

func (vm *VM) registerMemory() error {
	for i, r := range vm.mem.Regions() {
		reg := userMemoryRegion{Slot: uint32(i), GuestPhysAddr: r.GPA, MemorySize: r.Size, UserspaceAddr: uint64(r.HostAddr())}
		if err := setUserMemoryRegion(vm.vmfd, &reg); err != nil {
			return kvmErr("KVM_SET_USER_MEMORY_REGION", err)
		}
	}
	return nil
}

// Start runs the vCPUs. The boot vCPU must have been set up (BootLinux or
// SetupLongMode).
func (vm *VM) Start() error {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	switch {
	case vm.closed:
		return ErrClosed
	case vm.started:
		return ErrRunning
	}
	vm.started = true
	vm.wg.Add(len(vm.vcpus))
	for _, c := range vm.vcpus {
		go vm.runVCPU(c)
	}
	if len(vm.populate) > 0 {
		vm.bg.Add(1)
		go vm.populateMemory(vm.populate)
	}
	go func() {
		vm.wg.Wait()
		close(vm.done)
	}()
	return nil
}

// Wait blocks until the VM exits (guest power-off, reset, panic, error or
// Stop) and returns how. It returns ctx.Err() if ctx ends first; the VM
// keeps running then.
func (vm *VM) Wait(ctx context.Context) (*Exit, error) {
	vm.mu.Lock()
	started := vm.started
	vm.mu.Unlock()
	if !started {
		return nil, ErrNotStarted
	}
	select {
	case <-vm.exited:
		<-vm.done
		return vm.exit, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// Done is closed once the VM has exited and all vCPUs have stopped.
func (vm *VM) Done() <-chan struct{} { return vm.done }

// Stop forces the vCPUs out of the guest and ends the VM with ExitStopped
// (unless it already exited). It waits until every vCPU goroutine returned
// or ctx ends.
func (vm *VM) Stop(ctx context.Context) error {
	vm.mu.Lock()
	started := vm.started
	vm.mu.Unlock()
	if !started {
		return ErrNotStarted
	}
	vm.finish(&Exit{Reason: ExitStopped})
	select {
	case <-vm.done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// finish records the first exit and kicks every vCPU out of the guest.
func (vm *VM) finish(e *Exit) {
	vm.exitOnce.Do(func() {
		e.Time = time.Now()
		if e.ConsoleTail == "" {
			e.ConsoleTail = tail(vm.conlog.Bytes(), 2048)
		}
		vm.mu.Lock()
		vm.exit = e
		if vm.panicTimer != nil {
			vm.panicTimer.Stop()
		}
		vm.mu.Unlock()
		vm.stopping.Store(true)
		close(vm.exited)
		vm.log.Debug("vm exit", "reason", e.Reason.String(), "detail", e.Detail)
		go vm.kickAll()
	})
}

func tail(b []byte, n int) string {
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(b)
}

// kickAll forces every vCPU out of KVM_RUN until all have returned.
func (vm *VM) kickAll() {
	for {
		for _, c := range vm.vcpus {
			c.kick()
		}
		select {
		case <-vm.done:
			return
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// Close stops the VM if it runs and releases every fd, mapping and
// goroutine it owns. It is safe to call more than once.
func (vm *VM) Close() error {
	vm.mu.Lock()
	if vm.closed {
		vm.mu.Unlock()
		return nil
	}
	vm.closed = true
	started := vm.started
	vm.mu.Unlock()
	if started {
		vm.finish(&Exit{Reason: ExitStopped})
		<-vm.done
	}
	vm.bg.Wait() // before guest memory is unmapped
	return vm.release()
}

func (vm *VM) release() error {
	var errs []error
	for _, c := range vm.vcpus {
		errs = append(errs, c.close())
	}
	vm.vcpus = nil
	if vm.vmfd >= 0 {
		errs = append(errs, unix.Close(vm.vmfd))
		vm.vmfd = -1
	}
	if vm.mem != nil {
		errs = append(errs, vm.mem.Close())
	}
	if vm.kvm != nil {
		errs = append(errs, vm.kvm.Close())
		vm.kvm = nil
	}
	return errors.Join(errs...)
}
