package vmm

import (
	"sync"
	"time"
)

// i8042 is the minimum of a PS/2 controller a Linux guest needs: it has no
// keyboard, and the reset command (0xfe to port 0x64) ends the VM.
type i8042 struct {
	reset func()
}

func (d *i8042) ReadPort(port uint16, data []byte) {
	data[0] = 0 // no output pending, input buffer empty
}

func (d *i8042) WritePort(port uint16, data []byte) {
	if port == 0x64 && data[0] == 0xfe && d.reset != nil {
		d.reset()
	}
}

// cmos answers the RTC/CMOS ports with zeros, so nothing waits on an update
// in progress. The guest's clock comes from kvmclock and the agent.
type cmos struct {
	mu  sync.Mutex
	idx uint8
}

func (c *cmos) ReadPort(port uint16, data []byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if port == 0x70 {
		data[0] = c.idx
		return
	}
	switch c.idx & 0x7f {
	case 0x0b:
		data[0] = 0x02 // 24-hour mode, BCD
	case 0x0d:
		data[0] = 0x80 // valid RAM and time
	default:
		data[0] = 0
	}
}

func (c *cmos) WritePort(port uint16, data []byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if port == 0x70 {
		c.idx = data[0]
	}
}

// sink swallows writes and reads as zero (port 0x80 POST codes and the like).
type sink struct{}

func (sink) ReadPort(port uint16, data []byte) {
	for i := range data {
		data[i] = 0
	}
}
func (sink) WritePort(port uint16, data []byte) {}

// BootPort is the I/O port the guest init writes boot-phase markers to (one
// byte; the guest writes it through /dev/port).
const BootPort = 0x440

// Boot-phase values written to BootPort.
const (
	PhaseInitStarted = 1 // guest init began executing
	PhaseAgentReady  = 2 // guest agent is serving
	PhasePoweroff    = 3 // guest asks for a clean power-off (then resets)
)

// Phases records when a VM reached its boot phases. Zero times were not
// reached.
type Phases struct {
	Created    time.Time // New was called
	FirstRun   time.Time // the boot vCPU entered KVM_RUN for the first time
	InitExec   time.Time // the guest init wrote PhaseInitStarted
	AgentReady time.Time // the guest wrote PhaseAgentReady
}

// ToFirstRun is the time from New to the first KVM_RUN.
func (p Phases) ToFirstRun() time.Duration { return sub(p.FirstRun, p.Created) }

// ToInit is the time from New to the guest init's first instruction.
func (p Phases) ToInit() time.Duration { return sub(p.InitExec, p.Created) }

// ToAgent is the time from New to the agent being ready.
func (p Phases) ToAgent() time.Duration { return sub(p.AgentReady, p.Created) }

func sub(a, b time.Time) time.Duration {
	if a.IsZero() || b.IsZero() {
		return 0
	}
	return a.Sub(b)
}

type bootPort struct {
	vm *VM
}

func (b *bootPort) ReadPort(port uint16, data []byte) { data[0] = 0 }

func (b *bootPort) WritePort(port uint16, data []byte) {
	b.vm.bootMarker(data[0])
}
