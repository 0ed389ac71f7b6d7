package netstack

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/network/arp"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/icmp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"

	"github.com/gosandbox/sandbox/netstack/netstacktest"
)

// testGuest is a second gVisor stack playing the guest, wired frame to frame
// to a Network through two queues (as a virtio ring pair would be).
type testGuest struct {
	t     testing.TB
	n     *Network
	cfg   GuestConfig
	s     *stack.Stack
	ep    *linkEndpoint
	toNet chan guestFrame
	toGst chan []byte
	done  chan struct{}
	wg    sync.WaitGroup
	once  sync.Once
	// offload makes the pump act like a guest using checksum offload: TCP
	// and UDP checksums are replaced by the pseudo-header sum and completed
	// by DeliverFrameOffload.
	offload atomic.Bool
	// oversized counts guest→network frames above the MTU (guest TSO).
	oversized atomic.Int64
}

// guestFrame is a frame the guest sends, with offload metadata when the
// guest stack uses segmentation offload (useGuestTSO).
type guestFrame struct {
	b []byte
	o *Offload
}

// useGuestTSO makes the guest stack send large TCP segments with partial
// checksums, as a Linux guest does with VIRTIO_NET_F_HOST_TSO4/6, for
// connections opened from then on.
func (g *testGuest) useGuestTSO() { g.ep.hostGSO.Store(true) }

// newTestNetwork starts a Network and a guest stack attached to it. Both are
// closed by t.Cleanup.
func newTestNetwork(t testing.TB, cfg Config) (*Network, *testGuest) {
	t.Helper()
	if cfg.Name == "" {
		cfg.Name = t.Name()
	}
	if len(cfg.DNS.Servers) == 0 && cfg.DNS.ResolvConf == "" {
		cfg.DNS.ResolvConf = "/nonexistent" // no upstream unless the test sets one
	}
	n, err := New(cfg)
	if err != nil {
		t.Fatalf("New() = %v", err)
	}
	g := attachGuest(t, n)
	t.Cleanup(func() {
		g.stop()
		n.Close()
	})
	return n, g
}

func attachGuest(t testing.TB, n *Network) *testGuest {
	g := &testGuest{
		t: t, n: n, cfg: n.Guest(),
		toNet: make(chan guestFrame, 4096),
		toGst: make(chan []byte, 4096),
		done:  make(chan struct{}),
	}
	n.SetOutput(FrameWriterFunc(func(f []byte) error {
		select {
		case g.toGst <- append([]byte(nil), f...):
			return nil
		default:
			return errors.New("guest ring full")
		}
	}))
	g.ep = newLinkEndpoint(uint32(g.cfg.MTU), tcpip.LinkAddress(g.cfg.MAC), func(f []byte, o *Offload) bool {
		fr := guestFrame{b: append([]byte(nil), f...)}
		if o != nil {
			oc := *o
			fr.o = &oc
		}
		select {
		case g.toNet <- fr:
			return true
		default:
			return false
		}
	})
	g.s = stack.New(stack.Options{
		NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol, ipv6.NewProtocol, arp.NewProtocol},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol, udp.NewProtocol, icmp.NewProtocol4, icmp.NewProtocol6},
	})
	sack := tcpip.TCPSACKEnabled(true)
	g.s.SetTransportProtocolOption(tcp.ProtocolNumber, &sack)
	if err := g.s.CreateNIC(1, g.ep); err != nil {
		t.Fatalf("guest CreateNIC: %v", err)
	}
	netstacktest.ConfigureGuest(t, g.s, 1, netstacktest.GuestAddrs{IPv4: g.cfg.IPv4, GatewayIPv4: g.cfg.GatewayIPv4,
		IPv6: g.cfg.IPv6, GatewayIPv6: g.cfg.GatewayIPv6})
	g.wg.Add(2)
	go func() {
		defer g.wg.Done()
		for {
			select {
			case fr := <-g.toNet:
				f := fr.b
				switch {
				case fr.o != nil:
					if len(f) > g.cfg.MTU+header.EthernetMinimumSize {
						g.oversized.Add(1)
					}
					n.DeliverFrameOffload(f, *fr.o)
				case !g.offload.Load():
					n.DeliverFrame(f)
				default:
					if o, ok := partialChecksum(f); ok {
						n.DeliverFrameOffload(f, o)
					} else {
						n.DeliverFrame(f)
					}
				}
			case <-g.done:
				return
			}
		}
	}()
	go func() {
		defer g.wg.Done()
		for {
			select {
			case f := <-g.toGst:
				g.ep.deliver(f)
			case <-g.done:
				return
			}
		}
	}()
	return g
}

func (g *testGuest) stop() {
	g.once.Do(func() {
		close(g.done)
		g.wg.Wait()
		g.s.Destroy()
	})
}

func (g *testGuest) proto(a netip.Addr) tcpip.NetworkProtocolNumber {
	if a.Is4() {
		return ipv4.ProtocolNumber
	}
	return ipv6.ProtocolNumber
}

