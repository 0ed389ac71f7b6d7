package net

import (
	"encoding/binary"
	"fmt"

	"github.com/gosandbox/sandbox/netstack"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// segmentTCP cuts a large TCP segment (Ethernet, IPv4 or IPv6 without
// extension headers, TCP) into frames carrying at most o.SegmentSize bytes
// of payload each, with complete IP and TCP checksums, and calls emit for
// each. It is the software fallback for a guest that did not negotiate
// GUEST_TSO4/6 (gVisor offers no segmentation function to reuse: its own
// GSO lives inside its link endpoints). The frames passed to emit share
// one buffer.
func segmentTCP(frame []byte, o netstack.Offload, emit func([]byte) error) error {
	bad := func(format string, args ...any) error {
		return &PacketError{Reason: "host TCP segment: " + fmt.Sprintf(format, args...)}
	}
	l3 := EthernetHeaderLen
	l4 := int(o.ChecksumStart)
	mss := int(o.SegmentSize)
	if mss == 0 {
		return bad("segment size 0")
	}
	if l4+20 > len(frame) {
		return bad("TCP header at %d beyond a %d-byte frame", l4, len(frame))
	}
	tcpLen := int(frame[l4+12]>>4) * 4
	end := l4 + tcpLen
	if tcpLen < 20 || end > len(frame) {
		return bad("TCP header length %d at %d in a %d-byte frame", tcpLen, l4, len(frame))
	}
	var src, dst tcpip.Address
	v4 := false
	switch binary.BigEndian.Uint16(frame[12:]) {
	case etherTypeIPv4:
		ip := header.IPv4(frame[l3:])
		if !ip.IsValid(len(frame)-l3) || int(ip.HeaderLength())+l3 != l4 || ip.TransportProtocol() != header.TCPProtocolNumber {
			return bad("not IPv4 with TCP at %d", l4)
		}
		src, dst, v4 = ip.SourceAddress(), ip.DestinationAddress(), true
	case etherTypeIPv6:
		if l3+header.IPv6MinimumSize != l4 {
			return bad("IPv6 header ends at %d, TCP at %d", l3+header.IPv6MinimumSize, l4)
		}
		ip := header.IPv6(frame[l3:])
		if ip.TransportProtocol() != header.TCPProtocolNumber {
			return bad("IPv6 next header %d is not TCP", ip.NextHeader())
		}
		src, dst = ip.SourceAddress(), ip.DestinationAddress()
	default:
		return bad("EtherType %#04x is neither IPv4 nor IPv6", binary.BigEndian.Uint16(frame[12:]))
	}
	payload := frame[end:]
	seq := binary.BigEndian.Uint32(frame[l4+4:])
	flags := frame[l4+13]
	var id uint16
	if v4 {
		id = binary.BigEndian.Uint16(frame[l3+4:])
	}
	seg := make([]byte, 0, end+min(mss, len(payload)))
	for i, off := 0, 0; off < len(payload) || i == 0; i++ {
		n := min(mss, len(payload)-off)
		seg = append(append(seg[:0], frame[:end]...), payload[off:off+n]...)
		f := flags
		if off+n < len(payload) {
			f &^= uint8(header.TCPFlagFin | header.TCPFlagPsh)
		}
		if i > 0 {
			f &^= uint8(header.TCPFlagCwr)
		}
		tcp := header.TCP(seg[l4:])
		tcp.SetSequenceNumber(seq + uint32(off))
		seg[l4+13] = f
		tcp.SetChecksum(0)
		segLen := len(seg) - l4
		if v4 {
			ip := header.IPv4(seg[l3:])
			ip.SetTotalLength(uint16(len(seg) - l3))
			ip.SetID(id + uint16(i))
			ip.SetChecksum(0)
			ip.SetChecksum(^ip.CalculateChecksum())
		} else {
			header.IPv6(seg[l3:]).SetPayloadLength(uint16(segLen))
		}
		sum := header.PseudoHeaderChecksum(header.TCPProtocolNumber, src, dst, uint16(segLen))
		tcp.SetChecksum(^checksum.Checksum(seg[l4:], sum))
		if err := emit(seg); err != nil {
			return err
		}
		off += n
	}
	return nil
}
