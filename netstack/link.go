package netstack

import (
	"sync"
	"sync/atomic"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// FrameWriter receives host→guest Ethernet frames (destination MAC, source
// MAC, EtherType, payload; no FCS, no virtio-net header). The virtio-net
// device implements it by copying the frame into the guest's receive queue.
//
// WriteFrame must not keep frame after it returns. It is called from stack
// goroutines, possibly concurrently. It may block briefly to wait for receive
// buffers (backpressure) but must return once the device is closed; returning
// an error drops the frame (TCP retransmits). It must not call DeliverFrame
// synchronously: hand frames to the guest through a queue.
type FrameWriter interface {
	WriteFrame(frame []byte) error
}

// GSOFrameWriter is a FrameWriter that also takes frames with offload
// metadata: TCP segments up to a 64 KiB IP packet whose checksum holds only
// the pseudo-header sum. A virtio-net device implements it when the guest
// negotiated VIRTIO_NET_F_GUEST_CSUM and VIRTIO_NET_F_GUEST_TSO4/6, and writes
// o into the frame's virtio_net_hdr (NEEDS_CSUM, csum_start, csum_offset;
// gso_type TCPV4/TCPV6 by EtherType and gso_size = o.SegmentSize when
// o.Segmented). SetOutput with a GSOFrameWriter turns host→guest segmentation
// offload on for connections opened from then on.
type GSOFrameWriter interface {
	FrameWriter
	WriteFrameOffload(frame []byte, o Offload) error
}

// FrameWriterFunc adapts a function to FrameWriter.
type FrameWriterFunc func(frame []byte) error

// WriteFrame calls f(frame).
func (f FrameWriterFunc) WriteFrame(frame []byte) error { return f(frame) }

// Frame sizes.
const (
	// EthernetHeaderLen is the length of the Ethernet header in frames.
	EthernetHeaderLen = header.EthernetMinimumSize
	// DefaultMTU is the default IP MTU of the guest link: large frames, as
	// virtio-net with VIRTIO_NET_F_MTU allows, need no segmentation offload.
	DefaultMTU = 65520
	// MinMTU is the smallest MTU accepted (IPv6 needs 1280).
	MinMTU = 1280
	// MaxMTU is the largest MTU accepted: an IP packet is at most 65535 bytes.
	MaxMTU = 65535
)

// linkEndpoint is a stack.LinkEndpoint that exchanges Ethernet frames through
// a function (output) and deliver (input).
type linkEndpoint struct {
	mtu atomic.Uint32
	mac tcpip.LinkAddress

	// output writes one frame, with offload metadata if o is not nil; it
	// returns false when the frame was dropped.
	output func(frame []byte, o *Offload) bool
	// hostGSO selects host segmentation offload (the writer takes large
	// segments) over gVisor's own batching.
	hostGSO atomic.Bool

	bufs sync.Pool // *[]byte of MTU+header capacity

	mu sync.RWMutex
	// +checklocks:mu
	dispatcher stack.NetworkDispatcher
	// +checklocks:mu
	onClose func()
}

var (
	_ stack.LinkEndpoint = (*linkEndpoint)(nil)
	_ stack.GSOEndpoint  = (*linkEndpoint)(nil)
)

// hostGSOMaxSize keeps a segment plus its TCP and IP headers within the
// 65535 bytes of an IP packet.
const hostGSOMaxSize = 65000

func newLinkEndpoint(mtu uint32, mac tcpip.LinkAddress, output func([]byte, *Offload) bool) *linkEndpoint {
	e := &linkEndpoint{mac: mac, output: output}
	e.mtu.Store(mtu)
	e.bufs.New = func() any {
		b := make([]byte, 0, MaxMTU+EthernetHeaderLen)
		return &b
	}
	return e
}

// MTU implements stack.LinkEndpoint.MTU.
func (e *linkEndpoint) MTU() uint32 { return e.mtu.Load() }

// SetMTU implements stack.LinkEndpoint.SetMTU.
func (e *linkEndpoint) SetMTU(mtu uint32) { e.mtu.Store(mtu) }

// MaxHeaderLength implements stack.LinkEndpoint.MaxHeaderLength.
func (*linkEndpoint) MaxHeaderLength() uint16 { return header.EthernetMinimumSize }

// LinkAddress implements stack.LinkEndpoint.LinkAddress.
func (e *linkEndpoint) LinkAddress() tcpip.LinkAddress { return e.mac }

// SetLinkAddress implements stack.LinkEndpoint.SetLinkAddress. The MAC is
// fixed; the call is ignored.
func (*linkEndpoint) SetLinkAddress(tcpip.LinkAddress) {}

// Capabilities implements stack.LinkEndpoint.Capabilities.
func (*linkEndpoint) Capabilities() stack.LinkEndpointCapabilities {
	return stack.CapabilityResolutionRequired
}

// Attach implements stack.LinkEndpoint.Attach.
func (e *linkEndpoint) Attach(d stack.NetworkDispatcher) {
	e.mu.Lock()
	e.dispatcher = d
	e.mu.Unlock()
}

// IsAttached implements stack.LinkEndpoint.IsAttached.
func (e *linkEndpoint) IsAttached() bool {
	e.mu.RLock()
	defer e.mu.RUnlock()
	return e.dispatcher != nil
}

// Wait implements stack.LinkEndpoint.Wait. The endpoint has no goroutines.
func (*linkEndpoint) Wait() {}

// ARPHardwareType implements stack.LinkEndpoint.ARPHardwareType.
func (*linkEndpoint) ARPHardwareType() header.ARPHardwareType { return header.ARPHardwareEther }

// AddHeader implements stack.LinkEndpoint.AddHeader.
func (e *linkEndpoint) AddHeader(pkt *stack.PacketBuffer) {
	eth := header.Ethernet(pkt.LinkHeader().Push(header.EthernetMinimumSize))
	eth.Encode(&header.EthernetFields{
		SrcAddr: pkt.EgressRoute.LocalLinkAddress,
		DstAddr: pkt.EgressRoute.RemoteLinkAddress,
		Type:    pkt.NetworkProtocolNumber,
	})
}

// ParseHeader implements stack.LinkEndpoint.ParseHeader.
func (*linkEndpoint) ParseHeader(pkt *stack.PacketBuffer) bool {
	b, ok := pkt.LinkHeader().Consume(header.EthernetMinimumSize)
	if !ok {
		return false
	}
	pkt.NetworkProtocolNumber = header.Ethernet(b).Type()
	return true
}

// Close implements stack.LinkEndpoint.Close.
func (e *linkEndpoint) Close() {
	e.mu.Lock()
	f := e.onClose
	e.onClose = nil
	e.dispatcher = nil
	e.mu.Unlock()
	if f != nil {
		f()
	}
}

// SetOnCloseAction implements stack.LinkEndpoint.SetOnCloseAction.
func (e *linkEndpoint) SetOnCloseAction(f func()) {
	e.mu.Lock()
	e.onClose = f
	e.mu.Unlock()
}

// GSOMaxSize implements stack.GSOEndpoint.GSOMaxSize.
func (e *linkEndpoint) GSOMaxSize() uint32 {
	if e.hostGSO.Load() {
		return hostGSOMaxSize
	}
	return stack.GVisorGSOMaxSize
}

// SupportedGSO implements stack.GSOEndpoint.SupportedGSO. Without a
// GSOFrameWriter the stack still builds large segments internally and splits
// them into MTU-sized packets in one batch (gVisor GSO).
func (e *linkEndpoint) SupportedGSO() stack.SupportedGSO {
	if e.hostGSO.Load() {
		return stack.HostGSOSupported
	}
	return stack.GVisorGSOSupported
}

// WritePackets implements stack.LinkWriter.WritePackets.
func (e *linkEndpoint) WritePackets(pkts stack.PacketBufferList) (int, tcpip.Error) {
	n := 0
	for _, pkt := range pkts.AsSlice() {
		bp := e.bufs.Get().(*[]byte)
		frame := (*bp)[:0]
		for _, s := range pkt.AsSlices() {
			frame = append(frame, s...)
		}
		var o *Offload
		if g := pkt.GSOOptions; g.Type == stack.GSOTCPv4 || g.Type == stack.GSOTCPv6 {
			o = &Offload{
				NeedsChecksum:  g.NeedsCsum,
				ChecksumStart:  header.EthernetMinimumSize + g.L3HdrLen,
				ChecksumOffset: g.CsumOffset,
				Segmented:      pkt.Data().Size() > int(g.MSS),
				SegmentSize:    g.MSS,
			}
		}
		e.output(frame, o)
		*bp = frame[:0]
		e.bufs.Put(bp)
		n++
	}
	return n, nil
}

// deliver hands one inbound frame to the stack. The frame is copied.
func (e *linkEndpoint) deliver(frame []byte) {
	e.mu.RLock()
	d := e.dispatcher
	e.mu.RUnlock()
	if d == nil || len(frame) < header.EthernetMinimumSize {
		return
	}
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(frame)})
	defer pkt.DecRef()
	if !e.ParseHeader(pkt) {
		return
	}
	eth := header.Ethernet(pkt.LinkHeader().Slice())
	switch dst := eth.DestinationAddress(); {
	case dst == header.EthernetBroadcastAddress:
		pkt.PktType = tcpip.PacketBroadcast
	case header.IsMulticastEthernetAddress(dst):
		pkt.PktType = tcpip.PacketMulticast
	case dst == e.mac:
		pkt.PktType = tcpip.PacketHost
	default:
		return // not for us
	}
	d.DeliverNetworkPacket(eth.Type(), pkt)
}
