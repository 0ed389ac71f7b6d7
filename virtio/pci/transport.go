package pci

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"

	"github.com/gosandbox/sandbox/virtio"
	"github.com/gosandbox/sandbox/vmm/guestmem"
)

// Layout of a virtio device's BAR0.
const (
	BARSize             = 0x4000
	CommonCfgOffset     = 0x0000
	commonCfgLen        = 0x40
	ISROffset           = 0x0800
	DeviceCfgOffset     = 0x1000
	maxDeviceCfg        = 0x1000
	NotifyOffset        = 0x2000
	NotifyOffMultiplier = 4
	MSIXTableOffset     = 0x3000
	MSIXPBAOffset       = 0x3800
	maxVectors          = (MSIXPBAOffset - MSIXTableOffset) / msixEntrySize
	maxQueues           = (MSIXTableOffset - NotifyOffset) / NotifyOffMultiplier
)

// virtio_pci_cap cfg_type values.
const (
	capCommonCfg = 1
	capNotifyCfg = 2
	capISRCfg    = 3
	capDeviceCfg = 4
	capPCICfg    = 5
	capVendor    = 0x09
	capMSIX      = 0x11
)

// common config register offsets (struct virtio_pci_common_cfg).
const (
	ccDeviceFeatureSelect = 0x00
	ccDeviceFeature       = 0x04
	ccDriverFeatureSelect = 0x08
	ccDriverFeature       = 0x0C
	ccConfigMSIXVector    = 0x10
	ccNumQueues           = 0x12
	ccDeviceStatus        = 0x14
	ccConfigGeneration    = 0x15
	ccQueueSelect         = 0x16
	ccQueueSize           = 0x18
	ccQueueMSIXVector     = 0x1A
	ccQueueEnable         = 0x1C
	ccQueueNotifyOff      = 0x1E
	ccQueueDesc           = 0x20
	ccQueueDriver         = 0x28
	ccQueueDevice         = 0x30
	ccQueueNotifyData     = 0x38
	ccQueueReset          = 0x3A
	ccEnd                 = 0x3C
)

// ISR bits.
const (
	isrQueue  = 1
	isrConfig = 2
)

// transportFeatures are offered by the transport for every device.
const transportFeatures = virtio.FeatureVersion1 | virtio.FeatureEventIdx | virtio.FeatureIndirectDesc

// ErrFeatures is the error a Transport records when the driver accepts
// features the device did not offer or omits VIRTIO_F_VERSION_1.
var ErrFeatures = errors.New("pci: driver accepted features the device did not offer, or not VIRTIO_F_VERSION_1 (legacy drivers are not supported)")

type queueState struct {
	max, size, vector    uint16
	enabled              bool
	desc, driver, device uint64
	q                    *virtio.Queue
	ev                   virtio.Event
	evAddr               uint64
	evDone               chan struct{}
}

// Transport is a virtio device on the bus behind the virtio-pci modern
// transport. Its methods are safe for concurrent use.
type Transport struct {
	bus  *Bus
	slot int
	line uint8
	dev  virtio.Device
	mem  *guestmem.Memory
	log  *slog.Logger

	// devMu serializes device lifecycle calls (Activate, Reset, Close,
	// config access) and state changes that trigger them. Lock order:
	// devMu, then mu.
	devMu sync.Mutex

	mu           sync.Mutex
	cs           configSpace
	pciCfgCap    int
	msixCap      int
	msix         *msix
	offered      uint64
	devFeatSel   uint32
	drvFeatSel   uint32
	driverFeat   uint64
	status       uint8
	generation   uint8
	epoch        uint64 // bumped by every reset; stale workers' calls are ignored
	queueSel     uint16
	configVector uint16
	queues       []queueState
	isr          uint8
	intxHigh     bool
	active       bool
	broken       error
	closed       bool
}

