package virtiotest_test

import (
	"testing"

	"github.com/gosandbox/sandbox/virtio"
	"github.com/gosandbox/sandbox/virtio/rng"
	"github.com/gosandbox/sandbox/virtio/virtiotest"
)

// A device attached through a PCIRig is found by the rig's driver at the
// transport's slot, with the modern virtio-pci device ID for its type.
func TestPCIRigAttach(t *testing.T) {
	for _, ioevents := range []bool{false, true} {
		rig := virtiotest.NewPCIRig(t, 16<<20, ioevents)
		tr, v := rig.Attach(t, rng.New(nil))
		if got := tr.Device().Type(); got != virtio.TypeEntropy {
			t.Fatalf("transport holds device type %v", got)
		}
		if id := v.D.ConfigRead(tr.Slot(), 0, 2, 2); id != 0x1040+uint32(virtio.TypeEntropy) {
			t.Errorf("ioevents=%v: PCI device ID %#x", ioevents, id)
		}
		if v.DeviceFeatures()&virtio.FeatureVersion1 == 0 {
			t.Errorf("ioevents=%v: VERSION_1 not offered", ioevents)
		}
	}
}
