package virtiotest

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/gosandbox/sandbox/virtio"
	"github.com/gosandbox/sandbox/vmm/guestmem"
)

// WaitTimeout bounds how long Harness waits for a device before failing
// the test. It guards against hangs; it is not a performance assertion.
const WaitTimeout = 20 * time.Second

// HarnessOptions tunes NewHarness.
type HarnessOptions struct {
	// Features are the features the fake driver accepts; zero means the
	// device's features plus VERSION_1 and EVENT_IDX and INDIRECT_DESC.
	Features uint64
	// QueueSize overrides every queue's size (0: the device maximum).
	QueueSize uint16
	// DataPerQueue is the data area per queue for Add, split into one slot
	// per descriptor (0: 64 KiB per descriptor; guest memory is mapped
	// lazily, so this costs only what is touched).
	DataPerQueue uint64
	// NoActivate leaves the device inactive (call Activate yourself).
	NoActivate bool
}

// Harness activates a device directly (no PCI) against driver queues in a
// private guest memory.
type Harness struct {
	T      testing.TB
	Mem    *guestmem.Memory
	Dev    virtio.Device
	Queues []*DriverQueue
	// DevQueues are the device-side queues handed to Activate.
	DevQueues []*virtio.Queue
	Features  uint64

	irq     []chan struct{}
	cfgIRQ  chan struct{}
	mu      sync.Mutex
	failErr error
	failed  chan struct{}
}

// NewHarness builds guest memory and queues for dev and activates it. The
// device is reset and closed, and the memory freed, by t.Cleanup.
func NewHarness(t testing.TB, dev virtio.Device, opts HarnessOptions) *Harness {
	t.Helper()
	sizes := dev.QueueSizes()
	dataFor := func(s uint16) uint64 {
		if opts.DataPerQueue != 0 {
			return (opts.DataPerQueue + 4095) &^ 4095
		}
		return uint64(s) * 64 << 10
	}
	var total uint64 = guestmem.PageSize
	for _, s := range sizes {
		if opts.QueueSize != 0 {
			s = opts.QueueSize
		}
		total += (RingBytes(s)+4095)&^4095 + dataFor(s)
	}
	total = (total + 4095) &^ 4095
	mem, err := guestmem.New(total)
	if err != nil {
		t.Fatalf("virtiotest: guest memory: %v", err)
	}
	h := &Harness{T: t, Mem: mem, Dev: dev, failed: make(chan struct{}), cfgIRQ: make(chan struct{}, 1)}
	h.Features = opts.Features
	if h.Features == 0 {
		h.Features = dev.Features() | virtio.FeatureVersion1 | virtio.FeatureEventIdx | virtio.FeatureIndirectDesc
	}
	next := uint64(guestmem.PageSize)
	for i, s := range sizes {
		if opts.QueueSize != 0 {
			s = opts.QueueSize
		}
		rings := (RingBytes(s) + 4095) &^ 4095
		data := dataFor(s)
		dq := NewDriverQueue(mem, s, next, next+rings, data)
		dq.EventIdx = h.Features&virtio.FeatureEventIdx != 0
		next += rings + data
		h.Queues = append(h.Queues, dq)
		ch := make(chan struct{}, 1)
		h.irq = append(h.irq, ch)
		cfg := dq.Config(i)
		cfg.MaxSize = sizes[i]
		cfg.Indirect = h.Features&virtio.FeatureIndirectDesc != 0
		cfg.Interrupt = func() error { signal(ch); return nil }
		cfg.Fail = h.fail
		q, err := virtio.NewQueue(mem, cfg)
		if err != nil {
			t.Fatalf("virtiotest: queue %d: %v", i, err)
		}
		h.DevQueues = append(h.DevQueues, q)
	}
	t.Cleanup(func() {
		dev.Close()
		mem.Close()
	})
	if !opts.NoActivate {
		h.Activate()
	}
	return h
}

func signal(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

// Activation returns the activation NewHarness passes to the device.
func (h *Harness) Activation() *virtio.Activation {
	return &virtio.Activation{
		Mem:           h.Mem,
		Features:      h.Features,
		Queues:        h.DevQueues,
		Fail:          h.fail,
		ConfigChanged: func() { signal(h.cfgIRQ) },
	}
}

// Activate activates the device.
func (h *Harness) Activate() {
	h.T.Helper()
	if err := h.Dev.Activate(h.Activation()); err != nil {
		h.T.Fatalf("virtiotest: Activate: %v", err)
	}
}

func (h *Harness) fail(err error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.failErr == nil {
		h.failErr = err
		close(h.failed)
	}
}

// Failed returns a channel closed when the device reports Fail.
func (h *Harness) Failed() <-chan struct{} { return h.failed }

// FailErr returns the error the device failed with, or nil.
func (h *Harness) FailErr() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.failErr
}

// Kick notifies the device about queue i (if the device asked for it).
func (h *Harness) Kick(i int) {
	h.Queues[i].NeedKick()
	h.DevQueues[i].Kick()
}

// Add publishes a chain on queue i and kicks; it fails the test on error.
func (h *Harness) Add(i int, out [][]byte, in ...int) uint16 {
	h.T.Helper()
	head, err := h.Queues[i].Add(out, in...)
	if err != nil {
		h.T.Fatalf("virtiotest: queue %d: %v", i, err)
	}
	h.Kick(i)
	return head
}

// Interrupts returns the channel signalled when queue i raises an interrupt.
func (h *Harness) Interrupts(i int) <-chan struct{} { return h.irq[i] }

// ConfigInterrupts returns the channel signalled on a config change.
func (h *Harness) ConfigInterrupts() <-chan struct{} { return h.cfgIRQ }

// TryUsed returns a used entry of queue i if one is there.
func (h *Harness) TryUsed(i int) (Used, bool) {
	h.T.Helper()
	u, ok, err := h.Queues[i].PopUsed()
	if err != nil {
		h.T.Fatal(err)
	}
	return u, ok
}

// WaitUsed blocks until queue i has a used entry and returns it. It fails
// the test if the device fails or nothing comes within WaitTimeout.
func (h *Harness) WaitUsed(i int) Used {
	h.T.Helper()
	u, err := h.WaitUsedContext(context.Background(), i)
	if err != nil {
		h.T.Fatalf("virtiotest: queue %d: %v", i, err)
	}
	return u
}

// WaitUsedContext is WaitUsed returning errors instead of failing the test.
func (h *Harness) WaitUsedContext(ctx context.Context, i int) (Used, error) {
	timer := time.NewTimer(WaitTimeout)
	defer timer.Stop()
	for {
		u, ok, err := h.Queues[i].PopUsed()
		if err != nil || ok {
			return u, err
		}
		select {
		case <-h.irq[i]:
		case <-h.failed:
			// Drain what was pushed before the failure.
			if u, ok, err := h.Queues[i].PopUsed(); err != nil || ok {
				return u, err
			}
			return Used{}, h.FailErr()
		case <-ctx.Done():
			return Used{}, ctx.Err()
		case <-timer.C:
			return Used{}, context.DeadlineExceeded
		}
	}
}