// AddVirtio puts dev on the bus behind a virtio-pci modern transport and
// returns the transport. The bus owns dev from then on and closes it in
// Close.
func (b *Bus) AddVirtio(dev virtio.Device) (*Transport, error) {
	sizes := dev.QueueSizes()
	if len(sizes) == 0 || len(sizes) > maxQueues {
		return nil, fmt.Errorf("%w: device type %d has %d queues (1-%d allowed)", ErrConfig, dev.Type(), len(sizes), maxQueues)
	}
	for i, s := range sizes {
		if s == 0 || s > virtio.MaxQueueSize || s&(s-1) != 0 {
			return nil, fmt.Errorf("%w: device type %d queue %d max size %d is not a power of two <= 32768", ErrConfig, dev.Type(), i, s)
		}
	}
	if dev.ConfigSize() > maxDeviceCfg {
		return nil, fmt.Errorf("%w: device config of %d bytes is over %d", ErrConfig, dev.ConfigSize(), maxDeviceCfg)
	}
	var t *Transport
	_, err := b.add(func(slot int, line uint8, alloc func(uint64) (uint64, error)) (function, error) {
		base, err := alloc(BARSize)
		if err != nil {
			return nil, err
		}
		t = newTransport(b, slot, line, dev, base)
		return t, nil
	})
	if err != nil {
		return nil, err
	}
	return t, nil
}

func classOf(t virtio.DeviceType) uint32 {
	switch t {
	case virtio.TypeNet:
		return 0x020000 // network controller, ethernet
	case virtio.TypeBlock:
		return 0x010000 // mass storage, SCSI
	case virtio.TypeConsole:
		return 0x078000 // simple communication, other
	default:
		return 0xff0000 // unassigned class
	}
}

func newTransport(b *Bus, slot int, line uint8, dev virtio.Device, base uint64) *Transport {
	sizes := dev.QueueSizes()
	t := &Transport{
		bus: b, slot: slot, line: line, dev: dev, mem: b.mem, log: b.log,
		offered:      dev.Features() | transportFeatures,
		configVector: NoVector,
	}
	t.queues = make([]queueState, len(sizes))
	t.resetQueuesLocked()
	nvec := min(len(sizes)+1, maxVectors)
	t.msix = newMSIX(b.irqs, nvec, func(err error) { t.log.Debug("virtio-pci: MSI-X", "slot", slot, "err", err) })

	cs := &t.cs
	cs.header(VendorVirtio, DeviceVirtioBase+uint16(dev.Type()), 1, classOf(dev.Type()), VendorVirtio, 0x1100)
	cs.bar64(0, BARSize, base)
	cs.intx(1, line)
	vcap := func(cfgType uint8, off, length uint32, extra int) []byte {
		body := make([]byte, 14+extra)
		body[0] = byte(16 + extra) // cap_len
		body[1] = cfgType
		body[2] = 0 // BAR0
		binary.LittleEndian.PutUint32(body[6:], off)
		binary.LittleEndian.PutUint32(body[10:], length)
		return body
	}
	cs.addCap(capVendor, vcap(capCommonCfg, CommonCfgOffset, commonCfgLen, 0))
	notify := vcap(capNotifyCfg, NotifyOffset, uint32(NotifyOffMultiplier*len(sizes)), 4)
	binary.LittleEndian.PutUint32(notify[14:], NotifyOffMultiplier)
	cs.addCap(capVendor, notify)
	cs.addCap(capVendor, vcap(capISRCfg, ISROffset, 1, 0))
	if n := dev.ConfigSize(); n > 0 {
		cs.addCap(capVendor, vcap(capDeviceCfg, DeviceCfgOffset, uint32(n), 0))
	}
	t.pciCfgCap = cs.addCap(capVendor, vcap(capPCICfg, 0, 0, 4))
	// pci_cfg: bar, offset, length and data are driver-writable.
	cs.writable(t.pciCfgCap+4, 1, 0xff)
	cs.writable(t.pciCfgCap+8, 4, ^uint32(0))
	cs.writable(t.pciCfgCap+12, 4, ^uint32(0))
	cs.writable(t.pciCfgCap+16, 4, ^uint32(0))
	mbody := make([]byte, msixCapBodySize)
	binary.LittleEndian.PutUint16(mbody[0:], uint16(nvec-1))
	binary.LittleEndian.PutUint32(mbody[2:], MSIXTableOffset) // BIR 0
	binary.LittleEndian.PutUint32(mbody[6:], MSIXPBAOffset)   // BIR 0
	t.msixCap = cs.addCap(capMSIX, mbody)
	cs.writable(t.msixCap+2, 2, msixCtrlEnable|msixCtrlMask)
	return t
}