func fullAddr(ap netip.AddrPort) tcpip.FullAddress {
	a := ap.Addr()
	if a.Is4() {
		return tcpip.FullAddress{NIC: 1, Addr: tcpip.AddrFrom4(a.As4()), Port: ap.Port()}
	}
	return tcpip.FullAddress{NIC: 1, Addr: tcpip.AddrFrom16(a.As16()), Port: ap.Port()}
}

// dialTCP connects from the guest.
func (g *testGuest) dialTCP(ap netip.AddrPort) (*gonet.TCPConn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return gonet.DialContextTCP(ctx, g.s, fullAddr(ap), g.proto(ap.Addr()))
}

func (g *testGuest) dialUDP(ap netip.AddrPort) (*gonet.UDPConn, error) {
	fa := fullAddr(ap)
	return gonet.DialUDP(g.s, nil, &fa, g.proto(ap.Addr()))
}

// resolver returns a Go resolver that sends the guest's queries to the
// gateway over the guest stack.
func (g *testGuest) resolver(useTCP bool) *net.Resolver {
	return &net.Resolver{
		PreferGo: true,
		Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
			ap := netip.AddrPortFrom(g.cfg.GatewayIPv4, 53)
			if useTCP || network == "tcp" {
				return gonet.DialContextTCP(ctx, g.s, fullAddr(ap), ipv4.ProtocolNumber)
			}
			return g.dialUDP(ap)
		},
	}
}

// lookup resolves name through the gateway and returns its addresses.
func (g *testGuest) lookup(name string) ([]netip.Addr, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return g.resolver(false).LookupNetIP(ctx, "ip", name)
}

// startUDPEcho runs a UDP echo server on addr and counts datagrams.
func startUDPEcho(t testing.TB, addr string) (*net.UDPConn, *atomic.Int64) {
	t.Helper()
	pc, err := net.ListenPacket("udp", addr)
	if err != nil {
		t.Skipf("cannot listen on %s: %v", addr, err)
	}
	uc := pc.(*net.UDPConn)
	var count atomic.Int64
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 65536)
		for {
			nr, from, err := uc.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			count.Add(1)
			uc.WriteToUDPAddrPort(buf[:nr], from)
		}
	}()
	t.Cleanup(func() { uc.Close(); <-done })
	return uc, &count
}

// testResolver is a real DNS server on 127.0.0.1 (UDP and TCP) answering a
// fixed zone with dnsmessage.
type testResolver struct {
	zone    map[string][]netip.Addr
	queries atomic.Int64
	asked   sync.Map // name -> true
	addr    netip.AddrPort
}

func startResolver(t testing.TB, zone map[string][]netip.Addr) *testResolver {
	t.Helper()
	r := &testResolver{zone: zone}
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r.addr = pc.LocalAddr().(*net.UDPAddr).AddrPort()
	ln, err := net.Listen("tcp", r.addr.String())
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		buf := make([]byte, 65536)
		for {
			nr, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			if resp := r.respond(buf[:nr]); resp != nil {
				pc.WriteTo(resp, from)
			}
		}
	}()
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				var lb [2]byte
				if _, err := io.ReadFull(c, lb[:]); err != nil {
					return
				}
				q := make([]byte, binary.BigEndian.Uint16(lb[:]))
				if _, err := io.ReadFull(c, q); err != nil {
					return
				}
				resp := r.respond(q)
				out := binary.BigEndian.AppendUint16(nil, uint16(len(resp)))
				c.Write(append(out, resp...))
			}()
		}
	}()
	t.Cleanup(func() {
		pc.Close()
		ln.Close()
		wg.Wait()
	})
	return r
}

func (r *testResolver) respond(q []byte) []byte {
	var m dnsmessage.Message
	if err := m.Unpack(q); err != nil || len(m.Questions) != 1 {
		return nil
	}
	r.queries.Add(1)
	qq := m.Questions[0]
	name := qq.Name.String()
	r.asked.Store(name, true)
	out := dnsmessage.Message{
		Header:    dnsmessage.Header{ID: m.ID, Response: true, Authoritative: true, RecursionDesired: m.RecursionDesired},
		Questions: m.Questions,
	}
	addrs, ok := r.zone[name]
	if !ok {
		out.RCode = dnsmessage.RCodeNameError
	}
	for _, a := range addrs {
		h := dnsmessage.ResourceHeader{Name: qq.Name, Class: dnsmessage.ClassINET, TTL: 300}
		switch {
		case a.Is4() && qq.Type == dnsmessage.TypeA:
			h.Type = dnsmessage.TypeA
			out.Answers = append(out.Answers, dnsmessage.Resource{Header: h, Body: &dnsmessage.AResource{A: a.As4()}})
		case a.Is6() && qq.Type == dnsmessage.TypeAAAA:
			h.Type = dnsmessage.TypeAAAA
			out.Answers = append(out.Answers, dnsmessage.Resource{Header: h, Body: &dnsmessage.AAAAResource{AAAA: a.As16()}})
		}
	}
	b, err := out.Pack()
	if err != nil {
		return nil
	}
	return b
}

func (r *testResolver) wasAsked(name string) bool {
	_, ok := r.asked.Load(name)
	return ok
}

