package net_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"io"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/gosandbox/sandbox/netstack"
	"github.com/gosandbox/sandbox/netstack/netstacktest"
	vnet "github.com/gosandbox/sandbox/virtio/net"
	"github.com/gosandbox/sandbox/virtio/virtiotest"
	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/link/channel"
	"gvisor.dev/gvisor/pkg/tcpip/link/ethernet"
	"gvisor.dev/gvisor/pkg/tcpip/network/arp"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
)

// countingBackend passes frames to a real Network and counts the TSO
// segments among them.
type countingBackend struct {
	*netstack.Network
	segments atomic.Int64
}

func (b *countingBackend) DeliverFrameOffload(f []byte, o netstack.Offload) error {
	if o.Segmented {
		b.segments.Add(1)
	}
	return b.Network.DeliverFrameOffload(f, o)
}

// virtioGuest is a gVisor stack playing the guest, whose only link is the
// virtio-net device, driven through the virtiotest driver double the way
// Linux's virtio_net drives it: it keeps the receive queue full of
// buffers, parses the virtio-net header of every received frame, and puts
// each outgoing packet, with its own header, on the transmit queue.
type virtioGuest struct {
	t        testing.TB
	h        *virtiotest.Harness
	dev      *vnet.Device
	backend  *countingBackend
	n        *netstack.Network
	s        *stack.Stack
	ch       *channel.Endpoint
	mrg      bool
	offloads bool
	rxSize   int
	// rxSegments counts received frames with a TSO header.
	rxSegments atomic.Int64

	cancel context.CancelFunc
	wg     sync.WaitGroup
}

func newVirtioGuest(t testing.TB, features uint64, mtu int) *virtioGuest {
	t.Helper()
	rules, err := netstack.ParseRules("allow@host:tcp")
	if err != nil {
		t.Fatal(err)
	}
	n, err := netstack.New(netstack.Config{Name: t.Name(), Rules: rules, MTU: mtu, DisableIPv6: true,
		DNS: netstack.DNSConfig{ResolvConf: "/nonexistent"}})
	if err != nil {
		t.Fatalf("netstack.New: %v", err)
	}
	cfg := n.Guest()
	g := &virtioGuest{t: t, n: n, backend: &countingBackend{Network: n}}
	g.dev = newDevice(t, g.backend, vnet.Options{MAC: cfg.MAC, MTU: cfg.MTU})
	n.SetOutput(g.dev)
	g.h = harness(t, g.dev, features)
	g.mrg = features&vnet.FeatureMrgRxbuf != 0
	g.offloads = features&vnet.FeatureCsum != 0
	g.rxSize = 4096
	if !g.mrg {
		g.rxSize = vnet.HeaderLen + vnet.MaxFrameLen
	}

	g.ch = channel.New(1024, uint32(cfg.MTU+header.EthernetMinimumSize), tcpip.LinkAddress(cfg.MAC))
	if features&vnet.FeatureGuestCsum != 0 {
		g.ch.LinkEPCapabilities |= stack.CapabilityRXChecksumOffload
	}
	if g.offloads && features&vnet.FeatureHostTSO4 != 0 {
		g.ch.SupportedGSOKind = stack.HostGSOSupported
	}
	g.s = stack.New(stack.Options{
		NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol, arp.NewProtocol},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol, udp.NewProtocol},
	})
	if err := g.s.CreateNIC(1, ethernet.New(g.ch)); err != nil {
		t.Fatalf("CreateNIC: %v", err)
	}
	netstacktest.ConfigureGuest(t, g.s, 1, netstacktest.GuestAddrs{IPv4: cfg.IPv4, GatewayIPv4: cfg.GatewayIPv4})

	ctx, cancel := context.WithCancel(context.Background())
	g.cancel = cancel
	out := make(chan *stack.PacketBuffer)
	g.wg.Add(2)
	go func() {
		defer g.wg.Done()
		for {
			pkt := g.ch.ReadContext(ctx)
			if pkt == nil {
				return
			}
			select {
			case out <- pkt:
			case <-ctx.Done():
				pkt.DecRef()
				return
			}
		}
	}()
	go func() {
		defer g.wg.Done()
		g.pump(ctx, out)
	}()
	t.Cleanup(g.close)
	return g
}

func (g *virtioGuest) close() {
	g.cancel()
	g.wg.Wait()
	g.s.Close()
	g.s.Wait()
	g.dev.Close()
	g.n.Close()
}

// pump is the guest driver: one goroutine owns both driver queues.
func (g *virtioGuest) pump(ctx context.Context, out <-chan *stack.PacketBuffer) {
	rxq, txq := g.h.Queues[qRx], g.h.Queues[qTx]
	var pending [][]byte // buffers of a mergeable frame being assembled
	want := 0
	for {
		// Reclaim transmitted chains.
		for {
			_, ok, err := txq.PopUsed()
			if err != nil {
				g.t.Errorf("tx used: %v", err)
				return
			}
			if !ok {
				break
			}
		}
		// Receive.
		for {
			u, ok, err := rxq.PopUsed()
			if err != nil {
				g.t.Errorf("rx used: %v", err)
				return
			}
			if !ok {
				break
			}
			if len(pending) == 0 {
				if len(u.Written) < vnet.HeaderLen {
					continue // a dropped frame's buffer
				}
				hdr, _ := vnet.ParseHeader(u.Written)
				want = 1
				if g.mrg {
					want = int(hdr.NumBuffers)
				}
			}
			pending = append(pending, u.Written)
			if len(pending) == want {
				g.receive(bytes.Join(pending, nil))
				pending = pending[:0]
			}
		}
		for rxq.FreeDescriptors() > 0 {
			if _, err := rxq.Add(nil, g.rxSize); err != nil {
				break
			}
		}
		g.h.Kick(qRx)
		var outc <-chan *stack.PacketBuffer
		if txq.FreeDescriptors() > 0 {
			outc = out
		}
		select {
		case <-ctx.Done():
			return
		case <-g.h.Interrupts(qRx):
		case <-g.h.Interrupts(qTx):
		case pkt := <-outc:
			g.transmit(pkt)
		}
	}
}

