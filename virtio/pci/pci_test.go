package pci_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/gosandbox/sandbox/virtio"
	"github.com/gosandbox/sandbox/virtio/blk"
	"github.com/gosandbox/sandbox/virtio/console"
	"github.com/gosandbox/sandbox/virtio/pci"
	"github.com/gosandbox/sandbox/virtio/rng"
	"github.com/gosandbox/sandbox/virtio/virtiotest"
	"github.com/gosandbox/sandbox/vmm/guestmem"
)

type rig struct {
	t    *testing.T
	mem  *guestmem.Memory
	host *virtiotest.Host
	bus  *pci.Bus
	drv  *virtiotest.PCIDriver
	rng  *pci.Transport
	blk  *pci.Transport
	cons *pci.Transport
}

// newRig builds a bus with rng (slot 1), blk (slot 2) and console (slot 3).
func newRig(t *testing.T, ioevents bool) *rig {
	t.Helper()
	pr := virtiotest.NewPCIRig(t, 256<<20, ioevents)
	r := &rig{t: t, mem: pr.Mem, host: pr.Host, bus: pr.Bus, drv: pr.Driver}
	r.rng = pr.Add(t, rng.New(nil))
	f, err := os.Create(filepath.Join(t.TempDir(), "disk"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	f.Truncate(1 << 20)
	bd, err := blk.New(f, blk.Options{})
	if err != nil {
		t.Fatal(err)
	}
	r.blk = pr.Add(t, bd)
	cd, err := console.New(console.Options{Ports: []string{"gosandbox.agent"}})
	if err != nil {
		t.Fatal(err)
	}
	r.cons = pr.Add(t, cd)
	return r
}

func TestRanges(t *testing.T) {
	r := newRig(t, false)
	for _, rg := range r.bus.Ranges() {
		if rg.Space == pci.SpaceMMIO && (rg.Base < guestmem.MMIOHoleStart || rg.Base+rg.Size > 0xFE000000) {
			t.Errorf("MMIO range %#x+%#x outside [3 GiB, 0xFE000000)", rg.Base, rg.Size)
		}
	}
}

func TestEnumerateLikeLinux(t *testing.T) {
	r := newRig(t, false)
	d := r.drv
	// pci_check_type1: the address register reads back.
	d.Host.WritePort(0xCFB, []byte{1})
	d.Host.WritePort(0xCF8, []byte{0, 0, 0, 0x80})
	got := make([]byte, 4)
	d.Host.ReadPort(0xCF8, got)
	if binary.LittleEndian.Uint32(got) != 0x80000000 {
		t.Fatalf("0xCF8 reads %#x", got)
	}
	// pci_sanity_check: a host bridge on bus 0.
	if class := d.ConfigRead(0, 0, 0x0A, 2); class != 0x0600 {
		t.Fatalf("slot 0 class %#x, want host bridge 0x0600", class)
	}
	want := map[int]uint32{1: 0x1044, 2: 0x1042, 3: 0x1043}
	for slot := range 32 {
		vendor := d.ConfigRead(slot, 0, 0, 2)
		dev := d.ConfigRead(slot, 0, 2, 2)
		if id, ok := want[slot]; ok {
			if vendor != 0x1AF4 || dev != id {
				t.Errorf("slot %d: %04x:%04x, want 1af4:%04x", slot, vendor, dev, id)
			}
			if rev := d.ConfigRead(slot, 0, 8, 1); rev != 1 {
				t.Errorf("slot %d revision %d, want 1", slot, rev)
			}
			if pin := d.ConfigRead(slot, 0, 0x3D, 1); pin != 1 {
				t.Errorf("slot %d interrupt pin %d, want INTA", slot, pin)
			}
			// Other functions of the slot are absent.
			if v := d.ConfigRead(slot, 1, 0, 4); v != 0xffffffff {
				t.Errorf("slot %d function 1 reads %#x", slot, v)
			}
		} else if slot != 0 && vendor != 0xffff {
			t.Errorf("empty slot %d reads vendor %#x", slot, vendor)
		}
	}
	// BAR sizing.
	addr, size := d.SizeBAR64(1, 0)
	if size != pci.BARSize || addr < pci.BARWindowBase || addr+size > pci.BARWindowBase+pci.BARWindowSize {
		t.Fatalf("BAR0 at %#x size %#x", addr, size)
	}
	if lo := d.ConfigRead(1, 0, 0x10, 4); lo&0x7 != 0x4 {
		t.Fatalf("BAR0 flags %#x, want 64-bit memory", lo&0xf)
	}
	// Read-only registers stay put.
	d.ConfigWrite(1, 0, 0, 4, 0x12345678)
	if v := d.ConfigRead(1, 0, 0, 4); v != 0x10441AF4 {
		t.Fatalf("ID register written: %#x", v)
	}
	// Capability walk.
	types := map[uint8]virtiotest.Cap{}
	var msix bool
	for _, c := range d.Caps(1) {
		if c.ID == 0x09 {
			types[c.CfgType] = c
		}
		if c.ID == 0x11 {
			msix = true
			if n := d.ConfigRead(1, 0, c.Offset+2, 2)&0x7ff + 1; n != 2 {
				t.Errorf("MSI-X table size %d, want 2 (1 queue + config)", n)
			}
		}
	}
	for _, typ := range []uint8{1, 2, 3, 5} {
		if _, ok := types[typ]; !ok {
			t.Errorf("no virtio capability of type %d", typ)
		}
	}
	if types[2].Extra != pci.NotifyOffMultiplier {
		t.Errorf("notify_off_multiplier %d", types[2].Extra)
	}
	if _, ok := types[4]; ok {
		t.Errorf("rng has no device config, but a device-config capability is present")
	}
	if !msix {
		t.Error("no MSI-X capability")
	}
	if c := d.Caps(2); len(c) != 6 {
		t.Errorf("blk has %d capabilities, want 6", len(c))
	}
}

func TestECAMMatchesConf1(t *testing.T) {
	r := newRig(t, false)
	for slot := range 4 {
		for reg := 0; reg < 0x100; reg += 4 {
			want := r.drv.ConfigRead(slot, 0, reg, 4)
			got := r.drv.Read(pci.ECAMBase+uint64(slot)<<15+uint64(reg), 4)
			if uint32(got) != want {
				t.Fatalf("slot %d reg %#x: ECAM %#x, conf1 %#x", slot, reg, got, want)
			}
		}
	}
	// Bus 1 is empty.
	if v := r.drv.Read(pci.ECAMBase+1<<20, 4); v != 0xffffffff {
		t.Fatalf("bus 1 reads %#x", v)
	}
	// Extended config space through ECAM reads as zeros, not garbage.
	if v := r.drv.Read(pci.ECAMBase+1<<15+0x100, 4); v != 0 {
		t.Fatalf("extended config reads %#x", v)
	}
}

func rngRequest(t *testing.T, v *virtiotest.VirtioPCI) {
	t.Helper()
	if _, err := v.Add(0, nil, 64); err != nil {
		t.Fatal(err)
	}
	u, err := v.WaitUsed(0)
	if err != nil {
		t.Fatal(err)
	}
	if u.Len != 64 || bytes.Equal(u.Written, make([]byte, 64)) {
		t.Fatalf("rng returned %d bytes %x", u.Len, u.Written)
	}
}

func TestRNGWithMSIXAndIoevents(t *testing.T) {
	r := newRig(t, true)
	v, err := r.drv.Probe(1)
	if err != nil {
		t.Fatal(err)
	}
	v.MSIXEnable(2)
	if err := v.Init(^uint64(0), 0); err != nil {
		t.Fatal(err)
	}
	if r.host.Ioevents() != 1 {
		t.Fatalf("%d ioevents registered, want 1", r.host.Ioevents())
	}
	rngRequest(t, v)
	// The used entry can be seen before the interrupt lands; wait for it.
	waitMSI(t, r.host, 0x101)
	if r.rng.Status()&virtio.StatusDriverOK == 0 {
		t.Fatalf("status %#x", r.rng.Status())
	}
	// The diagnostic view names the routed vector and the queue's rings.
	s := r.rng.String()
	for _, want := range []string{"device type 4", "MSI-X enabled true", "routed true", "avail idx 1, used idx 1"} {
		if !strings.Contains(s, want) {
			t.Errorf("String() = %q, want it to contain %q", s, want)
		}
	}
}

func TestRNGWithINTx(t *testing.T) {
	r := newRig(t, false)
	v, err := r.drv.Probe(1)
	if err != nil {
		t.Fatal(err)
	}
	if err := v.Init(^uint64(0), 0); err != nil {
		t.Fatal(err)
	}
	line := uint8(r.drv.ConfigRead(1, 0, 0x3C, 1))
	if _, err := v.Add(0, nil, 16); err != nil {
		t.Fatal(err)
	}
	// The device pushes, then asserts the line; nobody reads the ISR yet.
	timeout := afterTimeout()
	for !r.host.Line(line) {
		select {
		case <-r.host.Interrupted():
		case <-timeout:
			t.Fatalf("line %d never asserted", line)
		}
	}
	if _, ok, _ := v.Queues[0].PopUsed(); !ok {
		t.Fatal("interrupt before the used entry")
	}
	if isr := r.drv.Read(v.ISR, 1); isr != 1 {
		t.Fatalf("ISR %#x, want the queue bit", isr)
	}
	if r.host.Line(line) {
		t.Fatalf("line %d still asserted after the ISR read", line)
	}
	if isr := r.drv.Read(v.ISR, 1); isr != 0 {
		t.Fatalf("ISR %#x after read-to-clear", isr)
	}
}

func TestFeatureNegotiation(t *testing.T) {
	r := newRig(t, false)
	v, err := r.drv.Probe(2)
	if err != nil {
		t.Fatal(err)
	}
	f := v.DeviceFeatures()
	for _, bit := range []uint64{virtio.FeatureVersion1, virtio.FeatureEventIdx, virtio.FeatureIndirectDesc, blk.FeatureFlush} {
		if f&bit == 0 {
			t.Errorf("feature %#x not offered (%#x)", bit, f)
		}
	}
	// A legacy driver (no VERSION_1) is refused.
	if err := v.Init(^uint64(virtio.FeatureVersion1), 0); err == nil {
		t.Fatal("device accepted a driver without VIRTIO_F_VERSION_1")
	}
	if err := v.Init(^uint64(0), 0); err != nil {
		t.Fatal(err)
	}
}

func TestHostileRingNeedsReset(t *testing.T) {
	r := newRig(t, true)
	v, err := r.drv.Probe(1)
	if err != nil {
		t.Fatal(err)
	}
	v.MSIXEnable(2)
	if err := v.Init(^uint64(0), 0); err != nil {
		t.Fatal(err)
	}
	q := v.Queues[0]
	q.PublishRaw(q.Size+5, 1) // head out of range
	v.Kick(0)
	for i := 0; v.Status()&virtio.StatusNeedsReset == 0; i++ {
		select {
		case <-r.host.Interrupted():
		case <-afterTimeout():
			t.Fatal("device did not set NEEDS_RESET")
		}
	}
	if !errors.Is(r.rng.Err(), virtio.ErrDescIndex) {
		t.Fatalf("Err() = %v", r.rng.Err())
	}
	waitMSI(t, r.host, 0x100)
	// The guest resets and starts over; the device works again.
	v.SetStatus(0)
	if v.Status() != 0 || r.rng.Err() != nil {
		t.Fatalf("after reset: status %#x err %v", v.Status(), r.rng.Err())
	}
	if err := v.Init(^uint64(0), 0); err != nil {
		t.Fatal(err)
	}
	rngRequest(t, v)
}

func TestBadQueueSizeNeedsReset(t *testing.T) {
	r := newRig(t, false)
	v, err := r.drv.Probe(1)
	if err != nil {
		t.Fatal(err)
	}
	d := r.drv
	v.SetStatus(0)
	v.SetStatus(virtio.StatusAcknowledge | virtio.StatusDriver)
	d.Write(v.Common+virtiotest.CommonGFSelect, 4, 1)
	d.Write(v.Common+virtiotest.CommonGF, 4, 1) // VERSION_1
	v.SetStatus(virtio.StatusAcknowledge | virtio.StatusDriver | virtio.StatusFeaturesOK)
	d.Write(v.Common+virtiotest.CommonQSelect, 2, 0)
	d.Write(v.Common+virtiotest.CommonQSize, 2, 3)
	d.Write(v.Common+virtiotest.CommonQEnable, 2, 1)
	if v.Status()&virtio.StatusNeedsReset == 0 || !errors.Is(r.rng.Err(), virtio.ErrQueueSize) {
		t.Fatalf("status %#x err %v", v.Status(), r.rng.Err())
	}
	// DRIVER_OK does not activate a broken device.
	v.SetStatus(v.Status() | virtio.StatusDriverOK)
	if v.Status()&virtio.StatusDriverOK != 0 && v.Status()&virtio.StatusNeedsReset == 0 {
		t.Fatalf("status %#x", v.Status())
	}
	// Vector numbers beyond the table read back as NO_VECTOR.
	d.Write(v.Common+virtiotest.CommonQMSIX, 2, 7)
	if got := d.Read(v.Common+virtiotest.CommonQMSIX, 2); got != pci.NoVector {
		t.Fatalf("queue vector %#x, want NO_VECTOR", got)
	}
}

func TestBARMove(t *testing.T) {
	r := newRig(t, true)
	v, err := r.drv.Probe(1)
	if err != nil {
		t.Fatal(err)
	}
	v.MSIXEnable(2)
	if err := v.Init(^uint64(0), 0); err != nil {
		t.Fatal(err)
	}
	old := v.BAR
	nb := uint64(pci.BARWindowBase + 0x1000_0000)
	d := r.drv
	d.ConfigWrite(1, 0, 0x04, 2, 0) // decoding off, as Linux does around moves
	d.ConfigWrite(1, 0, 0x10, 4, uint32(nb))
	d.ConfigWrite(1, 0, 0x14, 4, 0)
	if r.host.Ioevents() != 0 {
		t.Fatalf("%d ioevents registered with decoding off", r.host.Ioevents())
	}
	d.ConfigWrite(1, 0, 0x04, 2, 6)
	if r.rng.BAR() != nb {
		t.Fatalf("BAR() = %#x", r.rng.BAR())
	}
	if got := d.Read(old+virtiotest.CommonNumQueues, 2); got == 1 {
		t.Fatal("old BAR address still decodes")
	}
	shift := nb - old
	v.Common += shift
	v.Notify += shift
	v.ISR += shift
	v.MSIXTable += shift
	if got := d.Read(v.Common+virtiotest.CommonNumQueues, 2); got != 1 {
		t.Fatalf("num_queues at the new BAR = %d", got)
	}
	if r.host.Ioevents() != 1 {
		t.Fatalf("%d ioevents after the move, want 1", r.host.Ioevents())
	}
	rngRequest(t, v)
}

func TestMSIXMasking(t *testing.T) {
	r := newRig(t, false)
	v, err := r.drv.Probe(1)
	if err != nil {
		t.Fatal(err)
	}
	v.MSIXEnable(2)
	if err := v.Init(^uint64(0), 0); err != nil {
		t.Fatal(err)
	}
	if n := r.host.LiveMSIs(); n != 2 {
		t.Fatalf("%d live MSIs, want 2", n)
	}
	d := r.drv
	e := v.MSIXTable + 16
	d.Write(e+12, 4, 1) // mask the queue vector
	if n := r.host.LiveMSIs(); n != 1 {
		t.Fatalf("%d live MSIs after masking, want 1", n)
	}
	if _, err := v.Add(0, nil, 8); err != nil {
		t.Fatal(err)
	}
	// The interrupt is pending, not delivered. Wait for the PBA bit before
	// consuming the used entry: popping it moves used_event past the entry
	// (as Linux does), and a device that decides after that rightly raises
	// nothing.
	timeout := afterTimeout()
	pba := v.MSIXTable + (pci.MSIXPBAOffset - pci.MSIXTableOffset)
	for d.Read(pba, 8)&2 == 0 {
		select {
		case <-timeout:
			t.Fatalf("PBA %#x: vector 1 not pending", d.Read(pba, 8))
		default:
		}
	}
	if _, ok, _ := v.Queues[0].PopUsed(); !ok {
		t.Fatal("vector 1 pending but no used entry")
	}
	before := r.host.MSICount(0x101)
	// Rewrite the message while masked, then unmask: the pending interrupt
	// is delivered with the new data.
	d.Write(e+8, 4, 0x155)
	d.Write(e+12, 4, 0)
	if r.host.MSICount(0x155) != 1 || r.host.MSICount(0x101) != before {
		t.Fatalf("after unmask: %d with new data, %d with old", r.host.MSICount(0x155), r.host.MSICount(0x101)-before)
	}
	if d.Read(pba, 8)&2 != 0 {
		t.Fatal("PBA bit still set after delivery")
	}
}

func TestPCICfgWindow(t *testing.T) {
	r := newRig(t, false)
	d := r.drv
	var cfgCap int
	for _, c := range d.Caps(2) {
		if c.ID == 0x09 && c.CfgType == 5 {
			cfgCap = c.Offset
		}
	}
	if cfgCap == 0 {
		t.Fatal("no VIRTIO_PCI_CAP_PCI_CFG")
	}
	// Read num_queues (common config offset 0x12, 2 bytes) through the window.
	d.ConfigWrite(2, 0, cfgCap+4, 1, 0)
	d.ConfigWrite(2, 0, cfgCap+8, 4, 0x12)
	d.ConfigWrite(2, 0, cfgCap+12, 4, 2)
	if n := d.ConfigRead(2, 0, cfgCap+16, 2); n != 1 {
		t.Fatalf("num_queues through pci_cfg = %d", n)
	}
	// Read blk capacity (device config offset 0) through the window.
	d.ConfigWrite(2, 0, cfgCap+8, 4, pci.DeviceCfgOffset)
	d.ConfigWrite(2, 0, cfgCap+12, 4, 4)
	if n := d.ConfigRead(2, 0, cfgCap+16, 4); n != (1<<20)/512 {
		t.Fatalf("capacity through pci_cfg = %d", n)
	}
}

func TestBusFullAndConfigErrors(t *testing.T) {
	if _, err := pci.New(pci.Config{}); !errors.Is(err, pci.ErrConfig) {
		t.Fatalf("New with no memory = %v", err)
	}
	mem, err := guestmem.New(1 << 20)
	if err != nil {
		t.Fatal(err)
	}
	defer mem.Close()
	bus, err := pci.New(pci.Config{Mem: mem, Interrupts: virtiotest.NewHost()})
	if err != nil {
		t.Fatal(err)
	}
	defer bus.Close()
	for i := range pci.MaxDevices {
		if _, err := bus.AddVirtio(rng.New(nil)); err != nil {
			t.Fatalf("device %d: %v", i, err)
		}
	}
	if _, err := bus.AddVirtio(rng.New(nil)); !errors.Is(err, pci.ErrBusFull) {
		t.Fatalf("32nd device: %v", err)
	}
}

func TestCloseJoinsGoroutines(t *testing.T) {
	before := runtime.NumGoroutine()
	func() {
		r := newRig(t, true)
		for slot := 1; slot <= 3; slot++ {
			v, err := r.drv.Probe(slot)
			if err != nil {
				t.Fatal(err)
			}
			v.MSIXEnable(16) // more than any device has; extra entries are ignored
			if err := v.Init(^uint64(0), 0); err != nil {
				t.Fatal(err)
			}
		}
		if err := r.bus.Close(); err != nil {
			t.Fatal(err)
		}
	}()
	// Exited goroutines may linger a moment after Done; wait (bounded).
	timeout := afterTimeout()
	for runtime.NumGoroutine() > before {
		select {
		case <-timeout:
			t.Fatalf("%d goroutines before, %d after Close", before, runtime.NumGoroutine())
		default:
			runtime.Gosched()
		}
	}
}
