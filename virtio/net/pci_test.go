package net_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"testing"

	"github.com/gosandbox/sandbox/virtio"
	vnet "github.com/gosandbox/sandbox/virtio/net"
	"github.com/gosandbox/sandbox/virtio/virtiotest"
)

// TestOverPCI drives the device through the real virtio-pci transport the
// way Linux does (conf1 enumeration, MSI-X, ioeventfd kicks): features,
// config space, one frame each way, then a driver reset.
func TestOverPCI(t *testing.T) {
	rig := virtiotest.NewPCIRig(t, 256<<20, true)
	b := newRecBackend()
	dev := newDevice(t, b, vnet.Options{MTU: 1500})
	tr, v := rig.Attach(t, dev)
	if id := v.D.ConfigRead(tr.Slot(), 0, 2, 2); id != 0x1040+uint32(virtio.TypeNet) {
		t.Errorf("PCI device ID %#x, want %#x", id, 0x1040+uint32(virtio.TypeNet))
	}
	if f := v.DeviceFeatures(); f&allFeatures != allFeatures {
		t.Errorf("offered features %#x lack %#x", f, allFeatures&^f)
	}
	v.MSIXEnable(3)
	if err := v.Init(^uint64(0), 0); err != nil {
		t.Fatal(err)
	}
	var cfg [12]byte
	for i := range cfg {
		cfg[i] = byte(v.D.Read(v.DeviceCfg+uint64(i), 1))
	}
	if !bytes.Equal(cfg[:6], guestMAC) || binary.LittleEndian.Uint16(cfg[6:]) != vnet.StatusLinkUp ||
		binary.LittleEndian.Uint16(cfg[10:]) != 1500 {
		t.Errorf("config space %x", cfg)
	}

	// Host to guest.
	for range 4 {
		if _, err := v.Add(qRx, nil, 1526); err != nil {
			t.Fatal(err)
		}
	}
	in := ethFrame(guestMAC, gwMAC, 0x0800, 1000)
	if err := dev.WriteFrame(in); err != nil {
		t.Fatalf("WriteFrame: %v", err)
	}
	u, err := v.WaitUsed(qRx)
	if err != nil {
		t.Fatal(err)
	}
	hdr, _ := vnet.ParseHeader(u.Written)
	if hdr.NumBuffers != 1 || !bytes.Equal(u.Written[vnet.HeaderLen:], in) {
		t.Errorf("received header %+v, %d bytes", hdr, len(u.Written))
	}

	// Guest to host.
	out := ethFrame(gwMAC, guestMAC, 0x0800, 1514)
	if _, err := v.Add(qTx, [][]byte{hdrBytes(vnet.Header{}), out}); err != nil {
		t.Fatal(err)
	}
	if _, err := v.WaitUsed(qTx); err != nil {
		t.Fatal(err)
	}
	if got := waitDelivered(t, b, 1); !bytes.Equal(got[0].frame, out) {
		t.Error("transmitted frame differs")
	}

	// A driver reset stops the device: frames are refused until the
	// driver sets it up again.
	v.SetStatus(0)
	if err := dev.WriteFrame(in); !errors.Is(err, vnet.ErrNotReady) {
		t.Errorf("WriteFrame after reset: %v, want ErrNotReady", err)
	}
	if err := v.Init(^uint64(0), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := v.Add(qRx, nil, 1526); err != nil {
		t.Fatal(err)
	}
	if err := dev.WriteFrame(in); err != nil {
		t.Fatalf("WriteFrame after re-init: %v", err)
	}
	if _, err := v.WaitUsed(qRx); err != nil {
		t.Fatal(err)
	}
}
