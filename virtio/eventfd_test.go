package virtio_test

import (
	"testing"

	"github.com/gosandbox/sandbox/virtio"
	"golang.org/x/sys/unix"
)

func TestEventfd(t *testing.T) {
	e, err := virtio.NewEventfd()
	if err != nil {
		t.Fatal(err)
	}
	// A write from outside (as KVM does) wakes Wait; writes coalesce.
	one := []byte{1, 0, 0, 0, 0, 0, 0, 0}
	unix.Write(e.Fd(), one)
	unix.Write(e.Fd(), one)
	if err := e.Wait(); err != nil {
		t.Fatal(err)
	}
	// Signal is read from outside (as KVM_IRQFD does).
	if err := e.Signal(); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 8)
	if n, err := unix.Read(e.Fd(), buf); n != 8 || err != nil || buf[0] != 1 {
		t.Fatalf("read %d %v %x", n, err, buf)
	}
	// Close wakes a blocked Wait.
	done := make(chan error)
	go func() { done <- e.Wait() }()
	e.Close()
	if err := <-done; err == nil {
		t.Fatal("Wait after Close returned nil")
	}
	if err := e.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
}
