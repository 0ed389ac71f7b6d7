package virtiotest

import (
	"errors"
	"testing"
	"time"

	"github.com/gosandbox/sandbox/virtio"
)

// HostileRing is one way to corrupt a split virtqueue.
type HostileRing struct {
	Name string
	// Want is the sentinel the queue must report.
	Want error
	// Setup corrupts q (already laid out and empty) and publishes.
	Setup func(q *DriverQueue)
	// MinSize is the smallest queue size the case applies to (0: any).
	MinSize uint16
}

// HostileRings returns the ring corruptions TestDevice applies. Each one
// publishes exactly one bad avail entry (or a bad avail index).
func HostileRings() []HostileRing {
	valid := func(q *DriverQueue) uint64 { return q.DataBase }
	return []HostileRing{
		{"avail index jump", virtio.ErrAvailIndex, func(q *DriverQueue) {
			q.WriteDesc(0, valid(q), 16, 0, 0)
			q.PublishRaw(0, q.Size+1)
		}, 0},
		{"head out of range", virtio.ErrDescIndex, func(q *DriverQueue) {
			q.PublishRaw(q.Size, 1)
		}, 0},
		{"head 0xffff", virtio.ErrDescIndex, func(q *DriverQueue) {
			q.PublishRaw(0xffff, 1)
		}, 0},
		{"next out of range", virtio.ErrDescIndex, func(q *DriverQueue) {
			q.WriteDesc(0, valid(q), 16, virtio.DescFNext, q.Size)
			q.PublishRaw(0, 1)
		}, 0},
		{"descriptor loop", virtio.ErrChainTooLong, func(q *DriverQueue) {
			q.WriteDesc(0, valid(q), 16, virtio.DescFNext|virtio.DescFWrite, 0)
			q.PublishRaw(0, 1)
		}, 0},
		{"two-descriptor loop", virtio.ErrChainTooLong, func(q *DriverQueue) {
			if q.Size < 2 {
				q.WriteDesc(0, valid(q), 16, virtio.DescFNext|virtio.DescFWrite, 0)
			} else {
				q.WriteDesc(0, valid(q), 16, virtio.DescFNext|virtio.DescFWrite, 1)
				q.WriteDesc(1, valid(q), 16, virtio.DescFNext|virtio.DescFWrite, 0)
			}
			q.PublishRaw(0, 1)
		}, 0},
		{"buffer outside RAM", virtio.ErrDescAddress, func(q *DriverQueue) {
			q.WriteDesc(0, q.Mem.End()+4096, 16, virtio.DescFWrite, 0)
			q.PublishRaw(0, 1)
		}, 0},
		{"buffer straddles end of RAM", virtio.ErrDescAddress, func(q *DriverQueue) {
			q.WriteDesc(0, q.Mem.End()-8, 16, virtio.DescFWrite, 0)
			q.PublishRaw(0, 1)
		}, 0},
		{"buffer address wraps", virtio.ErrDescAddress, func(q *DriverQueue) {
			q.WriteDesc(0, ^uint64(0)-4, 16, virtio.DescFWrite, 0)
			q.PublishRaw(0, 1)
		}, 0},
		{"4 GiB length", virtio.ErrDescAddress, func(q *DriverQueue) {
			q.WriteDesc(0, valid(q), 0xffffffff, virtio.DescFWrite, 0)
			q.PublishRaw(0, 1)
		}, 0},
		{"readable after writable", virtio.ErrDescOrder, func(q *DriverQueue) {
			t := valid(q)
			WriteDescAt(q.Mem, t, t+256, 16, virtio.DescFWrite|virtio.DescFNext, 1)
			WriteDescAt(q.Mem, t+16, t+256, 16, 0, 0)
			q.WriteDesc(0, t, 32, virtio.DescFIndirect, 0)
			q.PublishRaw(0, 1)
		}, 2},
		{"indirect with next", virtio.ErrIndirect, func(q *DriverQueue) {
			WriteDescAt(q.Mem, valid(q), valid(q)+64, 16, virtio.DescFWrite, 0)
			q.WriteDesc(0, valid(q), 16, virtio.DescFIndirect|virtio.DescFNext, 0)
			q.PublishRaw(0, 1)
		}, 0},
		{"indirect length not a multiple of 16", virtio.ErrIndirect, func(q *DriverQueue) {
			q.WriteDesc(0, valid(q), 17, virtio.DescFIndirect, 0)
			q.PublishRaw(0, 1)
		}, 0},
		{"indirect length 0", virtio.ErrIndirect, func(q *DriverQueue) {
			q.WriteDesc(0, valid(q), 0, virtio.DescFIndirect, 0)
			q.PublishRaw(0, 1)
		}, 0},
		{"nested indirect", virtio.ErrIndirect, func(q *DriverQueue) {
			WriteDescAt(q.Mem, valid(q), valid(q)+64, 16, virtio.DescFIndirect, 0)
			q.WriteDesc(0, valid(q), 16, virtio.DescFIndirect, 0)
			q.PublishRaw(0, 1)
		}, 0},
		{"indirect table outside RAM", virtio.ErrDescAddress, func(q *DriverQueue) {
			q.WriteDesc(0, q.Mem.End()-16, 32, virtio.DescFIndirect, 0)
			q.PublishRaw(0, 1)
		}, 0},
		{"indirect loop", virtio.ErrChainTooLong, func(q *DriverQueue) {
			t := valid(q)
			WriteDescAt(q.Mem, t, t+256, 16, virtio.DescFWrite|virtio.DescFNext, 1)
			WriteDescAt(q.Mem, t+16, t+256, 16, virtio.DescFWrite|virtio.DescFNext, 0)
			q.WriteDesc(0, t, 32, virtio.DescFIndirect, 0)
			q.PublishRaw(0, 1)
		}, 0},
		{"indirect next out of table", virtio.ErrDescIndex, func(q *DriverQueue) {
			t := valid(q)
			WriteDescAt(q.Mem, t, t+256, 16, virtio.DescFWrite|virtio.DescFNext, 2)
			WriteDescAt(q.Mem, t+16, t+256, 16, virtio.DescFWrite, 0)
			q.WriteDesc(0, t, 32, virtio.DescFIndirect, 0)
			q.PublishRaw(0, 1)
		}, 0},
	}
}

