package net

import (
	"encoding/binary"
	"fmt"
	"time"

	"github.com/gosandbox/sandbox/netstack"
	"github.com/gosandbox/sandbox/virtio"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
)

// stopErr is the error for a frame whose wait a Reset or Close ended.
func (d *Device) stopErr() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return ErrClosed
	}
	return fmt.Errorf("%w (the guest reset the device while the frame waited for receive buffers)", ErrNotReady)
}

// WriteFrame implements netstack.FrameWriter: it copies a host→guest
// Ethernet frame (complete checksums) into the guest's receive queue and
// interrupts the guest. It waits at most Options.RxTimeout for receive
// buffers, and returns at once after Reset or Close; an error means the
// frame was dropped. Safe for concurrent use.
func (d *Device) WriteFrame(frame []byte) error {
	s, err := d.acquire()
	if err != nil {
		d.stats.rxDropped.Add(1)
		return err
	}
	defer s.wg.Done()
	var h Header
	if s.guestCsum {
		h.Flags = HdrFDataValid // the host stack computed every checksum
	}
	return d.receive(s, h, frame, nil)
}

// WriteFrameOffload implements netstack.GSOFrameWriter. When the guest
// negotiated VIRTIO_NET_F_GUEST_CSUM (and GUEST_TSO4/6 for segments) the
// offload metadata goes into the frame's virtio-net header; otherwise the
// device completes the checksum, and cuts a large segment into MSS-sized
// frames, itself.
func (d *Device) WriteFrameOffload(frame []byte, o netstack.Offload) error {
	s, err := d.acquire()
	if err != nil {
		d.stats.rxDropped.Add(1)
		return err
	}
	defer s.wg.Done()
	if !o.NeedsChecksum && !o.Segmented {
		var h Header
		if s.guestCsum {
			h.Flags = HdrFDataValid
		}
		return d.receive(s, h, frame, nil)
	}
	if err := checkOffload(frame, o); err != nil {
		d.stats.rxDropped.Add(1)
		return err
	}
	if !o.Segmented {
		if s.guestCsum {
			h := Header{Flags: HdrFNeedsCsum, CsumStart: o.ChecksumStart, CsumOffset: o.ChecksumOffset}
			return d.receive(s, h, frame, nil)
		}
		return d.receive(s, Header{}, frame, &o)
	}
	tso := false
	gsoType := uint8(GSONone)
	switch binary.BigEndian.Uint16(frame[12:]) {
	case etherTypeIPv4:
		tso, gsoType = s.guestTSO4, GSOTCPv4
	case etherTypeIPv6:
		tso, gsoType = s.guestTSO6, GSOTCPv6
	}
	// A segment with CWR set would need GUEST_ECN (VIRTIO 1.2 5.1.6.4.1):
	// cut those here too.
	cwr := false
	if i := int(o.ChecksumStart) + 13; i < len(frame) {
		cwr = frame[i]&tcpFlagCWR != 0
	}
	if tso && o.NeedsChecksum && !cwr {
		h := Header{
			Flags: HdrFNeedsCsum, GSOType: gsoType, GSOSize: o.SegmentSize,
			CsumStart: o.ChecksumStart, CsumOffset: o.ChecksumOffset,
			HdrLen: o.ChecksumStart + tcpHeaderLen(frame, int(o.ChecksumStart)),
		}
		return d.receive(s, h, frame, nil)
	}
	// The guest cannot take the segment: cut it here.
	var sent bool
	err = segmentTCP(frame, o, func(seg []byte) error {
		sent = true
		return d.receive(s, Header{}, seg, nil) // counts its own drop
	})
	if err != nil && !sent {
		d.stats.rxDropped.Add(1)
	}
	return err
}

// tcpFlagCWR is the TCP header's CWR flag (byte 13).
const tcpFlagCWR = 0x80

// checkOffload validates host→guest offload metadata.
func checkOffload(frame []byte, o netstack.Offload) error {
	n := len(frame)
	if n < EthernetHeaderLen || n > MaxFrameLen {
		return &PacketError{Reason: fmt.Sprintf("host frame of %d bytes outside %d..%d", n, EthernetHeaderLen, MaxFrameLen)}
	}
	start, off := int(o.ChecksumStart), int(o.ChecksumOffset)
	if start < EthernetHeaderLen || start+off+2 > n {
		return &PacketError{Reason: fmt.Sprintf("host frame checksum start %d offset %d outside a %d-byte frame", start, off, n)}
	}
	if o.Segmented && o.SegmentSize == 0 {
		return &PacketError{Reason: "host frame is a segment with segment size 0"}
	}
	return nil
}

// tcpHeaderLen returns the TCP header length at off in frame, or 0.
func tcpHeaderLen(frame []byte, off int) uint16 {
	if off+13 > len(frame) {
		return 0
	}
	return uint16(frame[off+12]>>4) * 4
}

// receive copies h and frame into receive chains and counts the outcome.
// With csum set, the checksum the offload describes is completed first
// (in a private copy of frame).
func (d *Device) receive(s *session, h Header, frame []byte, csum *netstack.Offload) error {
	err := d.receiveLocked(s, h, frame, csum)
	if err != nil {
		d.stats.rxDropped.Add(1)
		return err
	}
	d.stats.rxFrames.Add(1)
	d.stats.rxBytes.Add(uint64(len(frame)))
	return nil
}