// Slot returns the device number on bus 0.
func (t *Transport) Slot() int { return t.slot }

// Device returns the device behind the transport.
func (t *Transport) Device() virtio.Device { return t.dev }

// Status returns the virtio device status byte.
func (t *Transport) Status() uint8 {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.status
}

// Err returns why the device is marked broken (NEEDS_RESET), or nil.
func (t *Transport) Err() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.broken
}

// BAR returns the guest-physical address BAR0 is programmed to.
func (t *Transport) BAR() uint64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.cs.barAddr(0)
}

// --- config space -------------------------------------------------------

func (t *Transport) readConfig(off int, p []byte) {
	t.mu.Lock()
	t.cs.read(off, p)
	cap := t.pciCfgCap
	if !overlaps(off, len(p), cap+16, 4) {
		t.mu.Unlock()
		return
	}
	bar, boff, blen := t.cs.b[cap+4], t.cs.get32(cap+8), t.cs.get32(cap+12)
	t.mu.Unlock()
	// VIRTIO_PCI_CAP_PCI_CFG: the data field reads through to BAR0.
	var win [4]byte
	if bar == 0 && (blen == 1 || blen == 2 || blen == 4) && uint64(boff)+uint64(blen) <= BARSize {
		t.accessBAR(0, uint64(boff), win[:blen], false)
	}
	for i := range p {
		if o := off + i - (cap + 16); o >= 0 && o < 4 {
			p[i] = win[o]
		}
	}
}

func (t *Transport) writeConfig(off int, p []byte) {
	t.mu.Lock()
	t.cs.write(off, p)
	cap := t.pciCfgCap
	if overlaps(off, len(p), t.msixCap+2, 2) {
		t.msix.setControl(t.cs.get16(t.msixCap + 2))
		t.updateINTxLocked() // enabling MSI-X disables INTx
	}
	if overlaps(off, len(p), regCommand, 2) {
		t.updateINTxLocked()
	}
	if overlaps(off, len(p), regCommand, 2) || overlaps(off, len(p), regBAR0, 8) {
		t.resyncIoeventsLocked()
	}
	pciCfg := overlaps(off, len(p), cap+16, 4)
	bar, boff, blen := t.cs.b[cap+4], t.cs.get32(cap+8), t.cs.get32(cap+12)
	var data [4]byte
	copy(data[:], t.cs.b[cap+16:cap+20])
	t.mu.Unlock()
	if pciCfg && bar == 0 && (blen == 1 || blen == 2 || blen == 4) && uint64(boff)+uint64(blen) <= BARSize {
		t.accessBAR(0, uint64(boff), data[:blen], true)
	}
}

func (t *Transport) decodedBARs() []barRange {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed || t.cs.get16(regCommand)&cmdMemory == 0 {
		return nil
	}
	return []barRange{{bar: 0, base: t.cs.barAddr(0), size: BARSize}}
}

// --- BAR0 ---------------------------------------------------------------

