package net_test

import (
	"context"
	"encoding/binary"
	"errors"
	"testing"
	"time"

	"github.com/gosandbox/sandbox/netstack"
	"github.com/gosandbox/sandbox/virtio"
	vnet "github.com/gosandbox/sandbox/virtio/net"
	"github.com/gosandbox/sandbox/virtio/virtiotest"
)

const allFeatures = vnet.FeatureCsum | vnet.FeatureGuestCsum | vnet.FeatureMTU | vnet.FeatureMAC |
	vnet.FeatureGuestTSO4 | vnet.FeatureGuestTSO6 | vnet.FeatureHostTSO4 | vnet.FeatureHostTSO6 |
	vnet.FeatureMrgRxbuf | vnet.FeatureStatus

// FuzzNetHeader parses arbitrary virtio-net headers against arbitrary
// frames and features: no panic, and an accepted header's offload stays
// inside the frame and matches the features.
func FuzzNetHeader(f *testing.F) {
	frame4 := ethFrame(gwMAC, guestMAC, 0x0800, 1514)
	frame6 := ethFrame(gwMAC, guestMAC, 0x86dd, 1514)
	add := func(h vnet.Header, frame []byte, features uint64) {
		f.Add(append(hdrBytes(h), frame...), features)
	}
	add(vnet.Header{}, frame4, 0)
	add(vnet.Header{Flags: vnet.HdrFNeedsCsum, CsumStart: 34, CsumOffset: 16}, frame4, allFeatures)
	add(vnet.Header{Flags: vnet.HdrFNeedsCsum, GSOType: vnet.GSOTCPv4, GSOSize: 1448, CsumStart: 34, CsumOffset: 16}, frame4, allFeatures)
	add(vnet.Header{Flags: vnet.HdrFNeedsCsum, GSOType: vnet.GSOTCPv6, GSOSize: 1428, CsumStart: 54, CsumOffset: 16}, frame6, allFeatures)
	add(vnet.Header{Flags: vnet.HdrFNeedsCsum, GSOType: vnet.GSOTCPv4 | vnet.GSOECN, GSOSize: 1448, CsumStart: 34, CsumOffset: 16}, frame4, allFeatures)
	add(vnet.Header{Flags: vnet.HdrFNeedsCsum, CsumStart: 0xffff, CsumOffset: 0xffff}, frame4, allFeatures)
	add(vnet.Header{Flags: 0xff, GSOType: 0xff}, frame4[:20], allFeatures)
	f.Add([]byte{1, 2, 3}, uint64(0))
	f.Fuzz(func(t *testing.T, data []byte, features uint64) {
		h, err := vnet.ParseHeader(data)
		if err != nil {
			if len(data) >= vnet.LegacyHeaderLen || !errors.Is(err, vnet.ErrInvalidPacket) {
				t.Fatalf("ParseHeader(%d bytes) = %v", len(data), err)
			}
			return
		}
		if len(data) >= vnet.HeaderLen {
			var b [vnet.HeaderLen]byte
			h.Encode(b[:])
			if string(b[:]) != string(data[:vnet.HeaderLen]) {
				t.Fatalf("Encode(ParseHeader(x)) != x")
			}
		}
		frame := data[min(len(data), vnet.HeaderLen):]
		o, offload, err := h.TxOffload(frame, features)
		if err != nil {
			if !errors.Is(err, vnet.ErrInvalidPacket) {
				t.Fatalf("TxOffload error %v is not ErrInvalidPacket", err)
			}
			return
		}
		if len(frame) < vnet.EthernetHeaderLen || len(frame) > vnet.MaxFrameLen {
			t.Fatalf("accepted a %d-byte frame", len(frame))
		}
		if offload != (o.NeedsChecksum || o.Segmented) {
			t.Fatalf("offload %v with %+v", offload, o)
		}
		if o.NeedsChecksum {
			if features&vnet.FeatureCsum == 0 {
				t.Fatal("NEEDS_CSUM accepted without CSUM")
			}
			if int(o.ChecksumStart) < vnet.EthernetHeaderLen || int(o.ChecksumStart)+int(o.ChecksumOffset)+2 > len(frame) {
				t.Fatalf("checksum %d+%d outside %d bytes", o.ChecksumStart, o.ChecksumOffset, len(frame))
			}
		}
		if o.Segmented {
			tso := map[uint8]uint64{vnet.GSOTCPv4: vnet.FeatureHostTSO4, vnet.GSOTCPv6: vnet.FeatureHostTSO6}[h.GSOType]
			if tso == 0 || features&tso == 0 || !o.NeedsChecksum || o.SegmentSize == 0 {
				t.Fatalf("segment accepted: header %+v features %#x", h, features)
			}
		}
	})
}