// mapDialer maps addresses the guest dials (e.g. documentation-range
// "public" addresses) to loopback servers and records every attempt. It
// refuses anything else that is not loopback, so tests never leave the host.
type mapDialer struct {
	mu    sync.Mutex
	m     map[string]string
	tried []string
}

func (d *mapDialer) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	d.mu.Lock()
	d.tried = append(d.tried, network+" "+address)
	to, ok := d.m[address]
	d.mu.Unlock()
	if !ok {
		ap, err := netip.ParseAddrPort(address)
		if err != nil || !ap.Addr().IsLoopback() {
			return nil, fmt.Errorf("mapDialer: %s is not mapped to loopback", address)
		}
		to = address
	}
	var nd net.Dialer
	return nd.DialContext(ctx, network, to)
}

func (d *mapDialer) attempts() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]string(nil), d.tried...)
}

// roundTrip writes msg on c and reads the same number of bytes back.
func roundTrip(c net.Conn, msg []byte) ([]byte, error) {
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write(msg); err != nil {
		return nil, err
	}
	got := make([]byte, len(msg))
	_, err := io.ReadFull(c, got)
	return got, err
}

// fakeClock is a Clock whose Sleep advances time at once.
type fakeClock struct {
	mu    sync.Mutex
	now   time.Time
	slept time.Duration
}

func newFakeClock() *fakeClock { return &fakeClock{now: time.Unix(1_700_000_000, 0)} }

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Sleep(ctx context.Context, d time.Duration) error {
	c.mu.Lock()
	c.now = c.now.Add(d)
	c.slept += d
	c.mu.Unlock()
	return ctx.Err()
}

func (c *fakeClock) total() time.Duration {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.slept
}

// partialChecksum rewrites a TCP or UDP frame's checksum to the pseudo-header
// sum, as a guest with VIRTIO_NET_F_CSUM sends it, and returns the offload
// fields the device would pass.
func partialChecksum(f []byte) (Offload, bool) {
	eth := header.Ethernet(f)
	p := f[header.EthernetMinimumSize:]
	var start int
	var proto tcpip.TransportProtocolNumber
	var src, dst tcpip.Address
	var l4len int
	switch eth.Type() {
	case header.IPv4ProtocolNumber:
		ip := header.IPv4(p)
		if !ip.IsValid(len(p)) || ip.FragmentOffset() != 0 || ip.Flags()&header.IPv4FlagMoreFragments != 0 {
			return Offload{}, false
		}
		start, proto = int(ip.HeaderLength()), ip.TransportProtocol()
		src, dst, l4len = ip.SourceAddress(), ip.DestinationAddress(), int(ip.TotalLength())-int(ip.HeaderLength())
	case header.IPv6ProtocolNumber:
		ip := header.IPv6(p)
		if !ip.IsValid(len(p)) {
			return Offload{}, false
		}
		start, proto = header.IPv6MinimumSize, ip.TransportProtocol()
		src, dst, l4len = ip.SourceAddress(), ip.DestinationAddress(), int(ip.PayloadLength())
	default:
		return Offload{}, false
	}
	var off int
	switch proto {
	case header.TCPProtocolNumber:
		off = 16
	case header.UDPProtocolNumber:
		off = 6
	default:
		return Offload{}, false
	}
	start += header.EthernetMinimumSize
	if start+off+2 > len(f) {
		return Offload{}, false
	}
	binary.BigEndian.PutUint16(f[start+off:], header.PseudoHeaderChecksum(proto, src, dst, uint16(l4len)))
	return Offload{NeedsChecksum: true, ChecksumStart: uint16(start), ChecksumOffset: uint16(off)}, true
}

// gsoWriter is the test guest's device with host→guest offload negotiated:
// it completes checksums and hands large segments to the guest stack whole,
// as a guest with VIRTIO_NET_F_GUEST_TSO4/6 takes them.
type gsoWriter struct {
	g         *testGuest
	mtu       int
	oversized atomic.Int64
	offloaded atomic.Int64
}

func (w *gsoWriter) WriteFrame(f []byte) error { return w.queue(append([]byte(nil), f...)) }

func (w *gsoWriter) WriteFrameOffload(f []byte, o Offload) error {
	c := append([]byte(nil), f...)
	w.offloaded.Add(1)
	if o.NeedsChecksum {
		if err := completeChecksum(c, int(o.ChecksumStart), int(o.ChecksumOffset)); err != nil {
			return err
		}
	}
	if len(c) > w.mtu+header.EthernetMinimumSize {
		if !o.Segmented || o.SegmentSize == 0 {
			return fmt.Errorf("oversized frame without GSO metadata: %+v", o)
		}
		w.oversized.Add(1)
	}
	return w.queue(c)
}

func (w *gsoWriter) queue(f []byte) error {
	select {
	case w.g.toGst <- f:
		return nil
	default:
		return errors.New("guest ring full")
	}
}

// enableGSO switches the network's output to a GSO-capable writer.
func (g *testGuest) enableGSO() *gsoWriter {
	w := &gsoWriter{g: g, mtu: g.cfg.MTU}
	g.n.SetOutput(w)
	return w
}