func (t *Transport) accessBAR(bar int, off uint64, p []byte, write bool) {
	if bar != 0 {
		return
	}
	switch {
	case off >= CommonCfgOffset && off < CommonCfgOffset+commonCfgLen:
		if write {
			t.writeCommon(int(off-CommonCfgOffset), p)
		} else {
			t.readCommon(int(off-CommonCfgOffset), p)
		}
	case off == ISROffset && !write:
		t.mu.Lock()
		fill(p, 0)
		p[0] = t.isr
		t.isr = 0
		t.updateINTxLocked()
		t.mu.Unlock()
	case off >= DeviceCfgOffset && off < DeviceCfgOffset+maxDeviceCfg:
		o := int(off - DeviceCfgOffset)
		t.devMu.Lock()
		if write {
			t.dev.WriteConfig(o, p)
		} else {
			fill(p, 0)
			t.dev.ReadConfig(o, p)
		}
		t.devMu.Unlock()
	case off >= NotifyOffset && off < MSIXTableOffset:
		if write && (off-NotifyOffset)%NotifyOffMultiplier == 0 {
			t.kick(int((off - NotifyOffset) / NotifyOffMultiplier))
		}
	case off >= MSIXTableOffset && off < MSIXPBAOffset:
		t.mu.Lock()
		if write {
			t.msix.writeTable(off-MSIXTableOffset, p)
		} else {
			t.msix.readTable(off-MSIXTableOffset, p)
		}
		t.mu.Unlock()
	case off >= MSIXPBAOffset && !write:
		t.mu.Lock()
		t.msix.readPBA(off-MSIXPBAOffset, p)
		t.mu.Unlock()
	default:
		if !write {
			fill(p, 0)
		}
	}
}

func (t *Transport) kick(i int) {
	t.mu.Lock()
	var q *virtio.Queue
	if i >= 0 && i < len(t.queues) && t.queues[i].enabled {
		q = t.queues[i].q
	}
	t.mu.Unlock()
	if q != nil {
		q.Kick()
	}
}

// commonBytes serializes the common config registers.
func (t *Transport) commonBytesLocked() [commonCfgLen]byte {
	var b [commonCfgLen]byte
	le := binary.LittleEndian
	le.PutUint32(b[ccDeviceFeatureSelect:], t.devFeatSel)
	if t.devFeatSel < 2 {
		le.PutUint32(b[ccDeviceFeature:], uint32(t.offered>>(32*t.devFeatSel)))
	}
	le.PutUint32(b[ccDriverFeatureSelect:], t.drvFeatSel)
	if t.drvFeatSel < 2 {
		le.PutUint32(b[ccDriverFeature:], uint32(t.driverFeat>>(32*t.drvFeatSel)))
	}
	le.PutUint16(b[ccConfigMSIXVector:], t.configVector)
	le.PutUint16(b[ccNumQueues:], uint16(len(t.queues)))
	b[ccDeviceStatus] = t.status
	b[ccConfigGeneration] = t.generation
	le.PutUint16(b[ccQueueSelect:], t.queueSel)
	if int(t.queueSel) < len(t.queues) {
		q := &t.queues[t.queueSel]
		le.PutUint16(b[ccQueueSize:], q.size)
		le.PutUint16(b[ccQueueMSIXVector:], q.vector)
		if q.enabled {
			le.PutUint16(b[ccQueueEnable:], 1)
		}
		le.PutUint16(b[ccQueueNotifyOff:], t.queueSel)
		le.PutUint64(b[ccQueueDesc:], q.desc)
		le.PutUint64(b[ccQueueDriver:], q.driver)
		le.PutUint64(b[ccQueueDevice:], q.device)
		le.PutUint16(b[ccQueueNotifyData:], t.queueSel)
	}
	return b
}

func (t *Transport) readCommon(off int, p []byte) {
	t.mu.Lock()
	b := t.commonBytesLocked()
	t.mu.Unlock()
	fill(p, 0)
	if off < len(b) {
		copy(p, b[off:])
	}
}

