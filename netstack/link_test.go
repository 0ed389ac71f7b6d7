package netstack

import (
	"bytes"
	"errors"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/net/icmp"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"

	"github.com/gosandbox/sandbox/netstack/netstacktest"
)

// frameNet is a Network whose host→guest frames land in a channel, for tests
// that speak raw frames.
func frameNet(t *testing.T, cfg Config) (*Network, chan []byte) {
	t.Helper()
	out := make(chan []byte, 64)
	cfg.Output = FrameWriterFunc(func(f []byte) error {
		select {
		case out <- append([]byte(nil), f...):
		default:
		}
		return nil
	})
	if cfg.Name == "" {
		cfg.Name = t.Name()
	}
	cfg.DNS.ResolvConf = "/nonexistent"
	n, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close() })
	return n, out
}

func ethFrame(src, dst tcpip.LinkAddress, typ tcpip.NetworkProtocolNumber, payload []byte) []byte {
	f := make([]byte, header.EthernetMinimumSize+len(payload))
	header.Ethernet(f).Encode(&header.EthernetFields{SrcAddr: src, DstAddr: dst, Type: typ})
	copy(f[header.EthernetMinimumSize:], payload)
	return f
}

func arpRequest(n *Network, sender, target netip.Addr) []byte {
	p := make([]byte, header.ARPSize)
	a := header.ARP(p)
	a.SetIPv4OverEthernet()
	a.SetOp(header.ARPRequest)
	copy(a.HardwareAddressSender(), n.guestMAC)
	s4, t4 := sender.As4(), target.As4()
	copy(a.ProtocolAddressSender(), s4[:])
	copy(a.ProtocolAddressTarget(), t4[:])
	return ethFrame(n.guestMAC, header.EthernetBroadcastAddress, header.ARPProtocolNumber, p)
}

func neighborSolicit(n *Network, src, target netip.Addr, unicast bool) []byte {
	icmpLen := header.ICMPv6NeighborSolicitMinimumSize
	if !src.IsUnspecified() {
		icmpLen += 8 // source link-layer address option
	}
	p := make([]byte, header.IPv6MinimumSize+icmpLen)
	srcA := tcpip.AddrFrom16(src.As16())
	dstA := header.SolicitedNodeAddr(tcpip.AddrFrom16(target.As16()))
	dstMAC := header.EthernetAddressFromMulticastIPv6Address(dstA)
	if unicast { // a reachability probe
		dstA, dstMAC = tcpip.AddrFrom16(target.As16()), n.gwMAC
	}
	header.IPv6(p).Encode(&header.IPv6Fields{
		PayloadLength: uint16(icmpLen), TransportProtocol: header.ICMPv6ProtocolNumber,
		HopLimit: header.NDPHopLimit, SrcAddr: srcA, DstAddr: dstA,
	})
	ic := header.ICMPv6(p[header.IPv6MinimumSize:])
	ic.SetType(header.ICMPv6NeighborSolicit)
	header.NDPNeighborSolicit(ic.MessageBody()).SetTargetAddress(tcpip.AddrFrom16(target.As16()))
	if !src.IsUnspecified() {
		opt := ic[header.ICMPv6NeighborSolicitMinimumSize:]
		opt[0], opt[1] = 1, 1 // type: source link-layer address, length: 8 bytes
		copy(opt[2:], n.guestMAC)
	}
	ic.SetChecksum(header.ICMPv6Checksum(header.ICMPv6ChecksumParams{Header: ic, Src: srcA, Dst: dstA}))
	return ethFrame(n.guestMAC, dstMAC, header.IPv6ProtocolNumber, p)
}

func echoRequestV4(n *Network, dst netip.Addr, id, seq uint16, data []byte) []byte {
	ipLen := header.IPv4MinimumSize + header.ICMPv4MinimumSize + len(data)
	p := make([]byte, ipLen)
	ip := header.IPv4(p)
	ip.Encode(&header.IPv4Fields{TotalLength: uint16(ipLen), TTL: 64, Protocol: uint8(header.ICMPv4ProtocolNumber),
		SrcAddr: tcpip.AddrFrom4(n.g4.As4()), DstAddr: tcpip.AddrFrom4(dst.As4())})
	ip.SetChecksum(^ip.CalculateChecksum())
	ic := header.ICMPv4(p[header.IPv4MinimumSize:])
	ic.SetType(header.ICMPv4Echo)
	ic.SetIdent(id)
	ic.SetSequence(seq)
	copy(ic.Payload(), data)
	ic.SetChecksum(^checksum.Checksum(ic, 0))
	return ethFrame(n.guestMAC, n.gwMAC, header.IPv4ProtocolNumber, p)
}