// FuzzTxChain feeds arbitrary transmit chains through a device over the
// virtiotest driver: mode 0 builds a well-formed chain from data split at
// the given points (with optional writable buffers), mode 1 writes raw
// descriptors from data. The device must return the chain or report a
// QueueError, never panic or hang, and only deliver valid frames.
func FuzzTxChain(f *testing.F) {
	f.Add(uint8(0), append(hdrBytes(vnet.Header{}), ethFrame(gwMAC, guestMAC, 0x0800, 100)...), uint16(5), uint16(40), uint16(0), uint64(allFeatures))
	f.Add(uint8(0), append(hdrBytes(vnet.Header{Flags: 1, GSOType: 1, GSOSize: 100, CsumStart: 34, CsumOffset: 16}), ethFrame(gwMAC, guestMAC, 0x0800, 300)...), uint16(12), uint16(0), uint16(0), uint64(allFeatures))
	f.Add(uint8(0), hdrBytes(vnet.Header{}), uint16(0), uint16(0), uint16(64), uint64(0))
	f.Add(uint8(1), []byte{0, 0, 100, 0, 1, 1, 0, 1, 200, 0, 2, 0}, uint16(0), uint16(0), uint16(0), uint64(allFeatures))
	f.Add(uint8(1), []byte{0, 0, 16, 0, 4, 0, 0, 0}, uint16(0), uint16(0), uint16(0), uint64(allFeatures))
	f.Fuzz(func(t *testing.T, mode uint8, data []byte, split1, split2, writable uint16, features uint64) {
		if len(data) > 8192 {
			return
		}
		b := newRecBackend()
		d := newDevice(t, b, vnet.Options{})
		features &= allFeatures
		h := virtiotest.NewHarness(t, d, virtiotest.HarnessOptions{
			Features: features | baseFeatures, QueueSize: 8, DataPerQueue: 8 * 16 << 10,
		})
		q := h.Queues[qTx]
		if mode%2 == 0 {
			s1 := min(int(split1), len(data))
			s2 := min(s1+int(split2), len(data))
			var out [][]byte
			for _, p := range [][]byte{data[:s1], data[s1:s2], data[s2:]} {
				if len(p) > 0 {
					out = append(out, p)
				}
			}
			var in []int
			if writable > 0 {
				in = append(in, int(writable%4096))
			}
			if len(out)+len(in) == 0 {
				return
			}
			if _, err := q.Add(out, in...); err != nil {
				return
			}
		} else {
			// Raw descriptors: addr offset, length, flags, next (6 bytes each).
			n := 0
			for i := 0; i+6 <= len(data) && n < int(q.Size); i += 6 {
				off := uint64(binary.LittleEndian.Uint16(data[i:]))
				length := uint32(binary.LittleEndian.Uint16(data[i+2:]))
				q.WriteDesc(uint16(n), q.DataBase+off, length, uint16(data[i+4]), uint16(data[i+5]))
				n++
			}
			if n == 0 {
				return
			}
			q.PublishRaw(0, 1)
		}
		h.Kick(qTx)
		if mode%2 == 0 {
			ctx, cancel := context.WithTimeout(context.Background(), virtiotest.WaitTimeout)
			defer cancel()
			if _, err := h.WaitUsedContext(ctx, qTx); err != nil {
				t.Fatalf("device: %v", err)
			}
		} else {
			// The driver double does not track raw chains: watch the used
			// index, or the failure.
			timeout := time.After(virtiotest.WaitTimeout)
			for q.UsedIdx() == 0 {
				select {
				case <-h.Interrupts(qTx):
				case <-h.Failed():
					var qe *virtio.QueueError
					if !errors.As(h.FailErr(), &qe) {
						t.Fatalf("Fail(%v), want a *virtio.QueueError", h.FailErr())
					}
					return
				case <-timeout:
					t.Fatal("device neither returned the chain nor failed")
				}
			}
		}
		for _, fr := range b.all() {
			if len(fr.frame) < vnet.EthernetHeaderLen || len(fr.frame) > vnet.MaxFrameLen {
				t.Fatalf("delivered a %d-byte frame", len(fr.frame))
			}
			if o := fr.offload; o != nil && (features&vnet.FeatureCsum == 0 || int(o.ChecksumStart)+int(o.ChecksumOffset)+2 > len(fr.frame)) {
				t.Fatalf("delivered offload %+v for a %d-byte frame with features %#x", *o, len(fr.frame), features)
			}
		}
	})
}

