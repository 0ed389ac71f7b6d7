package virtiotest

import (
	"encoding/binary"
	"fmt"
	"time"

	"github.com/gosandbox/sandbox/virtio"
	"github.com/gosandbox/sandbox/vmm/guestmem"
)

// PCI register offsets the driver uses.
const (
	pciCommand = 0x04
	pciCapPtr  = 0x34
	pciBAR0    = 0x10
)

// PCIDriver drives a PCI bus through a Host the way Linux does: config
// mechanism #1 for config space, MMIO for BARs.
type PCIDriver struct {
	Host *Host
	Mem  *guestmem.Memory
	// next is where the driver allocates rings and buffers in Mem.
	next uint64
}

// NewPCIDriver returns a driver that allocates its rings and buffers from
// guest memory starting at 1 MiB.
func NewPCIDriver(h *Host, mem *guestmem.Memory) *PCIDriver {
	return &PCIDriver{Host: h, Mem: mem, next: 1 << 20}
}

func (d *PCIDriver) alloc(n uint64) uint64 {
	a := (d.next + 4095) &^ 4095
	d.next = a + n
	return a
}

func confAddr(slot, fn, reg int) []byte {
	var b [4]byte
	binary.LittleEndian.PutUint32(b[:], 1<<31|uint32(slot)<<11|uint32(fn)<<8|uint32(reg&0xfc))
	return b[:]
}

// ConfigRead reads n (1, 2 or 4) bytes of config space through 0xCF8/0xCFC.
func (d *PCIDriver) ConfigRead(slot, fn, reg, n int) uint32 {
	d.Host.WritePort(0xCF8, confAddr(slot, fn, reg))
	b := make([]byte, 4)
	d.Host.ReadPort(uint16(0xCFC+reg&3), b[:n])
	return binary.LittleEndian.Uint32(b)
}

// ConfigWrite writes n (1, 2 or 4) bytes of config space.
func (d *PCIDriver) ConfigWrite(slot, fn, reg, n int, v uint32) {
	d.Host.WritePort(0xCF8, confAddr(slot, fn, reg))
	b := make([]byte, 4)
	binary.LittleEndian.PutUint32(b, v)
	d.Host.WritePort(uint16(0xCFC+reg&3), b[:n])
}

// Read reads n bytes at guest-physical MMIO address addr.
func (d *PCIDriver) Read(addr uint64, n int) uint64 {
	b := make([]byte, 8)
	d.Host.ReadMMIO(addr, b[:n])
	return binary.LittleEndian.Uint64(b)
}

// Write writes n bytes at MMIO address addr.
func (d *PCIDriver) Write(addr uint64, n int, v uint64) {
	b := make([]byte, 8)
	binary.LittleEndian.PutUint64(b, v)
	d.Host.WriteMMIO(addr, b[:n])
}

// Cap is one capability found in a config-space walk.
type Cap struct {
	Offset int
	ID     uint8
	// For virtio vendor capabilities:
	CfgType uint8
	BAR     uint8
	Off     uint32
	Len     uint32
	Extra   uint32 // notify_off_multiplier for the notify capability
}

// Caps walks the capability list of slot as Linux does, stopping after 48
// entries (a loop guard).
func (d *PCIDriver) Caps(slot int) []Cap {
	var caps []Cap
	ptr := int(d.ConfigRead(slot, 0, pciCapPtr, 1)) &^ 3
	for i := 0; ptr >= 0x40 && i < 48; i++ {
		c := Cap{Offset: ptr, ID: uint8(d.ConfigRead(slot, 0, ptr, 1))}
		if c.ID == 0x09 {
			c.CfgType = uint8(d.ConfigRead(slot, 0, ptr+3, 1))
			c.BAR = uint8(d.ConfigRead(slot, 0, ptr+4, 1))
			c.Off = d.ConfigRead(slot, 0, ptr+8, 4)
			c.Len = d.ConfigRead(slot, 0, ptr+12, 4)
			if c.CfgType == 2 {
				c.Extra = d.ConfigRead(slot, 0, ptr+16, 4)
			}
		}
		caps = append(caps, c)
		ptr = int(d.ConfigRead(slot, 0, ptr+1, 1)) &^ 3
	}
	return caps
}

