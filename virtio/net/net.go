package net

import (
	"encoding/binary"
	"fmt"
	"log/slog"
	stdnet "net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gosandbox/sandbox/netstack"
	"github.com/gosandbox/sandbox/virtio"
)

// Feature bits (VIRTIO 1.2 section 5.1.3).
const (
	FeatureCsum      = 1 << 0  // VIRTIO_NET_F_CSUM: the guest sends partial checksums
	FeatureGuestCsum = 1 << 1  // VIRTIO_NET_F_GUEST_CSUM: the guest takes partial checksums
	FeatureMTU       = 1 << 3  // VIRTIO_NET_F_MTU: config mtu is valid
	FeatureMAC       = 1 << 5  // VIRTIO_NET_F_MAC: config mac is valid
	FeatureGuestTSO4 = 1 << 7  // VIRTIO_NET_F_GUEST_TSO4
	FeatureGuestTSO6 = 1 << 8  // VIRTIO_NET_F_GUEST_TSO6
	FeatureHostTSO4  = 1 << 11 // VIRTIO_NET_F_HOST_TSO4
	FeatureHostTSO6  = 1 << 12 // VIRTIO_NET_F_HOST_TSO6
	FeatureMrgRxbuf  = 1 << 15 // VIRTIO_NET_F_MRG_RXBUF
	FeatureStatus    = 1 << 16 // VIRTIO_NET_F_STATUS: config status is valid
)

// StatusLinkUp is VIRTIO_NET_S_LINK_UP in the config status field.
const StatusLinkUp = 1

const (
	// QueueSize is the size of the receive and the transmit queue.
	QueueSize = 256
	// DefaultMTU is the MTU used when Options.MTU is 0; it matches
	// netstack.DefaultMTU.
	DefaultMTU = netstack.DefaultMTU
	// MinMTU is the smallest MTU accepted (the IPv4 minimum).
	MinMTU = 68
	// MaxMTU is the largest MTU accepted.
	MaxMTU = 65535
	// DefaultRxTimeout is how long WriteFrame waits for receive buffers
	// when Options.RxTimeout is 0.
	DefaultRxTimeout = 100 * time.Millisecond

	rxQueue    = 0
	txQueue    = 1
	configSize = 12 // mac[6], status, max_virtqueue_pairs, mtu
	// notifyBatch bounds the TX frames completed between interrupts.
	notifyBatch = 64
)

var errClosed = virtio.ErrClosed

// Backend takes guest→host Ethernet frames (the virtio-net header already
// stripped and validated). *netstack.Network implements it. Both methods
// may modify frame in place and must not keep it after they return. They
// are called from the device's transmit goroutine, one frame at a time; an
// error drops the frame (it is counted in Stats.TxDropped).
type Backend interface {
	// DeliverFrame takes a frame with complete checksums, at most the MTU.
	DeliverFrame(frame []byte) error
	// DeliverFrameOffload takes a frame with offload metadata: a partial
	// checksum (only if VIRTIO_NET_F_CSUM was negotiated) and, for large
	// TCP segments, Segmented (only with HOST_TSO4/6).
	DeliverFrameOffload(frame []byte, o netstack.Offload) error
}

// Options configures a Device.
type Options struct {
	// MAC is the guest's Ethernet address (VIRTIO_NET_F_MAC), 6 bytes,
	// unicast. Required: use netstack's Guest().MAC.
	MAC stdnet.HardwareAddr
	// MTU is reported with VIRTIO_NET_F_MTU, MinMTU..MaxMTU; 0 means
	// DefaultMTU. Use netstack's Guest().MTU.
	MTU int
	// Backend takes the guest's transmitted frames. Required.
	Backend Backend
	// RxTimeout bounds how long WriteFrame waits for the guest to post
	// receive buffers before dropping a frame; 0 means DefaultRxTimeout.
	RxTimeout time.Duration
	// Logger receives debug records about dropped packets. nil discards.
	Logger *slog.Logger
}

// Device is a virtio-net device (device ID 1) with one receive and one
// transmit queue. The guest side is the virtqueues; the host side is a
// Backend for transmitted frames and WriteFrame/WriteFrameOffload for
// received ones. It implements virtio.Device and netstack.GSOFrameWriter.
type Device struct {
	mac       [6]byte
	mtu       int
	backend   Backend
	rxTimeout time.Duration
	log       *slog.Logger
	stats     counters

	mu     sync.Mutex
	sess   *session
	closed bool
}

