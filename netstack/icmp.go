package netstack

import (
	"encoding/binary"
	"net"
	"net/netip"
	"time"

	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv4"
	"golang.org/x/net/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

const (
	echoTimeout     = 5 * time.Second
	maxEchoInFlight = 64
)

// relayEcho answers a guest ICMP echo request to dst by sending one from an
// unprivileged host ICMP socket (SOCK_DGRAM, IPPROTO_ICMP; the host must allow
// the process's group in net.ipv4.ping_group_range). msg is the ICMP message
// (type, code, checksum, id, seq, data); it is copied. Denied echoes and
// echoes the host cannot send are dropped, as a firewall would.
func (n *Network) relayEcho(dst netip.Addr, msg []byte) {
	if len(msg) < 8 {
		return
	}
	dst = dst.Unmap()
	if _, ok := n.egressTarget(ICMP, dst, 0); !ok {
		return
	}
	if !n.conns.acquire() {
		return
	}
	id := binary.BigEndian.Uint16(msg[4:6])
	seq := binary.BigEndian.Uint16(msg[6:8])
	data := append([]byte(nil), msg[8:]...)
	if !n.goTracked(func() {
		defer n.conns.release()
		reply, ok := n.echo(dst, seq, data)
		if ok {
			n.sendEchoReply(dst, id, seq, reply)
		}
	}) {
		n.conns.release()
	}
}

// echo sends an echo request from the host and returns the reply's data.
func (n *Network) echo(dst netip.Addr, seq uint16, data []byte) ([]byte, bool) {
	network, laddr := "udp4", "0.0.0.0"
	var typ, replyType icmp.Type = ipv4.ICMPTypeEcho, ipv4.ICMPTypeEchoReply
	proto := 1
	if dst.Is6() {
		network, laddr = "udp6", "::"
		typ, replyType = ipv6.ICMPTypeEchoRequest, ipv6.ICMPTypeEchoReply
		proto = 58
	}
	c, err := icmp.ListenPacket(network, laddr)
	if err != nil {
		n.log.Debug("icmp socket unavailable (see net.ipv4.ping_group_range)", "err", err)
		return nil, false
	}
	stop := n.closeOnDone(c)
	defer stop()
	defer c.Close()
	// The kernel rewrites the identifier to the socket's; seq is kept.
	wb, err := (&icmp.Message{Type: typ, Body: &icmp.Echo{ID: 0, Seq: int(seq), Data: data}}).Marshal(nil)
	if err != nil {
		return nil, false
	}
	if _, err := c.WriteTo(wb, &net.UDPAddr{IP: dst.AsSlice()}); err != nil {
		return nil, false
	}
	c.SetReadDeadline(time.Now().Add(echoTimeout))
	rb := make([]byte, 65536)
	for {
		nr, _, err := c.ReadFrom(rb)
		if err != nil {
			return nil, false
		}
		m, err := icmp.ParseMessage(proto, rb[:nr])
		if err != nil || m.Type != replyType {
			continue
		}
		if e, ok := m.Body.(*icmp.Echo); ok && e.Seq == int(seq) {
			return e.Data, true
		}
	}
}

// sendEchoReply builds an echo reply frame from src to the guest.
func (n *Network) sendEchoReply(src netip.Addr, id, seq uint16, data []byte) {
	if src.Is4() {
		ipLen := header.IPv4MinimumSize + header.ICMPv4MinimumSize + len(data)
		if ipLen > n.mtu {
			return
		}
		frame := make([]byte, header.EthernetMinimumSize+ipLen)
		header.Ethernet(frame).Encode(&header.EthernetFields{SrcAddr: n.gwMAC, DstAddr: n.guestMAC, Type: header.IPv4ProtocolNumber})
		ip := header.IPv4(frame[header.EthernetMinimumSize:])
		ip.Encode(&header.IPv4Fields{
			TotalLength: uint16(ipLen), TTL: 64, Protocol: uint8(header.ICMPv4ProtocolNumber),
			SrcAddr: tcpip.AddrFrom4(src.As4()), DstAddr: tcpip.AddrFrom4(n.g4.As4()),
		})
		ip.SetChecksum(^ip.CalculateChecksum())
		ic := header.ICMPv4(ip[header.IPv4MinimumSize:])
		ic.SetType(header.ICMPv4EchoReply)
		ic.SetIdent(id)
		ic.SetSequence(seq)
		copy(ic.Payload(), data)
		ic.SetChecksum(0)
		ic.SetChecksum(^checksum.Checksum(ic, 0))
		n.output(frame, nil)
		return
	}
	ipLen := header.IPv6MinimumSize + header.ICMPv6EchoMinimumSize + len(data)
	if ipLen > n.mtu {
		return
	}
	frame := make([]byte, header.EthernetMinimumSize+ipLen)
	header.Ethernet(frame).Encode(&header.EthernetFields{SrcAddr: n.gwMAC, DstAddr: n.guestMAC, Type: header.IPv6ProtocolNumber})
	ip := header.IPv6(frame[header.EthernetMinimumSize:])
	srcA, dstA := tcpip.AddrFrom16(src.As16()), tcpip.AddrFrom16(n.g6.As16())
	ip.Encode(&header.IPv6Fields{
		PayloadLength: uint16(ipLen - header.IPv6MinimumSize), TransportProtocol: header.ICMPv6ProtocolNumber,
		HopLimit: 64, SrcAddr: srcA, DstAddr: dstA,
	})
	ic := header.ICMPv6(ip[header.IPv6MinimumSize:])
	ic.SetType(header.ICMPv6EchoReply)
	ic.SetIdent(id)
	ic.SetSequence(seq)
	copy(ic.MessageBody()[4:], data)
	ic.SetChecksum(0)
	ic.SetChecksum(header.ICMPv6Checksum(header.ICMPv6ChecksumParams{Header: ic, Src: srcA, Dst: dstA}))
	n.output(frame, nil)
}