// FuzzRxOffload writes arbitrary host frames with arbitrary offload
// metadata into a device with arbitrary negotiated features (the backend
// is trusted, but a bug there must not crash the device): no panic, and a
// frame the device accepts arrives in the ring.
func FuzzRxOffload(f *testing.F) {
	seg := tcpSegment(f, false, 3000)
	seg6 := tcpSegment(f, true, 3000)
	f.Add(seg, true, uint16(34), uint16(16), true, uint16(1448), uint64(allFeatures))
	f.Add(seg, true, uint16(34), uint16(16), true, uint16(1448), uint64(vnet.FeatureMrgRxbuf))
	f.Add(seg6, true, uint16(54), uint16(16), true, uint16(1000), uint64(vnet.FeatureMrgRxbuf|vnet.FeatureGuestCsum))
	f.Add(seg[:100], true, uint16(34), uint16(16), false, uint16(0), uint64(0))
	f.Add(seg[:60], false, uint16(0), uint16(0), true, uint16(1), uint64(vnet.FeatureMrgRxbuf))
	f.Fuzz(func(t *testing.T, frame []byte, csum bool, start, off uint16, segmented bool, mss uint16, features uint64) {
		if len(frame) > 16<<10 {
			return
		}
		d := newDevice(t, discardBackend{}, vnet.Options{RxTimeout: time.Millisecond})
		features &= allFeatures
		h := virtiotest.NewHarness(t, d, virtiotest.HarnessOptions{
			Features: features | baseFeatures, QueueSize: 64, DataPerQueue: 64 * 32 << 10,
		})
		mrg := features&vnet.FeatureMrgRxbuf != 0
		size := 2048
		if !mrg {
			size = 32 << 10
		}
		postRx(t, h, 64, size)
		err := d.WriteFrameOffload(frame, netstack.Offload{NeedsChecksum: csum, ChecksumStart: start, ChecksumOffset: off, Segmented: segmented, SegmentSize: mss})
		if err != nil {
			if !errors.Is(err, vnet.ErrInvalidPacket) && !errors.Is(err, vnet.ErrNoBuffers) {
				t.Fatalf("WriteFrameOffload: %v", err)
			}
			return
		}
		hdr, got := rxFrame(t, h, mrg)
		if len(got) < vnet.EthernetHeaderLen {
			t.Fatalf("received %d bytes", len(got))
		}
		if hdr.GSOType != vnet.GSONone && features&vnet.FeatureGuestCsum == 0 {
			t.Fatalf("GSO header %+v without GUEST_CSUM", hdr)
		}
		if hdr.Flags&vnet.HdrFNeedsCsum != 0 && features&vnet.FeatureGuestCsum == 0 {
			t.Fatalf("NEEDS_CSUM header without GUEST_CSUM")
		}
	})
}