var (
	_ virtio.Device           = (*Device)(nil)
	_ netstack.FrameWriter    = (*Device)(nil)
	_ netstack.GSOFrameWriter = (*Device)(nil)
)

// session is one activation of the device.
type session struct {
	a      *virtio.Activation
	rx, tx *virtio.Queue
	stop   chan struct{}
	wg     sync.WaitGroup // the TX worker and WriteFrame calls in progress

	hdrLen               int
	mrg                  bool
	guestCsum            bool
	guestTSO4, guestTSO6 bool
	features             uint64
	rxLock               chan struct{} // held by the WriteFrame using rx
	rxChains             []virtio.Chain
	scratch              []byte // software checksum/segmentation, under rxLock
}

// New returns a virtio-net device. The error matches ErrOptions.
func New(opts Options) (*Device, error) {
	if len(opts.MAC) != 6 || opts.MAC[0]&1 != 0 {
		return nil, fmt.Errorf("%w: MAC %q must be a 6-byte unicast address (use the network's Guest().MAC)", ErrOptions, opts.MAC)
	}
	mtu := opts.MTU
	if mtu == 0 {
		mtu = DefaultMTU
	}
	if mtu < MinMTU || mtu > MaxMTU {
		return nil, fmt.Errorf("%w: MTU %d outside %d..%d", ErrOptions, opts.MTU, MinMTU, MaxMTU)
	}
	if opts.Backend == nil {
		return nil, fmt.Errorf("%w: Backend is nil (pass the *netstack.Network)", ErrOptions)
	}
	if opts.RxTimeout < 0 {
		return nil, fmt.Errorf("%w: RxTimeout %v is negative", ErrOptions, opts.RxTimeout)
	}
	d := &Device{mtu: mtu, backend: opts.Backend, rxTimeout: opts.RxTimeout, log: opts.Logger}
	copy(d.mac[:], opts.MAC)
	if d.rxTimeout == 0 {
		d.rxTimeout = DefaultRxTimeout
	}
	if d.log == nil {
		d.log = slog.New(slog.DiscardHandler)
	}
	return d, nil
}

// MAC returns the guest's MAC address.
func (d *Device) MAC() stdnet.HardwareAddr { return append(stdnet.HardwareAddr(nil), d.mac[:]...) }

// MTU returns the MTU the device reports.
func (d *Device) MTU() int { return d.mtu }

// Type implements virtio.Device.
func (d *Device) Type() virtio.DeviceType { return virtio.TypeNet }

// Features implements virtio.Device.
func (d *Device) Features() uint64 {
	return FeatureCsum | FeatureGuestCsum | FeatureMTU | FeatureMAC |
		FeatureGuestTSO4 | FeatureGuestTSO6 | FeatureHostTSO4 | FeatureHostTSO6 |
		FeatureMrgRxbuf | FeatureStatus
}

// QueueSizes implements virtio.Device: receiveq1 and transmitq1.
func (d *Device) QueueSizes() []uint16 { return []uint16{QueueSize, QueueSize} }

// ConfigSize implements virtio.Device.
func (d *Device) ConfigSize() int { return configSize }

// ReadConfig implements virtio.Device: mac, status (link up),
// max_virtqueue_pairs (1) and mtu.
func (d *Device) ReadConfig(off int, p []byte) {
	var c [configSize]byte
	copy(c[0:6], d.mac[:])
	binary.LittleEndian.PutUint16(c[6:], StatusLinkUp)
	binary.LittleEndian.PutUint16(c[8:], 1)
	binary.LittleEndian.PutUint16(c[10:], uint16(d.mtu))
	virtio.ReadConfigAt(c[:], off, p)
}

// WriteConfig implements virtio.Device. The config space is read-only
// (VIRTIO_NET_F_CTRL_MAC_ADDR is not offered): writes are ignored.
func (d *Device) WriteConfig(int, []byte) {}

