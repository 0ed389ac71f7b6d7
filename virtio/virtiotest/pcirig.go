package virtiotest

import (
	"testing"

	"github.com/gosandbox/sandbox/virtio"
	"github.com/gosandbox/sandbox/virtio/pci"
	"github.com/gosandbox/sandbox/vmm/guestmem"
)

// PCIRig is a real virtio-pci bus in a private guest memory, wired to a
// Host (interrupts and, optionally, ioeventfd kicks) and driven by a
// PCIDriver: what a device test needs to reach a device the way Linux
// does, through config space and BAR MMIO.
type PCIRig struct {
	Mem    *guestmem.Memory
	Host   *Host
	Bus    *pci.Bus
	Driver *PCIDriver
}

// NewPCIRig builds a PCIRig with memSize bytes of guest memory. With
// ioevents the bus registers ioeventfds for queue notifications (as under
// KVM); without, kicks reach the bus as MMIO writes.
//
// t.Cleanup closes the bus (twice: Close must be idempotent) and fails the
// test if that returns an error or leaves an MSI trigger or ioevent
// registered, then frees the memory.
func NewPCIRig(t testing.TB, memSize uint64, ioevents bool) *PCIRig {
	t.Helper()
	mem, err := guestmem.New(memSize)
	if err != nil {
		t.Fatalf("virtiotest: guest memory: %v", err)
	}
	host := NewHost()
	cfg := pci.Config{Mem: mem, Interrupts: host}
	if ioevents {
		cfg.Ioevents = host
	}
	bus, err := pci.New(cfg)
	if err != nil {
		mem.Close()
		t.Fatalf("virtiotest: pci.New: %v", err)
	}
	host.Target = bus
	t.Cleanup(func() {
		if err := bus.Close(); err != nil {
			t.Errorf("bus Close: %v", err)
		}
		if err := bus.Close(); err != nil {
			t.Errorf("second bus Close: %v", err)
		}
		if n := host.LiveMSIs(); n != 0 {
			t.Errorf("%d MSI triggers not released after bus Close", n)
		}
		if n := host.Ioevents(); n != 0 {
			t.Errorf("%d ioevents not released after bus Close", n)
		}
		mem.Close()
	})
	return &PCIRig{Mem: mem, Host: host, Bus: bus, Driver: NewPCIDriver(host, mem)}
}

// Add attaches dev to the bus, failing the test on error.
func (r *PCIRig) Add(t testing.TB, dev virtio.Device) *pci.Transport {
	t.Helper()
	tr, err := r.Bus.AddVirtio(dev)
	if err != nil {
		t.Fatalf("virtiotest: AddVirtio: %v", err)
	}
	return tr
}

// Attach attaches dev to the bus and probes its function with the rig's
// driver, failing the test on error.
func (r *PCIRig) Attach(t testing.TB, dev virtio.Device) (*pci.Transport, *VirtioPCI) {
	t.Helper()
	tr := r.Add(t, dev)
	v, err := r.Driver.Probe(tr.Slot())
	if err != nil {
		t.Fatalf("virtiotest: probe slot %d: %v", tr.Slot(), err)
	}
	return tr, v
}