func (t *Transport) writeCommon(off int, p []byte) {
	t.devMu.Lock()
	defer t.devMu.Unlock()
	t.mu.Lock()
	if t.closed {
		t.mu.Unlock()
		return
	}
	b := t.commonBytesLocked()
	old := b
	if off >= len(b) {
		t.mu.Unlock()
		return
	}
	copy(b[off:], p)
	end := off + len(p)
	le := binary.LittleEndian
	touched := func(reg, n int) bool { return overlaps(off, end-off, reg, n) }
	var activate, reset bool
	if touched(ccDeviceFeatureSelect, 4) {
		t.devFeatSel = le.Uint32(b[ccDeviceFeatureSelect:])
	}
	if touched(ccDriverFeatureSelect, 4) {
		t.drvFeatSel = le.Uint32(b[ccDriverFeatureSelect:])
	}
	if touched(ccDriverFeature, 4) && t.drvFeatSel < 2 && t.status&virtio.StatusFeaturesOK == 0 {
		shift := 32 * t.drvFeatSel
		t.driverFeat = t.driverFeat&^(0xffffffff<<shift) | uint64(le.Uint32(b[ccDriverFeature:]))<<shift
	}
	if touched(ccConfigMSIXVector, 2) {
		t.configVector = t.vectorOrNone(le.Uint16(b[ccConfigMSIXVector:]))
	}
	if touched(ccQueueSelect, 2) {
		t.queueSel = le.Uint16(b[ccQueueSelect:])
	}
	if int(t.queueSel) < len(t.queues) && t.queueSel == le.Uint16(old[ccQueueSelect:]) {
		q := &t.queues[t.queueSel]
		if !q.enabled {
			if touched(ccQueueSize, 2) {
				q.size = le.Uint16(b[ccQueueSize:])
			}
			if touched(ccQueueDesc, 8) {
				q.desc = le.Uint64(b[ccQueueDesc:])
			}
			if touched(ccQueueDriver, 8) {
				q.driver = le.Uint64(b[ccQueueDriver:])
			}
			if touched(ccQueueDevice, 8) {
				q.device = le.Uint64(b[ccQueueDevice:])
			}
		}
		if touched(ccQueueMSIXVector, 2) {
			q.vector = t.vectorOrNone(le.Uint16(b[ccQueueMSIXVector:]))
		}
		if touched(ccQueueEnable, 2) && le.Uint16(b[ccQueueEnable:]) == 1 && !q.enabled {
			t.enableQueueLocked(int(t.queueSel))
		}
	}
	if touched(ccDeviceStatus, 1) {
		activate, reset = t.setStatusLocked(b[ccDeviceStatus])
	}
	if reset {
		wasActive := t.active
		t.resetLocked()
		t.mu.Unlock()
		if wasActive {
			t.dev.Reset()
		}
		return
	}
	var a *virtio.Activation
	if activate {
		a = t.activationLocked()
	}
	t.mu.Unlock()
	if a != nil {
		if err := t.dev.Activate(a); err != nil {
			t.fail(fmt.Errorf("pci: activating device type %d: %w", t.dev.Type(), err))
		}
	}
}

func (t *Transport) vectorOrNone(v uint16) uint16 {
	if int(v) >= len(t.msix.vectors) {
		return NoVector
	}
	return v
}

// setStatusLocked applies a device status write and reports whether the
// device must be activated or reset.
func (t *Transport) setStatusLocked(v uint8) (activate, reset bool) {
	if v == 0 {
		return false, true
	}
	// Status bits only accumulate until a reset (the driver must not
	// clear them; a hostile one could otherwise activate twice).
	v |= t.status
	if v&virtio.StatusFeaturesOK != 0 && t.status&virtio.StatusFeaturesOK == 0 {
		if t.driverFeat&^t.offered != 0 || t.driverFeat&virtio.FeatureVersion1 == 0 {
			t.log.Debug("virtio-pci: feature negotiation failed", "slot", t.slot,
				"offered", fmt.Sprintf("%#x", t.offered), "accepted", fmt.Sprintf("%#x", t.driverFeat))
			v &^= virtio.StatusFeaturesOK // the driver reads it back and gives up
		}
	}
	if v&virtio.StatusDriverOK != 0 && t.status&virtio.StatusDriverOK == 0 {
		if v&virtio.StatusFeaturesOK == 0 {
			v &^= virtio.StatusDriverOK
		} else if t.status&virtio.StatusNeedsReset == 0 && !t.active {
			activate = true
		}
	}
	t.status = v
	return activate, false
}