// receive hands one received frame (virtio-net header first) to the guest
// stack.
func (g *virtioGuest) receive(b []byte) {
	hdr, err := vnet.ParseHeader(b)
	if err != nil {
		g.t.Errorf("received header: %v", err)
		return
	}
	if hdr.GSOType != vnet.GSONone {
		g.rxSegments.Add(1)
	}
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(b[vnet.HeaderLen:])})
	g.ch.InjectInbound(0, pkt)
	pkt.DecRef()
}

// transmit puts one outgoing packet on the transmit queue with a header
// built from its GSO options, as Linux's virtio_net does.
func (g *virtioGuest) transmit(pkt *stack.PacketBuffer) {
	defer pkt.DecRef()
	var hdr vnet.Header
	if o := pkt.GSOOptions; g.offloads && (o.Type == stack.GSOTCPv4 || o.Type == stack.GSOTCPv6) {
		if o.NeedsCsum {
			hdr.Flags = vnet.HdrFNeedsCsum
			hdr.CsumStart = header.EthernetMinimumSize + o.L3HdrLen
			hdr.CsumOffset = o.CsumOffset
		}
		if pkt.Data().Size() > int(o.MSS) {
			hdr.GSOType, hdr.GSOSize = vnet.GSOTCPv4, o.MSS
			if o.Type == stack.GSOTCPv6 {
				hdr.GSOType = vnet.GSOTCPv6
			}
		}
	}
	frame := hdrBytes(hdr)
	for _, s := range pkt.AsSlices() {
		frame = append(frame, s...)
	}
	if _, err := g.h.Queues[qTx].Add([][]byte{frame}); err != nil {
		g.t.Errorf("tx add: %v", err)
		return
	}
	g.h.Kick(qTx)
}

func (g *virtioGuest) dialTCP(ap netip.AddrPort) (*gonet.TCPConn, error) {
	return gonet.DialTCP(g.s, tcpip.FullAddress{NIC: 1, Addr: tcpip.AddrFrom4(ap.Addr().As4()), Port: ap.Port()}, ipv4.ProtocolNumber)
}

// TestEndToEnd: a guest TCP/IP stack behind the device resolves the
// gateway with ARP and moves 1 MiB each way over TCP to a host loopback
// echo server through the real netstack, with and without mergeable
// buffers and offloads.
func TestEndToEnd(t *testing.T) {
	all := uint64(allFeatures)
	for _, tc := range []struct {
		name     string
		features uint64
		mtu      int
	}{
		{"mergeable mtu 1500", vnet.FeatureMAC | vnet.FeatureMTU | vnet.FeatureStatus | vnet.FeatureMrgRxbuf, 1500},
		{"big buffers mtu 65520", vnet.FeatureMAC | vnet.FeatureMTU | vnet.FeatureStatus, 65520},
		{"offloads mtu 1500", all, 1500},
		{"offloads without mergeable", all &^ vnet.FeatureMrgRxbuf, 1500},
		{"guest csum without guest TSO", all &^ (vnet.FeatureGuestTSO4 | vnet.FeatureGuestTSO6), 1500},
		// The device segments and checksums host TSO segments itself; the
		// guest stack verifies every checksum.
		{"host offloads only", all &^ (vnet.FeatureGuestCsum | vnet.FeatureGuestTSO4 | vnet.FeatureGuestTSO6), 1500},
	} {
		t.Run(tc.name, func(t *testing.T) {
			port := netstacktest.StartEcho(t, "127.0.0.1:0", false).Port()
			g := newVirtioGuest(t, tc.features, tc.mtu)
			c, err := g.dialTCP(netip.AddrPortFrom(g.n.Guest().GatewayIPv4, port))
			if err != nil {
				t.Fatalf("dial the host echo server through the gateway: %v (device %v; network %+v)", err, g.dev, g.n.Stats())
			}
			defer c.Close()
			data := make([]byte, 1<<20)
			rand.Read(data)
			errc := make(chan error, 1)
			go func() {
				_, err := c.Write(data)
				errc <- err
			}()
			got := make([]byte, len(data))
			if _, err := io.ReadFull(c, got); err != nil {
				t.Fatalf("read echo: %v (device %v)", err, g.dev)
			}
			if err := <-errc; err != nil {
				t.Fatalf("write: %v", err)
			}
			if !bytes.Equal(got, data) {
				t.Fatal("echoed data differs")
			}
			s := g.dev.Stats()
			if s.RxFrames == 0 || s.TxFrames == 0 || s.TxInvalid != 0 || s.RxInvalid != 0 {
				t.Errorf("device stats %v", s)
			}
			tso := tc.features&vnet.FeatureHostTSO4 != 0
			if segs := g.backend.segments.Load(); tso != (segs > 0) {
				t.Errorf("HOST_TSO4 negotiated %v, guest→host TSO segments %d", tso, segs)
			}
			gtso := tc.features&vnet.FeatureGuestTSO4 != 0
			if segs := g.rxSegments.Load(); gtso != (segs > 0) {
				t.Errorf("GUEST_TSO4 negotiated %v, host→guest TSO segments %d", gtso, segs)
			}
			t.Logf("%v", g.dev)
		})
	}
}