func echoRequestV6(n *Network, dst netip.Addr, id, seq uint16, data []byte) []byte {
	icmpLen := header.ICMPv6EchoMinimumSize + len(data)
	p := make([]byte, header.IPv6MinimumSize+icmpLen)
	srcA, dstA := tcpip.AddrFrom16(n.g6.As16()), tcpip.AddrFrom16(dst.As16())
	header.IPv6(p).Encode(&header.IPv6Fields{PayloadLength: uint16(icmpLen), TransportProtocol: header.ICMPv6ProtocolNumber,
		HopLimit: 64, SrcAddr: srcA, DstAddr: dstA})
	ic := header.ICMPv6(p[header.IPv6MinimumSize:])
	ic.SetType(header.ICMPv6EchoRequest)
	ic.SetIdent(id)
	ic.SetSequence(seq)
	copy(ic[header.ICMPv6EchoMinimumSize:], data)
	ic.SetChecksum(header.ICMPv6Checksum(header.ICMPv6ChecksumParams{Header: ic, Src: srcA, Dst: dstA}))
	return ethFrame(n.guestMAC, n.gwMAC, header.IPv6ProtocolNumber, p)
}

// next returns the next frame of the given EtherType, or nil after a while.
func next(out chan []byte, typ tcpip.NetworkProtocolNumber) []byte {
	deadline := time.After(2 * time.Second)
	for {
		select {
		case f := <-out:
			if header.Ethernet(f).Type() == typ {
				return f
			}
		case <-deadline:
			return nil
		}
	}
}

func TestARPAnswersOnlyForGateway(t *testing.T) {
	n, out := frameNet(t, Config{})
	if err := n.DeliverFrame(arpRequest(n, n.g4, n.g4)); err != nil {
		t.Fatal(err)
	}
	if err := n.DeliverFrame(arpRequest(n, n.g4, netip.MustParseAddr("100.96.0.77"))); err != nil {
		t.Fatal(err)
	}
	if err := n.DeliverFrame(arpRequest(n, n.g4, n.gw4)); err != nil {
		t.Fatal(err)
	}
	f := next(out, header.ARPProtocolNumber)
	if f == nil {
		t.Fatal("no ARP reply for the gateway")
	}
	a := header.ARP(f[header.EthernetMinimumSize:])
	if a.Op() != header.ARPReply || netip.AddrFrom4([4]byte(a.ProtocolAddressSender())) != n.gw4 ||
		tcpip.LinkAddress(a.HardwareAddressSender()) != n.gwMAC {
		t.Errorf("ARP reply: op %v sender %v/%v; want reply from gateway %v/%v", a.Op(),
			a.ProtocolAddressSender(), tcpip.LinkAddress(a.HardwareAddressSender()), n.gw4, n.gwMAC)
	}
	if f := next(out, header.ARPProtocolNumber); f != nil {
		t.Errorf("a second ARP reply (for a non-gateway address): %x", f)
	}
}

func TestNeighborSolicitation(t *testing.T) {
	n, out := frameNet(t, Config{})
	// Duplicate address detection of the guest's own address must not be
	// answered, or the guest would give its address up.
	if err := n.DeliverFrame(neighborSolicit(n, netip.IPv6Unspecified(), n.g6, false)); err != nil {
		t.Fatal(err)
	}
	// Nor may a solicitation for any other address on the link: the stack
	// runs in spoofing mode and would claim every address.
	if err := n.DeliverFrame(neighborSolicit(n, n.g6, nthAddr(n.lease.IPv6, 5), true)); err != nil {
		t.Fatal(err)
	}
	if err := n.DeliverFrame(neighborSolicit(n, n.g6, n.gw6, false)); err != nil {
		t.Fatal(err)
	}
	for {
		f := next(out, header.IPv6ProtocolNumber)
		if f == nil {
			t.Fatal("no neighbor advertisement for the gateway")
		}
		ip := header.IPv6(f[header.EthernetMinimumSize:])
		ic := header.ICMPv6(ip.Payload())
		if ip.TransportProtocol() != header.ICMPv6ProtocolNumber || ic.Type() != header.ICMPv6NeighborAdvert {
			continue
		}
		target := netip.AddrFrom16(header.NDPNeighborAdvert(ic.MessageBody()).TargetAddress().As16())
		if target != n.gw6 {
			t.Fatalf("neighbor advertisement for %v, want only %v", target, n.gw6)
		}
		return
	}
}