// SizeBAR64 sizes the 64-bit memory BAR i the way Linux does (memory
// decoding off, all ones, read back, restore) and returns its address and
// size.
func (d *PCIDriver) SizeBAR64(slot, i int) (addr, size uint64) {
	reg := pciBAR0 + 4*i
	cmd := d.ConfigRead(slot, 0, pciCommand, 2)
	d.ConfigWrite(slot, 0, pciCommand, 2, cmd&^2)
	lo, hi := d.ConfigRead(slot, 0, reg, 4), d.ConfigRead(slot, 0, reg+4, 4)
	d.ConfigWrite(slot, 0, reg, 4, 0xffffffff)
	d.ConfigWrite(slot, 0, reg+4, 4, 0xffffffff)
	slo, shi := d.ConfigRead(slot, 0, reg, 4), d.ConfigRead(slot, 0, reg+4, 4)
	d.ConfigWrite(slot, 0, reg, 4, lo)
	d.ConfigWrite(slot, 0, reg+4, 4, hi)
	d.ConfigWrite(slot, 0, pciCommand, 2, cmd)
	mask := uint64(slo&^0xf) | uint64(shi)<<32
	return uint64(lo&^0xf) | uint64(hi)<<32, ^mask + 1
}

// VirtioPCI is a driver bound to one virtio-pci function.
type VirtioPCI struct {
	D          *PCIDriver
	Slot       int
	BAR        uint64
	Common     uint64
	Notify     uint64
	NotifyMult uint32
	ISR        uint64
	DeviceCfg  uint64
	MSIXCap    int
	MSIXTable  uint64
	Queues     []*DriverQueue
	// MSIData is the MSI data programmed for vector v: 0x100 + v.
	MSIX bool
}

// Probe finds the virtio structures of the function in slot, enables
// memory decoding and bus mastering, and returns the bound driver.
func (d *PCIDriver) Probe(slot int) (*VirtioPCI, error) {
	if v := d.ConfigRead(slot, 0, 0, 2); v != 0x1AF4 {
		return nil, fmt.Errorf("virtiotest: slot %d vendor %#x is not virtio", slot, v)
	}
	bar, size := d.SizeBAR64(slot, 0)
	if size == 0 || bar == 0 {
		return nil, fmt.Errorf("virtiotest: slot %d BAR0 unassigned", slot)
	}
	d.ConfigWrite(slot, 0, pciCommand, 2, d.ConfigRead(slot, 0, pciCommand, 2)|2|4)
	v := &VirtioPCI{D: d, Slot: slot, BAR: bar}
	for _, c := range d.Caps(slot) {
		switch {
		case c.ID == 0x11:
			v.MSIXCap = c.Offset
			t := d.ConfigRead(slot, 0, c.Offset+4, 4)
			v.MSIXTable = bar + uint64(t&^7)
		case c.ID == 0x09 && c.BAR == 0:
			a := bar + uint64(c.Off)
			switch c.CfgType {
			case 1:
				v.Common = a
			case 2:
				v.Notify, v.NotifyMult = a, c.Extra
			case 3:
				v.ISR = a
			case 4:
				v.DeviceCfg = a
			}
		}
	}
	if v.Common == 0 || v.Notify == 0 || v.ISR == 0 {
		return nil, fmt.Errorf("virtiotest: slot %d lacks virtio capabilities", slot)
	}
	return v, nil
}

// Common config offsets.
const (
	CommonDFSelect   = 0x00
	CommonDF         = 0x04
	CommonGFSelect   = 0x08
	CommonGF         = 0x0C
	CommonMSIXConfig = 0x10
	CommonNumQueues  = 0x12
	CommonStatus     = 0x14
	CommonGen        = 0x15
	CommonQSelect    = 0x16
	CommonQSize      = 0x18
	CommonQMSIX      = 0x1A
	CommonQEnable    = 0x1C
	CommonQNotifyOff = 0x1E
	CommonQDesc      = 0x20
	CommonQDriver    = 0x28
	CommonQDevice    = 0x30
)

// Status returns the device status.
func (v *VirtioPCI) Status() uint8 { return uint8(v.D.Read(v.Common+CommonStatus, 1)) }

// SetStatus writes the device status.
func (v *VirtioPCI) SetStatus(s uint8) { v.D.Write(v.Common+CommonStatus, 1, uint64(s)) }

// DeviceFeatures reads the 64 feature bits the device offers.
func (v *VirtioPCI) DeviceFeatures() uint64 {
	v.D.Write(v.Common+CommonDFSelect, 4, 0)
	lo := v.D.Read(v.Common+CommonDF, 4)
	v.D.Write(v.Common+CommonDFSelect, 4, 1)
	hi := v.D.Read(v.Common+CommonDF, 4)
	return lo | hi<<32
}

// MSIXEnable programs vector i with address 0xFEE00000 and data 0x100+i,
// unmasks it, and enables MSI-X.
func (v *VirtioPCI) MSIXEnable(vectors int) {
	for i := range vectors {
		e := v.MSIXTable + 16*uint64(i)
		v.D.Write(e, 4, 0xFEE00000)
		v.D.Write(e+4, 4, 0)
		v.D.Write(e+8, 4, uint64(0x100+i))
		v.D.Write(e+12, 4, 0)
	}
	ctrl := v.D.ConfigRead(v.Slot, 0, v.MSIXCap+2, 2)
	v.D.ConfigWrite(v.Slot, 0, v.MSIXCap+2, 2, ctrl|1<<15)
	v.MSIX = true
}

