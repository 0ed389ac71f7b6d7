package net

import (
	"encoding/binary"
	"fmt"

	"github.com/gosandbox/sandbox/netstack"
)

// Header flag bits (struct virtio_net_hdr.flags).
const (
	HdrFNeedsCsum = 1 // VIRTIO_NET_HDR_F_NEEDS_CSUM
	HdrFDataValid = 2 // VIRTIO_NET_HDR_F_DATA_VALID
	HdrFRSCInfo   = 4 // VIRTIO_NET_HDR_F_RSC_INFO
)

// Header gso_type values (struct virtio_net_hdr.gso_type).
const (
	GSONone  = 0    // VIRTIO_NET_HDR_GSO_NONE
	GSOTCPv4 = 1    // VIRTIO_NET_HDR_GSO_TCPV4
	GSOUDP   = 3    // VIRTIO_NET_HDR_GSO_UDP
	GSOTCPv6 = 4    // VIRTIO_NET_HDR_GSO_TCPV6
	GSOUDPL4 = 5    // VIRTIO_NET_HDR_GSO_UDP_L4
	GSOECN   = 0x80 // VIRTIO_NET_HDR_GSO_ECN
)

const (
	// HeaderLen is the size of struct virtio_net_hdr with
	// VIRTIO_F_VERSION_1 or VIRTIO_NET_F_MRG_RXBUF (num_buffers included).
	HeaderLen = 12
	// LegacyHeaderLen is its size without either (no num_buffers).
	LegacyHeaderLen = 10
	// EthernetHeaderLen is the size of an Ethernet header without VLAN tag.
	EthernetHeaderLen = 14
	// MaxFrameLen is the largest Ethernet frame (without the virtio-net
	// header) the device moves in either direction: an IP packet of at
	// most 65535 bytes plus its Ethernet header.
	MaxFrameLen = 65535 + EthernetHeaderLen
)

const (
	etherTypeIPv4 = 0x0800
	etherTypeIPv6 = 0x86dd
)

// Header is struct virtio_net_hdr (VIRTIO 1.2 section 5.1.6), decoded.
type Header struct {
	Flags      uint8
	GSOType    uint8
	HdrLen     uint16 // length of the headers to copy per segment (a hint)
	GSOSize    uint16 // MSS when GSOType is not GSONone
	CsumStart  uint16 // offset in the frame where checksumming starts
	CsumOffset uint16 // offset after CsumStart where the checksum goes
	NumBuffers uint16 // receive buffers a frame spans (mergeable buffers)
}

// ParseHeader decodes a virtio_net_hdr from the first LegacyHeaderLen or
// HeaderLen bytes of b (NumBuffers is read only when b holds HeaderLen
// bytes). It validates nothing beyond the length: see Header.TxOffload.
func ParseHeader(b []byte) (Header, error) {
	if len(b) < LegacyHeaderLen {
		return Header{}, &PacketError{Reason: fmt.Sprintf("virtio-net header of %d bytes, need %d", len(b), LegacyHeaderLen)}
	}
	h := Header{
		Flags:      b[0],
		GSOType:    b[1],
		HdrLen:     binary.LittleEndian.Uint16(b[2:]),
		GSOSize:    binary.LittleEndian.Uint16(b[4:]),
		CsumStart:  binary.LittleEndian.Uint16(b[6:]),
		CsumOffset: binary.LittleEndian.Uint16(b[8:]),
	}
	if len(b) >= HeaderLen {
		h.NumBuffers = binary.LittleEndian.Uint16(b[10:])
	}
	return h, nil
}

// Encode writes h into b, which must hold LegacyHeaderLen bytes (and
// HeaderLen for NumBuffers to be written). It returns the bytes written.
func (h Header) Encode(b []byte) int {
	b[0] = h.Flags
	b[1] = h.GSOType
	binary.LittleEndian.PutUint16(b[2:], h.HdrLen)
	binary.LittleEndian.PutUint16(b[4:], h.GSOSize)
	binary.LittleEndian.PutUint16(b[6:], h.CsumStart)
	binary.LittleEndian.PutUint16(b[8:], h.CsumOffset)
	if len(b) >= HeaderLen {
		binary.LittleEndian.PutUint16(b[10:], h.NumBuffers)
		return HeaderLen
	}
	return LegacyHeaderLen
}

// TxOffload validates the header of a guest→host frame against the frame
// and the negotiated features, and returns the offload metadata to hand to
// the backend. offload is false when the frame needs none (plain
// DeliverFrame). frame is the Ethernet frame after the header; only its
// length and EtherType are read. An invalid header gives a *PacketError.
func (h Header) TxOffload(frame []byte, features uint64) (o netstack.Offload, offload bool, err error) {
	bad := func(format string, args ...any) (netstack.Offload, bool, error) {
		return netstack.Offload{}, false, &PacketError{Reason: fmt.Sprintf(format, args...)}
	}
	n := len(frame)
	if n < EthernetHeaderLen {
		return bad("frame of %d bytes is shorter than an Ethernet header", n)
	}
	if n > MaxFrameLen {
		return bad("frame of %d bytes is over %d", n, MaxFrameLen)
	}
	// Flag bits other than NEEDS_CSUM are ignored (VIRTIO 1.2 5.1.6.2.2:
	// the device must ignore flags it does not recognize; DATA_VALID and
	// RSC_INFO mean nothing on transmit).
	csum := features&FeatureCsum != 0
	if h.Flags&HdrFNeedsCsum != 0 {
		if !csum {
			return bad("NEEDS_CSUM without VIRTIO_NET_F_CSUM negotiated")
		}
		start, off := int(h.CsumStart), int(h.CsumOffset)
		if start < EthernetHeaderLen || start+off+2 > n {
			return bad("checksum start %d offset %d outside a %d-byte frame", start, off, n)
		}
		o.NeedsChecksum = true
		o.ChecksumStart, o.ChecksumOffset = h.CsumStart, h.CsumOffset
		offload = true
	}
	if h.GSOType == GSONone {
		return o, offload, nil
	}
	etherType := binary.BigEndian.Uint16(frame[12:])
	switch h.GSOType {
	case GSOTCPv4:
		if features&FeatureHostTSO4 == 0 || !csum {
			return bad("gso_type TCPV4 without VIRTIO_NET_F_HOST_TSO4 and CSUM negotiated")
		}
		if etherType != etherTypeIPv4 {
			return bad("gso_type TCPV4 on EtherType %#04x", etherType)
		}
	case GSOTCPv6:
		if features&FeatureHostTSO6 == 0 || !csum {
			return bad("gso_type TCPV6 without VIRTIO_NET_F_HOST_TSO6 and CSUM negotiated")
		}
		if etherType != etherTypeIPv6 {
			return bad("gso_type TCPV6 on EtherType %#04x", etherType)
		}
	default:
		return bad("gso_type %#x is not offered (only TCPV4 and TCPV6, without ECN)", h.GSOType)
	}
	if h.Flags&HdrFNeedsCsum == 0 {
		return bad("gso_type %#x without NEEDS_CSUM", h.GSOType)
	}
	if h.GSOSize == 0 {
		return bad("gso_type %#x with gso_size 0", h.GSOType)
	}
	o.Segmented = true
	o.SegmentSize = h.GSOSize
	return o, true, nil
}
