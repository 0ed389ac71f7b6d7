package net

import (
	"fmt"

	"github.com/gosandbox/sandbox/virtio"
)

// transmit is the TX worker: it sleeps until the guest kicks the transmit
// queue, then hands every available frame to the backend.
func (d *Device) transmit(s *session) {
	defer s.wg.Done()
	q := s.tx
	var ch virtio.Chain
	buf := make([]byte, s.hdrLen+MaxFrameLen)
	for q.Wait(s.stop) {
		done := 0
		for {
			ok, err := q.Pop(&ch)
			if err != nil || !ok {
				break // a broken ring already called Activation.Fail
			}
			d.transmitChain(s, &ch, buf)
			q.Push(ch.Head, 0)
			if done++; done%notifyBatch == 0 {
				q.Notify()
			}
			select {
			case <-s.stop:
				q.Notify()
				return
			default:
			}
		}
		q.Notify()
	}
}

// transmitChain validates one transmit chain and delivers its frame.
func (d *Device) transmitChain(s *session, ch *virtio.Chain, buf []byte) {
	frame, err := d.txFrame(s, ch, buf)
	if err == nil {
		err = d.deliver(s, frame)
		if err != nil {
			d.stats.txDropped.Add(1)
			d.log.Debug("virtio-net: backend dropped a frame", "len", len(frame), "err", err)
		}
		return
	}
	d.stats.txInvalid.Add(1)
	d.stats.txDropped.Add(1)
	d.log.Debug("virtio-net: invalid transmit chain", "err", err)
}

// txFrame copies the frame of ch (header included) out of guest memory
// into buf, so the guest cannot change it while it is validated and
// delivered, and returns the header and frame.
func (d *Device) txFrame(s *session, ch *virtio.Chain, buf []byte) ([]byte, error) {
	if len(ch.Writable) != 0 {
		return nil, &PacketError{Reason: "transmit chain has device-writable descriptors"}
	}
	total := ch.ReadableLen()
	if total < s.hdrLen {
		return nil, &PacketError{Reason: fmt.Sprintf("transmit chain of %d bytes is shorter than the %d-byte virtio-net header", total, s.hdrLen)}
	}
	if total-s.hdrLen > MaxFrameLen {
		return nil, &PacketError{Reason: fmt.Sprintf("transmit frame of %d bytes is over %d", total-s.hdrLen, MaxFrameLen)}
	}
	n := ch.CopyFromGuest(buf[:total], 0)
	return buf[:n], nil
}

// deliver parses the header at the start of pkt and hands the frame to the
// backend.
func (d *Device) deliver(s *session, pkt []byte) error {
	h, err := ParseHeader(pkt[:s.hdrLen])
	if err != nil {
		return err
	}
	frame := pkt[s.hdrLen:]
	o, offload, err := h.TxOffload(frame, s.features)
	if err != nil {
		d.stats.txInvalid.Add(1)
		return err
	}
	if offload {
		err = d.backend.DeliverFrameOffload(frame, o)
	} else {
		err = d.backend.DeliverFrame(frame)
	}
	if err == nil {
		d.stats.txFrames.Add(1)
		d.stats.txBytes.Add(uint64(len(frame)))
	}
	return err
}
