package virtio_test

import (
	"errors"
	"runtime"
	"testing"
	"time"

	"github.com/gosandbox/sandbox/virtio"
	"github.com/gosandbox/sandbox/virtio/virtiotest"
)

func TestPopOrArm(t *testing.T) {
	for _, eventIdx := range []bool{false, true} {
		mem := newMem(t)
		dq, q, fails, _ := pair(t, mem, 8, eventIdx)
		var c virtio.Chain
		// Published work is taken without arming.
		dq.Add(nil, 8)
		dq.NeedKick()
		if ok, err := q.PopOrArm(&c); !ok || err != nil {
			t.Fatalf("eventIdx=%v: PopOrArm with a chain = %v, %v", eventIdx, ok, err)
		}
		// An empty ring: false, and the driver is asked to kick for the
		// next chain.
		if ok, err := q.PopOrArm(&c); ok || err != nil {
			t.Fatalf("eventIdx=%v: PopOrArm on an empty ring = %v, %v", eventIdx, ok, err)
		}
		if eventIdx {
			if ev, _ := mem.Uint16(dq.Used + 4 + 8*8); ev != 1 {
				t.Errorf("avail_event = %d, want 1", ev)
			}
		}
		dq.Add(nil, 8)
		if !dq.NeedKick() {
			t.Errorf("eventIdx=%v: driver not asked to kick after PopOrArm armed", eventIdx)
		}
		if ok, err := q.PopOrArm(&c); !ok || err != nil {
			t.Fatalf("eventIdx=%v: PopOrArm after the driver published = %v, %v", eventIdx, ok, err)
		}
		// A broken ring reports its error.
		dq.PublishRaw(8, 1)
		if ok, err := q.PopOrArm(&c); ok || !errors.Is(err, virtio.ErrDescIndex) {
			t.Fatalf("eventIdx=%v: PopOrArm on a bad head = %v, %v; want ErrDescIndex", eventIdx, ok, err)
		}
		if len(*fails) != 1 {
			t.Errorf("eventIdx=%v: %d Fail calls, want 1", eventIdx, len(*fails))
		}
	}
}

// TestPopOrArmNoLostWakeup runs a driver that kicks only when the device
// asked for it (NeedKick) against a device that blocks on Kicks whenever
// PopOrArm reports an empty ring: every chain must arrive. A PopOrArm that
// reports empty without arming leaves the device blocked with chains
// pending and fails here (the timeout only guards against a hang; it
// measures nothing). The narrower race the look-again closes (a chain
// published between Pop and Arm) is exercised but cannot be forced.
func TestPopOrArmNoLostWakeup(t *testing.T) {
	const n = 20000
	for _, eventIdx := range []bool{false, true} {
		mem := newMem(t)
		dq, q, _, _ := pair(t, mem, 8, eventIdx)
		done := make(chan error, 1)
		go func() {
			var c virtio.Chain
			for got := 0; got < n; {
				ok, err := q.PopOrArm(&c)
				if err != nil {
					done <- err
					return
				}
				if ok {
					q.Push(c.Head, 0)
					got++
					continue
				}
				select {
				case <-q.Kicks():
				case <-time.After(virtiotest.WaitTimeout):
					done <- errors.New("device blocked with no kick coming: lost wake-up")
					return
				}
			}
			done <- nil
		}()
		for sent := 0; sent < n; {
			for {
				if _, ok, err := dq.PopUsed(); err != nil {
					t.Fatal(err)
				} else if !ok {
					break
				}
			}
			if _, err := dq.Add(nil, 8); err != nil {
				// Ring full: let the device catch up, unless it gave up.
				select {
				case err := <-done:
					t.Fatalf("eventIdx=%v: after %d chains: %v", eventIdx, sent, err)
				default:
				}
				runtime.Gosched()
				continue
			}
			sent++
			if dq.NeedKick() {
				q.Kick()
			}
		}
		if err := <-done; err != nil {
			t.Fatalf("eventIdx=%v: %v", eventIdx, err)
		}
	}
}