func TestDeliverFrameValidation(t *testing.T) {
	n, _ := frameNet(t, Config{})
	for name, f := range map[string][]byte{
		"short":      make([]byte, 10),
		"too long":   make([]byte, n.mtu+header.EthernetMinimumSize+1),
		"wrong MAC":  ethFrame("\x02\x00\x00\x00\x00\x09", n.gwMAC, header.IPv4ProtocolNumber, make([]byte, 40)),
		"nil":        nil,
		"header-len": make([]byte, header.EthernetMinimumSize),
	} {
		if err := n.DeliverFrame(f); !errors.Is(err, ErrFrameInvalid) {
			t.Errorf("%s: DeliverFrame = %v, want ErrFrameInvalid", name, err)
		}
	}
	before := n.Stats().FramesDropped
	// A spoofed IPv4 source from the guest's MAC is dropped silently.
	spoof := echoRequestV4(n, n.gw4, 1, 1, nil)
	ip := header.IPv4(spoof[header.EthernetMinimumSize:])
	ip.SetSourceAddress(tcpip.AddrFrom4([4]byte{10, 9, 9, 9}))
	if err := n.DeliverFrame(spoof); err != nil {
		t.Errorf("spoofed frame: %v", err)
	}
	if n.Stats().FramesDropped != before+1 {
		t.Errorf("FramesDropped = %d, want %d", n.Stats().FramesDropped, before+1)
	}
}

func TestICMPEcho(t *testing.T) {
	t.Run("denied", func(t *testing.T) {
		n, _ := frameNet(t, Config{})
		if err := n.DeliverFrame(echoRequestV4(n, netip.MustParseAddr("127.0.0.1"), 7, 1, []byte("ping"))); err != nil {
			t.Fatal(err)
		}
		if s := n.Stats(); s.FlowsDenied != 1 || s.FlowsAllowed != 0 {
			t.Errorf("Stats() denied %d allowed %d, want 1 and 0", s.FlowsDenied, s.FlowsAllowed)
		}
	})
	t.Run("gateway answers itself", func(t *testing.T) {
		n, out := frameNet(t, Config{})
		n.DeliverFrame(echoRequestV4(n, n.gw4, 7, 2, []byte("gw")))
		checkEchoReply(t, next(out, header.IPv4ProtocolNumber), n.gw4, 7, 2, "gw")
	})
	t.Run("relayed through an unprivileged socket", func(t *testing.T) {
		c, err := icmp.ListenPacket("udp4", "127.0.0.1")
		if err != nil {
			t.Skipf("unprivileged ICMP sockets not allowed here (net.ipv4.ping_group_range): %v", err)
		}
		c.Close()
		n, out := frameNet(t, Config{Rules: mustRules(t, "allow@loopback:icmp")})
		lo := netip.MustParseAddr("127.0.0.1")
		if err := n.DeliverFrame(echoRequestV4(n, lo, 7, 3, []byte("relay"))); err != nil {
			t.Fatal(err)
		}
		checkEchoReply(t, next(out, header.IPv4ProtocolNumber), lo, 7, 3, "relay")

		lo6 := netip.IPv6Loopback()
		if err := n.DeliverFrame(echoRequestV6(n, lo6, 9, 4, []byte("relay6"))); err != nil {
			t.Fatal(err)
		}
		for {
			f := next(out, header.IPv6ProtocolNumber)
			if f == nil {
				t.Fatal("no IPv6 echo reply")
			}
			ip := header.IPv6(f[header.EthernetMinimumSize:])
			ic := header.ICMPv6(ip.Payload())
			if ip.TransportProtocol() != header.ICMPv6ProtocolNumber || ic.Type() != header.ICMPv6EchoReply {
				continue
			}
			if netip.AddrFrom16(ip.SourceAddress().As16()) != lo6 || ic.Ident() != 9 || ic.Sequence() != 4 ||
				string(ic[header.ICMPv6EchoMinimumSize:]) != "relay6" {
				t.Errorf("IPv6 echo reply from %v id %d seq %d data %q", ip.SourceAddress(), ic.Ident(), ic.Sequence(), ic[header.ICMPv6EchoMinimumSize:])
			}
			if want := header.ICMPv6Checksum(header.ICMPv6ChecksumParams{Header: ic, Src: ip.SourceAddress(), Dst: ip.DestinationAddress()}); ic.Checksum() != want {
				t.Errorf("IPv6 echo reply checksum %#x, want %#x", ic.Checksum(), want)
			}
			return
		}
	})
}

func checkEchoReply(t *testing.T, f []byte, from netip.Addr, id, seq uint16, data string) {
	t.Helper()
	if f == nil {
		t.Fatal("no echo reply")
	}
	ip := header.IPv4(f[header.EthernetMinimumSize:])
	if !ip.IsValid(len(ip)) || !ip.IsChecksumValid() {
		t.Fatal("reply has an invalid IPv4 header")
	}
	ic := header.ICMPv4(ip.Payload())
	if got := netip.AddrFrom4(ip.SourceAddress().As4()); got != from {
		t.Errorf("reply from %v, want %v", got, from)
	}
	if ic.Type() != header.ICMPv4EchoReply || ic.Ident() != id || ic.Sequence() != seq || string(ic.Payload()) != data {
		t.Errorf("reply type %v id %d seq %d data %q; want echo reply %d %d %q", ic.Type(), ic.Ident(), ic.Sequence(), ic.Payload(), id, seq, data)
	}
	if checksum.Checksum(ic, 0) != 0xffff {
		t.Error("reply has a bad ICMP checksum")
	}
}