// Activate implements virtio.Device.
func (d *Device) Activate(a *virtio.Activation) error {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return virtio.ErrClosed
	}
	old := d.stopLocked()
	d.mu.Unlock()
	if old != nil {
		old.wg.Wait()
	}
	f := a.Features
	s := &session{
		a:        a,
		stop:     make(chan struct{}),
		hdrLen:   LegacyHeaderLen,
		mrg:      f&FeatureMrgRxbuf != 0,
		features: f,
		rxLock:   make(chan struct{}, 1),
	}
	if len(a.Queues) > rxQueue {
		s.rx = a.Queues[rxQueue]
	}
	if len(a.Queues) > txQueue {
		s.tx = a.Queues[txQueue]
	}
	if f&(virtio.FeatureVersion1|FeatureMrgRxbuf) != 0 {
		s.hdrLen = HeaderLen
	}
	s.guestCsum = f&FeatureGuestCsum != 0
	s.guestTSO4 = s.guestCsum && f&FeatureGuestTSO4 != 0
	s.guestTSO6 = s.guestCsum && f&FeatureGuestTSO6 != 0
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return virtio.ErrClosed
	}
	d.sess = s
	if s.tx != nil {
		s.wg.Add(1)
		go d.transmit(s)
	}
	return nil
}

// stopLocked detaches the current session and tells its goroutines to
// stop; the caller waits on its WaitGroup without d.mu held.
func (d *Device) stopLocked() *session {
	s := d.sess
	if s == nil {
		return nil
	}
	d.sess = nil
	close(s.stop)
	return s
}

// Reset implements virtio.Device: it stops the transmit worker and any
// WriteFrame waiting for receive buffers, and joins them.
func (d *Device) Reset() {
	d.mu.Lock()
	s := d.stopLocked()
	d.mu.Unlock()
	if s != nil {
		s.wg.Wait()
	}
}

// Close implements virtio.Device. Afterwards WriteFrame returns ErrClosed.
// It is safe to call more than once.
func (d *Device) Close() error {
	d.mu.Lock()
	d.closed = true
	s := d.stopLocked()
	d.mu.Unlock()
	if s != nil {
		s.wg.Wait()
	}
	return nil
}

// acquire returns the active session with the caller registered in its
// WaitGroup, or the reason there is none.
func (d *Device) acquire() (*session, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil, ErrClosed
	}
	s := d.sess
	if s == nil || s.rx == nil {
		return nil, ErrNotReady
	}
	s.wg.Add(1)
	return s, nil
}

// Stats returns the device's counters.
func (d *Device) Stats() Stats { return d.stats.snapshot() }

// String describes the device and its counters.
func (d *Device) String() string {
	return fmt.Sprintf("virtio-net %s mtu %d: %v", stdnet.HardwareAddr(d.mac[:]), d.mtu, d.Stats())
}

// Stats counts what crossed the device. Bytes count Ethernet frames
// without the virtio-net header.
type Stats struct {
	RxFrames, RxBytes uint64 // host→guest frames delivered to the guest
	// RxDropped counts host→guest frames not delivered: no receive
	// buffers in time, a chain too small, device not ready or broken.
	RxDropped uint64
	// RxInvalid counts receive chains the guest posted wrongly (readable
	// descriptors, too small for the header); they are returned unused.
	RxInvalid         uint64
	TxFrames, TxBytes uint64 // guest→host frames the backend accepted
	// TxDropped counts guest→host frames not delivered: invalid ones
	// (also in TxInvalid) and those the backend refused.
	TxDropped uint64
	// TxInvalid counts transmit chains with a malformed header, a bad
	// length or device-writable descriptors.
	TxInvalid uint64
}

// String formats the counters on one line.
func (s Stats) String() string {
	return fmt.Sprintf("rx %d frames %d bytes %d dropped %d bad buffers; tx %d frames %d bytes %d dropped (%d invalid)",
		s.RxFrames, s.RxBytes, s.RxDropped, s.RxInvalid, s.TxFrames, s.TxBytes, s.TxDropped, s.TxInvalid)
}

type counters struct {
	rxFrames, rxBytes, rxDropped, rxInvalid atomic.Uint64
	txFrames, txBytes, txDropped, txInvalid atomic.Uint64
}

func (c *counters) snapshot() Stats {
	return Stats{
		RxFrames: c.rxFrames.Load(), RxBytes: c.rxBytes.Load(), RxDropped: c.rxDropped.Load(), RxInvalid: c.rxInvalid.Load(),
		TxFrames: c.txFrames.Load(), TxBytes: c.txBytes.Load(), TxDropped: c.txDropped.Load(), TxInvalid: c.txInvalid.Load(),
	}
}