// TestDevice is a conformance suite for a virtio.Device. For each queue in
// kickQueues (queues the device consumes as soon as the driver kicks them)
// and each HostileRings case it builds a fresh device with newDev, corrupts
// the ring, kicks, and checks that the device reports Fail with a
// *virtio.QueueError matching the expected sentinel rather than panicking
// or hanging; then it resets and closes the device (twice). It also checks
// that every queue of a fresh device survives activation, Reset and Close
// with garbage-free empty rings.
func TestDevice(t *testing.T, newDev func(t *testing.T) virtio.Device, kickQueues ...int) {
	t.Run("lifecycle", func(t *testing.T) {
		dev := newDev(t)
		h := NewHarness(t, dev, HarnessOptions{})
		for i := range h.Queues {
			h.Kick(i)
		}
		dev.Reset()
		dev.Reset()
		h.Activate()
		dev.Reset()
		if err := dev.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
		if err := dev.Close(); err != nil {
			t.Errorf("second Close: %v", err)
		}
		if err := h.FailErr(); err != nil {
			t.Errorf("device failed on empty rings: %v", err)
		}
	})
	for _, qi := range kickQueues {
		for _, c := range HostileRings() {
			t.Run(c.Name, func(t *testing.T) {
				dev := newDev(t)
				h := NewHarness(t, dev, HarnessOptions{})
				if h.Queues[qi].Size < c.MinSize {
					t.Skipf("queue size %d < %d", h.Queues[qi].Size, c.MinSize)
				}
				c.Setup(h.Queues[qi])
				h.Kick(qi)
				select {
				case <-h.Failed():
				case <-time.After(WaitTimeout):
					t.Fatalf("queue %d: device did not report the broken ring within %v", qi, WaitTimeout)
				}
				err := h.FailErr()
				var qe *virtio.QueueError
				if !errors.As(err, &qe) || !errors.Is(err, c.Want) {
					t.Fatalf("queue %d: Fail(%v), want a *virtio.QueueError matching %v", qi, err, c.Want)
				}
				if qe.Queue != qi {
					t.Errorf("QueueError.Queue = %d, want %d", qe.Queue, qi)
				}
				dev.Reset()
				if err := dev.Close(); err != nil {
					t.Errorf("Close: %v", err)
				}
				dev.Close()
			})
		}
	}
}