func (d *Device) receiveLocked(s *session, h Header, frame []byte, csum *netstack.Offload) error {
	if len(frame) < EthernetHeaderLen || len(frame) > MaxFrameLen {
		return &PacketError{Reason: fmt.Sprintf("host frame of %d bytes outside %d..%d", len(frame), EthernetHeaderLen, MaxFrameLen)}
	}
	if h.GSOType == GSONone && s.features&FeatureMTU != 0 && len(frame) > d.mtu+EthernetHeaderLen {
		// VIRTIO 1.2 5.1.6.3.1: never more than the announced MTU.
		return &PacketError{Reason: fmt.Sprintf("host frame of %d bytes over the MTU %d plus Ethernet header (the backend's MTU must match Options.MTU)", len(frame), d.mtu)}
	}
	var timer *time.Timer
	defer func() {
		if timer != nil {
			timer.Stop()
		}
	}()
	timeout := func() <-chan time.Time {
		if timer == nil {
			timer = time.NewTimer(d.rxTimeout)
		}
		return timer.C
	}
	select {
	case s.rxLock <- struct{}{}:
	default:
		select {
		case s.rxLock <- struct{}{}:
		case <-s.stop:
			return d.stopErr()
		case <-timeout():
			return ErrNoBuffers
		}
	}
	defer func() { <-s.rxLock }()

	if csum != nil {
		// Complete the checksum in a private copy.
		s.scratch = append(s.scratch[:0], frame...)
		frame = s.scratch
		start, off := int(csum.ChecksumStart), int(csum.ChecksumOffset)
		sum := checksum.Checksum(frame[start:], 0)
		binary.BigEndian.PutUint16(frame[start+off:], ^sum)
	}
	q := s.rx
	need := s.hdrLen + len(frame)
	var hdr [HeaderLen]byte
	chains := s.rxChains[:0]
	defer func() { s.rxChains = chains[:0] }()
	have := 0
	for have < need {
		if len(chains) == int(q.Size()) {
			// More buffers than the ring holds (tiny buffers): num_buffers
			// stays bounded, and so does the time spent on one frame.
			for i := range chains {
				q.Push(chains[i].Head, 0)
			}
			q.Notify()
			return &PacketError{Reason: fmt.Sprintf("a %d-byte frame needs more than %d receive buffers of the sizes posted", need, q.Size())}
		}
		if len(chains) == cap(chains) {
			chains = append(chains, virtio.Chain{})
		} else {
			chains = chains[:len(chains)+1]
		}
		ch := &chains[len(chains)-1]
		if err := d.nextChain(s, ch, timeout); err != nil {
			chains = chains[:len(chains)-1]
			// Return what was taken, empty: the guest drops it.
			for i := range chains {
				q.Push(chains[i].Head, 0)
			}
			q.Notify()
			return err
		}
		n := ch.WritableLen()
		switch {
		case len(ch.Readable) != 0 || (len(chains) == 1 && n < s.hdrLen) || n == 0:
			d.stats.rxInvalid.Add(1)
			chains = chains[:len(chains)-1]
			q.Push(ch.Head, 0)
			continue
		case !s.mrg && n < need:
			q.Push(ch.Head, 0)
			q.Notify()
			return &PacketError{Reason: fmt.Sprintf("receive buffer of %d bytes for a %d-byte frame (the guest negotiated neither mergeable buffers nor posts big enough buffers)", n, need)}
		}
		have += n
	}
	// Copy the frame, then the header (num_buffers known now) into the
	// first chain.
	off := s.hdrLen // offset in the frame+header stream
	for i := range chains {
		ch := &chains[i]
		start := 0
		if i == 0 {
			start = s.hdrLen
		}
		room := ch.WritableLen() - start
		k := min(room, need-off)
		ch.CopyToGuest(start, frame[off-s.hdrLen:off-s.hdrLen+k])
		off += k
	}
	// 1 without mergeable buffers (VIRTIO 1.2 5.1.6.4.1); it is only
	// encoded with the 12-byte header.
	h.NumBuffers = uint16(len(chains))
	h.Encode(hdr[:s.hdrLen])
	chains[0].CopyToGuest(0, hdr[:s.hdrLen])
	off = 0
	for i := range chains {
		n := min(chains[i].WritableLen(), need-off)
		q.Push(chains[i].Head, uint32(n))
		off += n
	}
	q.Notify()
	return nil
}

// nextChain pops the next receive chain, waiting for the guest to post one
// until the timeout, a reset or Close.
func (d *Device) nextChain(s *session, ch *virtio.Chain, timeout func() <-chan time.Time) error {
	q := s.rx
	for {
		ok, err := q.PopOrArm(ch)
		if err != nil {
			return fmt.Errorf("%w: %w", ErrBroken, err)
		}
		if ok {
			return nil
		}
		select {
		case <-q.Kicks():
		case <-s.stop:
			return d.stopErr()
		case <-timeout():
			return ErrNoBuffers
		}
	}
}
