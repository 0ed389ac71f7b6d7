package netstack

import (
	"encoding/binary"
	"fmt"

	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// Offload carries what a guest→host frame's virtio-net header says, for
// devices that negotiate checksum and segmentation offload
// (VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4/6). Offsets count from the start
// of the Ethernet frame, as csum_start does in struct virtio_net_hdr.
type Offload struct {
	// NeedsChecksum is VIRTIO_NET_HDR_F_NEEDS_CSUM: the 16-bit field at
	// ChecksumStart+ChecksumOffset holds only the pseudo-header sum, and the
	// network completes the checksum over the bytes from ChecksumStart on.
	NeedsChecksum                 bool
	ChecksumStart, ChecksumOffset uint16
	// Segmented is gso_type != VIRTIO_NET_HDR_GSO_NONE: the frame is one
	// large TCP segment (up to a 64 KiB IP packet) and may exceed the MTU.
	// The stack takes it as is; there is no need to split it.
	Segmented bool
	// SegmentSize is gso_size, the MSS to cut a Segmented frame into. Only
	// set on host→guest frames (GSOFrameWriter).
	SegmentSize uint16
}

// DeliverFrameOffload is DeliverFrame for frames with offload metadata. The
// frame is modified in place when its checksum is completed.
func (n *Network) DeliverFrameOffload(frame []byte, o Offload) error {
	maxLen := n.mtu + header.EthernetMinimumSize
	if o.Segmented {
		maxLen = MaxMTU + header.EthernetMinimumSize
	}
	if len(frame) > maxLen {
		n.stats.framesDropped.Add(1)
		return fmt.Errorf("%w: length %d over %d", ErrFrameInvalid, len(frame), maxLen)
	}
	if o.NeedsChecksum {
		if err := completeChecksum(frame, int(o.ChecksumStart), int(o.ChecksumOffset)); err != nil {
			n.stats.framesDropped.Add(1)
			return err
		}
	}
	return n.deliverFrame(frame, maxLen)
}

// completeChecksum folds the one's complement sum of frame[start:] into the
// field at start+offset, which holds the pseudo-header sum on entry.
func completeChecksum(frame []byte, start, offset int) error {
	if start < header.EthernetMinimumSize || offset < 0 || start+offset+2 > len(frame) || start+offset+2 < start {
		return fmt.Errorf("%w: checksum start %d offset %d outside a %d-byte frame", ErrFrameInvalid, start, offset, len(frame))
	}
	sum := checksum.Checksum(frame[start:], 0)
	binary.BigEndian.PutUint16(frame[start+offset:], ^sum)
	return nil
}
