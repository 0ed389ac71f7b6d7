package net_test

import (
	"runtime"
	"testing"
	"time"

	vnet "github.com/gosandbox/sandbox/virtio/net"
	"github.com/gosandbox/sandbox/virtio/virtiotest"
)

// TestNoGoroutineLeak: activation, traffic, Reset, re-activation and
// Close leave no goroutine behind.
func TestNoGoroutineLeak(t *testing.T) {
	before := runtime.NumGoroutine()
	func() {
		b := newRecBackend()
		d := newDevice(t, b, vnet.Options{RxTimeout: time.Hour})
		h := harness(t, d, d.Features())
		h.Add(qTx, [][]byte{hdrBytes(vnet.Header{}), ethFrame(gwMAC, guestMAC, 0x0800, 100)})
		h.WaitUsed(qTx)
		blocked := make(chan error)
		go func() { blocked <- d.WriteFrame(ethFrame(guestMAC, gwMAC, 0x0800, 100)) }()
		d.Reset()
		h.Activate()
		d.Reset()
		h.Activate()
		d.Close()
		d.Close()
		<-blocked
	}()
	deadline := time.Now().Add(virtiotest.WaitTimeout)
	for runtime.NumGoroutine() > before {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<16)
			t.Fatalf("%d goroutines before, %d after Close:\n%s", before, runtime.NumGoroutine(), buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(time.Millisecond)
	}
}