func (t *Transport) enableQueueLocked(i int) {
	qs := &t.queues[i]
	epoch := t.epoch
	q, err := virtio.NewQueue(t.mem, virtio.QueueConfig{
		Index:     i,
		Size:      qs.size,
		MaxSize:   qs.max,
		DescAddr:  qs.desc,
		AvailAddr: qs.driver,
		UsedAddr:  qs.device,
		EventIdx:  t.driverFeat&virtio.FeatureEventIdx != 0,
		Indirect:  t.driverFeat&virtio.FeatureIndirectDesc != 0,
		Interrupt: func() error { t.queueInterrupt(epoch, i); return nil },
		Fail:      t.failFunc(epoch),
	})
	if err != nil {
		t.failLocked(err)
		return
	}
	qs.q = q
	qs.enabled = true
	t.startIoeventLocked(i)
}

func (t *Transport) activationLocked() *virtio.Activation {
	qs := make([]*virtio.Queue, len(t.queues))
	for i := range t.queues {
		if t.queues[i].enabled {
			qs[i] = t.queues[i].q
		}
	}
	t.active = true
	epoch := t.epoch
	return &virtio.Activation{
		Mem:           t.mem,
		Features:      t.driverFeat,
		Queues:        qs,
		Fail:          t.failFunc(t.epoch),
		ConfigChanged: func() { t.configChanged(epoch) },
	}
}

func (t *Transport) resetQueuesLocked() {
	sizes := t.dev.QueueSizes()
	for i := range t.queues {
		t.stopIoeventLocked(i)
		t.queues[i] = queueState{max: sizes[i], size: sizes[i], vector: NoVector}
	}
}

// resetLocked returns the transport to its initial state (device status
// 0). The MSI-X table is PCI state and survives a virtio reset.
func (t *Transport) resetLocked() {
	t.epoch++
	t.resetQueuesLocked()
	t.status = 0
	t.active = false
	t.broken = nil
	t.driverFeat = 0
	t.devFeatSel, t.drvFeatSel, t.queueSel = 0, 0, 0
	t.configVector = NoVector
	t.isr = 0
	t.updateINTxLocked()
}

// failFunc returns the Fail callback for the current epoch: it marks the
// device broken (NEEDS_RESET) and tells the driver with a
// configuration-change interrupt, unless the device was reset since.
func (t *Transport) failFunc(epoch uint64) func(error) {
	return func(err error) {
		t.mu.Lock()
		defer t.mu.Unlock()
		if t.epoch == epoch {
			t.failLocked(err)
		}
	}
}

func (t *Transport) fail(err error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.failLocked(err)
}

func (t *Transport) failLocked(err error) {
	if t.broken != nil || t.closed {
		return
	}
	t.broken = err
	t.log.Debug("virtio-pci: device needs reset", "slot", t.slot, "type", t.dev.Type(), "err", err)
	if t.status != 0 {
		t.status |= virtio.StatusNeedsReset
		t.configInterruptLocked()
	}
}

func (t *Transport) configChanged(epoch uint64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.epoch != epoch {
		return
	}
	t.generation++
	t.configInterruptLocked()
}

func (t *Transport) configInterruptLocked() {
	if t.msix.enabled {
		t.msix.fire(t.configVector)
		return
	}
	t.isr |= isrConfig
	t.updateINTxLocked()
}

func (t *Transport) queueInterrupt(epoch uint64, i int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed || t.epoch != epoch {
		return
	}
	if t.msix.enabled {
		if i < len(t.queues) {
			t.msix.fire(t.queues[i].vector)
		}
		return
	}
	t.isr |= isrQueue
	t.updateINTxLocked()
}

