package net_test

import (
	"testing"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

var (
	src4 = tcpip.AddrFrom4([4]byte{100, 96, 0, 1})
	dst4 = tcpip.AddrFrom4([4]byte{100, 96, 0, 2})
	src6 = tcpip.AddrFrom16([16]byte{0: 0xfd, 1: 0x11, 15: 1})
	dst6 = tcpip.AddrFrom16([16]byte{0: 0xfd, 1: 0x11, 15: 2})
)

const segSeq = 0xfffff000 // wraps within a large segment

// tcpSegment builds an Ethernet/IP/TCP frame with n payload bytes whose
// TCP checksum field holds the pseudo-header sum (a partial checksum, as
// the netstack hands large segments to a GSO writer).
func tcpSegment(t testing.TB, v6 bool, n int) []byte {
	t.Helper()
	l3 := 14
	ipLen := header.IPv4MinimumSize
	et := uint16(0x0800)
	if v6 {
		ipLen, et = header.IPv6MinimumSize, 0x86dd
	}
	l4 := l3 + ipLen
	f := ethFrame(guestMAC, gwMAC, et, l4+header.TCPMinimumSize+n)
	src, dst := src4, dst4
	if v6 {
		src, dst = src6, dst6
		header.IPv6(f[l3:]).Encode(&header.IPv6Fields{
			PayloadLength: uint16(header.TCPMinimumSize + n), TransportProtocol: header.TCPProtocolNumber,
			HopLimit: 64, SrcAddr: src, DstAddr: dst,
		})
	} else {
		ip := header.IPv4(f[l3:])
		ip.Encode(&header.IPv4Fields{
			TotalLength: uint16(ipLen + header.TCPMinimumSize + n), ID: 0xfffe, TTL: 64,
			Protocol: uint8(header.TCPProtocolNumber), SrcAddr: src, DstAddr: dst,
		})
		ip.SetChecksum(^ip.CalculateChecksum())
	}
	tcp := header.TCP(f[l4:])
	tcp.Encode(&header.TCPFields{
		SrcPort: 80, DstPort: 40000, SeqNum: segSeq, AckNum: 7, DataOffset: header.TCPMinimumSize,
		Flags: header.TCPFlagAck | header.TCPFlagPsh | header.TCPFlagFin, WindowSize: 1000,
	})
	tcp.SetChecksum(header.PseudoHeaderChecksum(header.TCPProtocolNumber, src, dst, uint16(header.TCPMinimumSize+n)))
	return f
}

// checkSegment verifies a frame the device cut (or completed): valid IP
// and TCP checksums, lengths, at most mss payload bytes, sequence number
// continuing. It returns the payload.
func checkSegment(t testing.TB, f []byte, v6 bool, mss int) []byte {
	t.Helper()
	l3 := 14
	var l4 int
	var src, dst tcpip.Address
	if v6 {
		ip := header.IPv6(f[l3:])
		if int(ip.PayloadLength()) != len(f)-l3-header.IPv6MinimumSize {
			t.Fatalf("IPv6 payload length %d in a %d-byte frame", ip.PayloadLength(), len(f))
		}
		l4, src, dst = l3+header.IPv6MinimumSize, ip.SourceAddress(), ip.DestinationAddress()
	} else {
		ip := header.IPv4(f[l3:])
		if !ip.IsChecksumValid() || int(ip.TotalLength()) != len(f)-l3 {
			t.Fatalf("IPv4 header: checksum valid %v, total length %d in a %d-byte frame", ip.IsChecksumValid(), ip.TotalLength(), len(f))
		}
		l4, src, dst = l3+int(ip.HeaderLength()), ip.SourceAddress(), ip.DestinationAddress()
	}
	tcp := header.TCP(f[l4:])
	payload := tcp.Payload()
	if len(payload) > mss {
		t.Fatalf("segment payload %d over MSS %d", len(payload), mss)
	}
	sum := header.PseudoHeaderChecksum(header.TCPProtocolNumber, src, dst, uint16(len(f)-l4))
	if c := checksum.Checksum(f[l4:], sum); c != 0xffff {
		t.Fatalf("TCP checksum invalid (sum %#x)", c)
	}
	return payload
}