func TestChecksumOffload(t *testing.T) {
	echo := netstacktest.StartEcho(t, "127.0.0.1:0", false)
	echo6 := netstacktest.StartEcho(t, "[::1]:0", false)
	n, g := newTestNetwork(t, Config{Rules: mustRules(t, "allow@host")})
	g.offload.Store(true)
	for _, dst := range []netip.AddrPort{
		netip.AddrPortFrom(n.Guest().GatewayIPv4, echo.Port()),
		netip.AddrPortFrom(n.Guest().GatewayIPv6, echo6.Port()),
	} {
		c, err := g.dialTCP(dst)
		if err != nil {
			t.Fatalf("dial %v with offloaded checksums: %v", dst, err)
		}
		msg := make([]byte, 100000)
		for i := range msg {
			msg[i] = byte(i * 7)
		}
		got, err := roundTrip(c, msg)
		c.Close()
		if err != nil || string(got) != string(msg) {
			t.Fatalf("round trip to %v with offloaded checksums: %v", dst, err)
		}
	}
}

func TestOffloadValidation(t *testing.T) {
	n, _ := frameNet(t, Config{MTU: 1500})
	big := echoRequestV4(n, n.gw4, 1, 1, make([]byte, 3000))
	if err := n.DeliverFrame(big); !errors.Is(err, ErrFrameInvalid) {
		t.Errorf("oversized frame without GSO: %v, want ErrFrameInvalid", err)
	}
	if err := n.DeliverFrameOffload(big, Offload{Segmented: true}); err != nil {
		t.Errorf("oversized frame marked segmented: %v", err)
	}
	for _, o := range []Offload{
		{NeedsChecksum: true, ChecksumStart: 2, ChecksumOffset: 0},
		{NeedsChecksum: true, ChecksumStart: 20, ChecksumOffset: 60000},
		{NeedsChecksum: true, ChecksumStart: 65535, ChecksumOffset: 65535},
	} {
		if err := n.DeliverFrameOffload(echoRequestV4(n, n.gw4, 1, 1, nil), o); !errors.Is(err, ErrFrameInvalid) {
			t.Errorf("DeliverFrameOffload(%+v) = %v, want ErrFrameInvalid", o, err)
		}
	}
}

func TestHostToGuestGSO(t *testing.T) {
	n, g := newTestNetwork(t, Config{MTU: 1500})
	w := g.enableGSO()
	ln := guestSink(t, g, netip.AddrPortFrom(n.Guest().IPv4.Addr(), 7001))
	p, err := n.Publish(PortMapping{GuestPort: 7001})
	if err != nil {
		t.Fatal(err)
	}
	c, err := net.Dial("tcp", p.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	msg := make([]byte, 4<<20)
	for i := range msg {
		msg[i] = byte(i * 13)
	}
	c.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := c.Write(msg); err != nil {
		t.Fatal(err)
	}
	c.Close()
	select {
	case got := <-ln:
		if !bytes.Equal(got, msg) {
			t.Fatalf("guest received %d bytes, not the %d sent", len(got), len(msg))
		}
	case <-time.After(30 * time.Second):
		t.Fatal("guest did not receive the stream")
	}
	if w.oversized.Load() == 0 {
		t.Errorf("no segment above the %d-byte MTU was handed to the GSO writer (offloaded frames: %d)", 1500, w.offloaded.Load())
	}
}

// guestSink accepts one connection in the guest and returns all it reads.
func guestSink(t *testing.T, g *testGuest, ap netip.AddrPort) chan []byte {
	t.Helper()
	ln, err := gonet.ListenTCP(g.s, fullAddr(ap), g.proto(ap.Addr()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	out := make(chan []byte, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		b, _ := io.ReadAll(c)
		out <- b
	}()
	return out
}

func TestGuestToHostTSO(t *testing.T) {
	sink := netstacktest.StartEcho(t, "127.0.0.1:0", true)
	n, g := newTestNetwork(t, Config{MTU: 1500, Rules: mustRules(t, "allow@host")})
	g.useGuestTSO()
	c, err := g.dialTCP(netip.AddrPortFrom(n.Guest().GatewayIPv4, sink.Port()))
	if err != nil {
		t.Fatal(err)
	}
	msg := make([]byte, 4<<20)
	c.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := c.Write(msg); err != nil {
		t.Fatal(err)
	}
	c.Close()
	waitFor(t, "the sink to receive everything", func() bool { return sink.Received.Load() == int64(len(msg)) })
	if g.oversized.Load() == 0 {
		t.Error("the guest sent no segment above the MTU; TSO path not exercised")
	}
}
