package virtiotest_test

import (
	"testing"

	"github.com/gosandbox/sandbox/virtio/virtiotest"
)

type nopTarget struct{ writes int }

func (n *nopTarget) ReadPort(uint16, []byte)  {}
func (n *nopTarget) WritePort(uint16, []byte) {}
func (n *nopTarget) ReadMMIO(uint64, []byte)  {}
func (n *nopTarget) WriteMMIO(uint64, []byte) { n.writes++ }

// The Event contract the VMM must meet too: a write signals Wait, and
// Close wakes a blocked Wait with an error.
func TestIoeventContract(t *testing.T) {
	h := virtiotest.NewHost()
	tgt := &nopTarget{}
	h.Target = tgt
	ev, err := h.Ioevent(0x1000, 2)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h.Ioevent(0x1000, 2); err == nil {
		t.Fatal("duplicate ioevent accepted")
	}
	h.WriteMMIO(0x1000, []byte{1, 0})
	h.WriteMMIO(0x1000, []byte{1, 0}) // coalesces
	if err := ev.Wait(); err != nil {
		t.Fatal(err)
	}
	h.WriteMMIO(0x1000, []byte{1, 0, 0, 0}) // other width: reaches the target
	if tgt.writes != 1 {
		t.Fatalf("target saw %d writes, want 1", tgt.writes)
	}
	done := make(chan error)
	go func() { done <- ev.Wait() }()
	ev.Close()
	if err := <-done; err == nil {
		t.Fatal("Wait returned nil after Close")
	}
	ev.Close()
	if h.Ioevents() != 0 {
		t.Fatal("ioevent still registered")
	}
}

func TestMSIRelease(t *testing.T) {
	h := virtiotest.NewHost()
	m, _ := h.MSI(0xFEE00000, 0x41)
	if err := m.Trigger(); err != nil || h.MSICount(0x41) != 1 {
		t.Fatalf("Trigger = %v, count %d", err, h.MSICount(0x41))
	}
	m.Close()
	if err := m.Trigger(); err == nil || h.LiveMSIs() != 0 {
		t.Fatalf("Trigger after Close = %v, live %d", err, h.LiveMSIs())
	}
}