// Init resets the device, negotiates features (the offered ones masked by
// want, which must include VIRTIO_F_VERSION_1), sets up every queue (size
// at most maxSize when non-zero), and sets DRIVER_OK. With MSI-X enabled,
// queue i uses vector i+1 and config changes vector 0.
func (v *VirtioPCI) Init(want uint64, maxSize uint16) error {
	v.SetStatus(0)
	v.SetStatus(virtio.StatusAcknowledge)
	v.SetStatus(virtio.StatusAcknowledge | virtio.StatusDriver)
	f := v.DeviceFeatures() & want
	v.D.Write(v.Common+CommonGFSelect, 4, 0)
	v.D.Write(v.Common+CommonGF, 4, f&0xffffffff)
	v.D.Write(v.Common+CommonGFSelect, 4, 1)
	v.D.Write(v.Common+CommonGF, 4, f>>32)
	st := uint8(virtio.StatusAcknowledge | virtio.StatusDriver | virtio.StatusFeaturesOK)
	v.SetStatus(st)
	if v.Status()&virtio.StatusFeaturesOK == 0 {
		return fmt.Errorf("virtiotest: device refused features %#x", f)
	}
	if v.MSIX {
		v.D.Write(v.Common+CommonMSIXConfig, 2, 0)
	}
	n := int(v.D.Read(v.Common+CommonNumQueues, 2))
	v.Queues = make([]*DriverQueue, n)
	for i := range n {
		v.D.Write(v.Common+CommonQSelect, 2, uint64(i))
		size := uint16(v.D.Read(v.Common+CommonQSize, 2))
		if maxSize != 0 && size > maxSize {
			size = maxSize
		}
		rings := v.D.alloc(RingBytes(size))
		data := uint64(size) * 64 << 10
		q := NewDriverQueue(v.D.Mem, size, rings, v.D.alloc(data), data)
		q.EventIdx = f&virtio.FeatureEventIdx != 0
		v.Queues[i] = q
		v.D.Write(v.Common+CommonQSize, 2, uint64(size))
		v.D.Write(v.Common+CommonQDesc, 8, q.Desc)
		v.D.Write(v.Common+CommonQDriver, 4, q.Avail&0xffffffff)
		v.D.Write(v.Common+CommonQDriver+4, 4, q.Avail>>32)
		v.D.Write(v.Common+CommonQDevice, 8, q.Used)
		if v.MSIX {
			v.D.Write(v.Common+CommonQMSIX, 2, uint64(i+1))
		}
		v.D.Write(v.Common+CommonQEnable, 2, 1)
	}
	v.SetStatus(st | virtio.StatusDriverOK)
	if s := v.Status(); s&virtio.StatusDriverOK == 0 || s&virtio.StatusNeedsReset != 0 {
		return fmt.Errorf("virtiotest: device status %#x after DRIVER_OK", s)
	}
	return nil
}

// Kick notifies queue i through its notify address.
func (v *VirtioPCI) Kick(i int) {
	v.D.Write(v.Common+CommonQSelect, 2, uint64(i))
	off := v.D.Read(v.Common+CommonQNotifyOff, 2)
	v.D.Write(v.Notify+off*uint64(v.NotifyMult), 2, uint64(i))
}

// Add publishes a chain on queue i and kicks if the device asks for it.
func (v *VirtioPCI) Add(i int, out [][]byte, in ...int) (uint16, error) {
	head, err := v.Queues[i].Add(out, in...)
	if err != nil {
		return 0, err
	}
	if v.Queues[i].NeedKick() {
		v.Kick(i)
	}
	return head, nil
}

// WaitUsed waits for a used entry on queue i: it polls after every
// interrupt the Host sees (reading the ISR when MSI-X is off, as the INTx
// handler does), up to WaitTimeout.
func (v *VirtioPCI) WaitUsed(i int) (Used, error) {
	deadline := time.NewTimer(WaitTimeout)
	defer deadline.Stop()
	for {
		u, ok, err := v.Queues[i].PopUsed()
		if err != nil || ok {
			return u, err
		}
		select {
		case <-v.D.Host.Interrupted():
			if !v.MSIX {
				v.D.Read(v.ISR, 1)
			}
		case <-deadline.C:
			return Used{}, fmt.Errorf("virtiotest: no used entry on queue %d within %v", i, WaitTimeout)
		}
	}
}