func (t *Transport) updateINTxLocked() {
	high := t.isr != 0 && t.cs.get16(regCommand)&cmdINTxDisable == 0 && !t.msix.enabled
	if high != t.intxHigh || high {
		t.intxHigh = high
		t.bus.setINTx(t.line, t.slot, high)
	}
}

// --- ioevents ---------------------------------------------------------------

func (t *Transport) notifyAddrLocked(i int) (uint64, bool) {
	if t.cs.get16(regCommand)&cmdMemory == 0 {
		return 0, false
	}
	base := t.cs.barAddr(0)
	if base < BARWindowBase || base+BARSize > BARWindowBase+BARWindowSize {
		return 0, false
	}
	return base + NotifyOffset + uint64(i)*NotifyOffMultiplier, true
}

func (t *Transport) startIoeventLocked(i int) {
	qs := &t.queues[i]
	if t.bus.ioev == nil || !qs.enabled || t.closed {
		t.stopIoeventLocked(i)
		return
	}
	addr, ok := t.notifyAddrLocked(i)
	if qs.ev != nil && ok && qs.evAddr == addr {
		return
	}
	t.stopIoeventLocked(i)
	if !ok {
		return
	}
	ev, err := t.bus.ioev.Ioevent(addr, 2)
	if err != nil {
		// Kicks still reach WriteMMIO; only slower.
		t.log.Debug("virtio-pci: ioevent", "slot", t.slot, "queue", i, "err", err)
		return
	}
	done := make(chan struct{})
	qs.ev, qs.evAddr, qs.evDone = ev, addr, done
	q := qs.q
	go func() {
		defer close(done)
		for ev.Wait() == nil {
			q.Kick()
		}
	}()
}

func (t *Transport) stopIoeventLocked(i int) {
	qs := &t.queues[i]
	if qs.ev == nil {
		return
	}
	qs.ev.Close()
	<-qs.evDone
	qs.ev, qs.evDone = nil, nil
}

// resyncIoeventsLocked re-registers notify events after a BAR move or a
// memory-decode change.
func (t *Transport) resyncIoeventsLocked() {
	for i := range t.queues {
		t.startIoeventLocked(i)
	}
}

func (t *Transport) close() error {
	t.devMu.Lock()
	defer t.devMu.Unlock()
	t.mu.Lock()
	if t.closed {
		t.mu.Unlock()
		return nil
	}
	for i := range t.queues {
		t.stopIoeventLocked(i)
	}
	t.closed = true
	t.msix.release()
	t.mu.Unlock()
	return t.dev.Close()
}

// String describes the transport for diagnosing a stalled device: slot,
// device type, status, MSI-X state (enable and function mask, and each
// vector's mask and pending bits) and every enabled queue with its vector
// and ring state (see virtio.Queue.String).
func (t *Transport) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	var b strings.Builder
	fmt.Fprintf(&b, "virtio-pci slot %d: device type %d, status %#x", t.slot, t.dev.Type(), t.status)
	if t.broken != nil {
		fmt.Fprintf(&b, ", broken: %v", t.broken)
	}
	fmt.Fprintf(&b, "; MSI-X enabled %v, function masked %v, config vector %d", t.msix.enabled, t.msix.fnMask, t.configVector)
	for i := range t.msix.vectors {
		v := &t.msix.vectors[i]
		if v.irq == nil && !v.pending && v.masked() && v.addr() == 0 {
			continue // never set up
		}
		fmt.Fprintf(&b, "\n  vector %d: addr %#x data %#x masked %v pending %v routed %v", i, v.addr(), v.data(), v.masked(), v.pending, v.irq != nil)
	}
	for i := range t.queues {
		qs := &t.queues[i]
		if !qs.enabled || qs.q == nil {
			continue
		}
		fmt.Fprintf(&b, "\n  vector %d: %v", qs.vector, qs.q)
	}
	return b.String()
}
