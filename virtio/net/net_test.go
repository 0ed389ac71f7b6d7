package net_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	stdnet "net"
	"sync"
	"testing"
	"time"

	"github.com/gosandbox/sandbox/netstack"
	"github.com/gosandbox/sandbox/virtio"
	vnet "github.com/gosandbox/sandbox/virtio/net"
	"github.com/gosandbox/sandbox/virtio/virtiotest"
)

func TestConformance(t *testing.T) {
	virtiotest.TestDevice(t, func(t *testing.T) virtio.Device {
		return newDevice(t, newRecBackend(), vnet.Options{})
	}, qTx)
}

func TestOptions(t *testing.T) {
	for _, tc := range []struct {
		name string
		opts vnet.Options
	}{
		{"short MAC", vnet.Options{MAC: guestMAC[:5], Backend: discardBackend{}}},
		{"multicast MAC", vnet.Options{MAC: stdnet.HardwareAddr{1, 0, 0x5e, 0, 0, 1}, Backend: discardBackend{}}},
		{"MTU too small", vnet.Options{MAC: guestMAC, MTU: 67, Backend: discardBackend{}}},
		{"MTU too large", vnet.Options{MAC: guestMAC, MTU: 65536, Backend: discardBackend{}}},
		{"no backend", vnet.Options{MAC: guestMAC}},
		{"negative timeout", vnet.Options{MAC: guestMAC, Backend: discardBackend{}, RxTimeout: -1}},
	} {
		if _, err := vnet.New(tc.opts); !errors.Is(err, vnet.ErrOptions) {
			t.Errorf("%s: New() = %v, want ErrOptions", tc.name, err)
		}
	}
	d, err := vnet.New(vnet.Options{MAC: guestMAC, Backend: discardBackend{}})
	if err != nil {
		t.Fatal(err)
	}
	if d.MTU() != vnet.DefaultMTU {
		t.Errorf("default MTU %d, want %d", d.MTU(), vnet.DefaultMTU)
	}
}

func TestConfigSpace(t *testing.T) {
	d := newDevice(t, discardBackend{}, vnet.Options{MTU: 9000})
	if d.Type() != virtio.TypeNet {
		t.Errorf("Type() = %d", d.Type())
	}
	want := uint64(vnet.FeatureMAC | vnet.FeatureMTU | vnet.FeatureStatus | vnet.FeatureMrgRxbuf |
		vnet.FeatureCsum | vnet.FeatureGuestCsum | vnet.FeatureHostTSO4 | vnet.FeatureHostTSO6 |
		vnet.FeatureGuestTSO4 | vnet.FeatureGuestTSO6)
	if d.Features() != want {
		t.Errorf("Features() = %#x, want %#x", d.Features(), want)
	}
	if got := d.QueueSizes(); len(got) != 2 {
		t.Errorf("QueueSizes() = %v, want 2 queues", got)
	}
	c := make([]byte, d.ConfigSize())
	d.ReadConfig(0, c)
	if !bytes.Equal(c[:6], guestMAC) {
		t.Errorf("config mac %x", c[:6])
	}
	if s := binary.LittleEndian.Uint16(c[6:]); s != vnet.StatusLinkUp {
		t.Errorf("config status %d", s)
	}
	if p := binary.LittleEndian.Uint16(c[8:]); p != 1 {
		t.Errorf("max_virtqueue_pairs %d", p)
	}
	if m := binary.LittleEndian.Uint16(c[10:]); m != 9000 {
		t.Errorf("config mtu %d", m)
	}
	// Partial and out-of-range reads.
	p := make([]byte, 2)
	d.ReadConfig(10, p)
	if binary.LittleEndian.Uint16(p) != 9000 {
		t.Errorf("mtu at offset 10: %x", p)
	}
	p = []byte{0, 0}
	d.ReadConfig(100, p)
	d.ReadConfig(-4, p)
	if p[0] != 0 || p[1] != 0 {
		t.Errorf("read outside config changed the buffer: %x", p)
	}
	d.WriteConfig(0, []byte{1, 2, 3, 4, 5, 6})
	d.ReadConfig(0, c)
	if !bytes.Equal(c[:6], guestMAC) {
		t.Errorf("config mac changed by a write: %x", c[:6])
	}
}

func TestTransmit(t *testing.T) {
	b := newRecBackend()
	d := newDevice(t, b, vnet.Options{})
	h := harness(t, d, d.Features())
	f1 := ethFrame(gwMAC, guestMAC, 0x0800, 60)
	f2 := ethFrame(gwMAC, guestMAC, 0x86dd, 1514)
	f3 := ethFrame(gwMAC, guestMAC, 0x0800, vnet.MaxFrameLen)
	hdr := hdrBytes(vnet.Header{})
	// Header and frame in one buffer, split, and the header itself split.
	h.Add(qTx, [][]byte{append(append([]byte(nil), hdr...), f1...)})
	h.Add(qTx, [][]byte{hdr, f2[:100], f2[100:]})
	h.Add(qTx, [][]byte{hdr[:3], hdr[3:], f3})
	for range 3 {
		if u := h.WaitUsed(qTx); u.Len != 0 {
			t.Errorf("TX used length %d, want 0", u.Len)
		}
	}
	got := waitDelivered(t, b, 3)
	for i, want := range [][]byte{f1, f2, f3} {
		if !bytes.Equal(got[i].frame, want) || got[i].offload != nil {
			t.Errorf("frame %d: %d bytes offload %v, want %d bytes, no offload", i, len(got[i].frame), got[i].offload, len(want))
		}
	}
	s := d.Stats()
	if s.TxFrames != 3 || s.TxBytes != uint64(len(f1)+len(f2)+len(f3)) || s.TxDropped != 0 {
		t.Errorf("stats %v", s)
	}
	if d.String() == "" || s.String() == "" {
		t.Error("empty String")
	}
}

func TestTransmitOffload(t *testing.T) {
	b := newRecBackend()
	d := newDevice(t, b, vnet.Options{})
	h := harness(t, d, d.Features())
	f := ethFrame(gwMAC, guestMAC, 0x0800, 60000)
	csum := vnet.Header{Flags: vnet.HdrFNeedsCsum, CsumStart: 34, CsumOffset: 16}
	tso := csum
	tso.GSOType, tso.GSOSize, tso.HdrLen = vnet.GSOTCPv4, 1448, 66
	f6 := ethFrame(gwMAC, guestMAC, 0x86dd, 60000)
	tso6 := vnet.Header{Flags: vnet.HdrFNeedsCsum, GSOType: vnet.GSOTCPv6, GSOSize: 1428, CsumStart: 54, CsumOffset: 16}
	h.Add(qTx, [][]byte{hdrBytes(csum), f[:1514]})
	h.Add(qTx, [][]byte{hdrBytes(tso), f})
	h.Add(qTx, [][]byte{hdrBytes(tso6), f6})
	got := waitDelivered(t, b, 3)
	want := []netstack.Offload{
		{NeedsChecksum: true, ChecksumStart: 34, ChecksumOffset: 16},
		{NeedsChecksum: true, ChecksumStart: 34, ChecksumOffset: 16, Segmented: true, SegmentSize: 1448},
		{NeedsChecksum: true, ChecksumStart: 54, ChecksumOffset: 16, Segmented: true, SegmentSize: 1428},
	}
	for i := range want {
		if got[i].offload == nil || *got[i].offload != want[i] {
			t.Errorf("frame %d: offload %+v, want %+v", i, got[i].offload, want[i])
		}
	}
	if !bytes.Equal(got[1].frame, f) {
		t.Error("TSO frame changed")
	}
}

// TestTransmitOffloadNotNegotiated: offload metadata is refused when the
// guest did not negotiate the feature.
func TestTransmitOffloadNotNegotiated(t *testing.T) {
	b := newRecBackend()
	d := newDevice(t, b, vnet.Options{})
	h := harness(t, d, vnet.FeatureMAC|vnet.FeatureCsum)
	f := ethFrame(gwMAC, guestMAC, 0x0800, 3000)
	tso := vnet.Header{Flags: vnet.HdrFNeedsCsum, GSOType: vnet.GSOTCPv4, GSOSize: 1448, CsumStart: 34, CsumOffset: 16}
	h.Add(qTx, [][]byte{hdrBytes(tso), f})
	h.WaitUsed(qTx)
	if s := d.Stats(); s.TxInvalid != 1 || s.TxFrames != 0 {
		t.Errorf("TSO without HOST_TSO4: stats %v", s)
	}
	d2 := newDevice(t, b, vnet.Options{})
	h2 := harness(t, d2, vnet.FeatureMAC)
	h2.Add(qTx, [][]byte{hdrBytes(vnet.Header{Flags: vnet.HdrFNeedsCsum, CsumStart: 34, CsumOffset: 16}), f[:1514]})
	h2.WaitUsed(qTx)
	if s := d2.Stats(); s.TxInvalid != 1 {
		t.Errorf("NEEDS_CSUM without CSUM: stats %v", s)
	}
	if n := len(b.all()); n != 0 {
		t.Errorf("backend got %d frames", n)
	}
}

func TestTransmitInvalid(t *testing.T) {
	f := ethFrame(gwMAC, guestMAC, 0x0800, 1514)
	f6 := ethFrame(gwMAC, guestMAC, 0x86dd, 1514)
	tso := vnet.Header{Flags: vnet.HdrFNeedsCsum, GSOType: vnet.GSOTCPv4, GSOSize: 1448, CsumStart: 34, CsumOffset: 16}
	with := func(mod func(*vnet.Header)) []byte {
		h := tso
		mod(&h)
		return hdrBytes(h)
	}
	cases := []struct {
		name string
		out  [][]byte
		in   []int
	}{
		{"empty chain", [][]byte{{}}, nil},
		{"header too short", [][]byte{make([]byte, 5)}, nil},
		{"header only", [][]byte{hdrBytes(vnet.Header{})}, nil},
		{"runt frame", [][]byte{hdrBytes(vnet.Header{}), f[:13]}, nil},
		{"frame over 64 KiB", [][]byte{hdrBytes(vnet.Header{}), make([]byte, vnet.MaxFrameLen+1)}, nil},
		{"writable descriptor", [][]byte{hdrBytes(vnet.Header{}), f}, []int{64}},
		{"only writable", nil, []int{1526}},
		{"csum start in Ethernet header", [][]byte{hdrBytes(vnet.Header{Flags: vnet.HdrFNeedsCsum, CsumStart: 2}), f}, nil},
		{"csum beyond frame", [][]byte{hdrBytes(vnet.Header{Flags: vnet.HdrFNeedsCsum, CsumStart: 1500, CsumOffset: 13}), f}, nil},
		{"csum offset overflow", [][]byte{hdrBytes(vnet.Header{Flags: vnet.HdrFNeedsCsum, CsumStart: 0xffff, CsumOffset: 0xffff}), f}, nil},
		{"gso UDP", [][]byte{with(func(h *vnet.Header) { h.GSOType = vnet.GSOUDP }), f}, nil},
		{"gso UDP_L4", [][]byte{with(func(h *vnet.Header) { h.GSOType = vnet.GSOUDPL4 }), f}, nil},
		{"gso ECN", [][]byte{with(func(h *vnet.Header) { h.GSOType |= vnet.GSOECN }), f}, nil},
		{"gso 0x7f", [][]byte{with(func(h *vnet.Header) { h.GSOType = 0x7f }), f}, nil},
		{"gso without NEEDS_CSUM", [][]byte{with(func(h *vnet.Header) { h.Flags = 0 }), f}, nil},
		{"gso size 0", [][]byte{with(func(h *vnet.Header) { h.GSOSize = 0 }), f}, nil},
		{"TCPV4 on IPv6", [][]byte{with(func(h *vnet.Header) {}), f6}, nil},
		{"TCPV6 on IPv4", [][]byte{with(func(h *vnet.Header) { h.GSOType = vnet.GSOTCPv6 }), f}, nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			b := newRecBackend()
			d := newDevice(t, b, vnet.Options{})
			h := harness(t, d, d.Features())
			h.Add(qTx, tc.out, tc.in...)
			if u := h.WaitUsed(qTx); u.Len != 0 {
				t.Errorf("used length %d", u.Len)
			}
			// A valid frame after it still goes through.
			h.Add(qTx, [][]byte{hdrBytes(vnet.Header{}), f})
			h.WaitUsed(qTx)
			got := waitDelivered(t, b, 1)
			if len(got) != 1 || !bytes.Equal(got[0].frame, f) {
				t.Errorf("backend got %d frames, want only the valid one", len(got))
			}
			if s := d.Stats(); s.TxInvalid != 1 || s.TxDropped != 1 || s.TxFrames != 1 {
				t.Errorf("stats %v, want 1 invalid, 1 dropped, 1 frame", s)
			}
			if err := h.FailErr(); err != nil {
				t.Errorf("device failed: %v", err)
			}
		})
	}
}

// TestTransmitIgnoredFlags: flag bits other than NEEDS_CSUM are ignored,
// as the specification requires of the device.
func TestTransmitIgnoredFlags(t *testing.T) {
	b := newRecBackend()
	d := newDevice(t, b, vnet.Options{})
	h := harness(t, d, d.Features())
	f := ethFrame(gwMAC, guestMAC, 0x0800, 100)
	h.Add(qTx, [][]byte{hdrBytes(vnet.Header{Flags: vnet.HdrFDataValid | vnet.HdrFRSCInfo | 0x40}), f})
	h.Add(qTx, [][]byte{hdrBytes(vnet.Header{Flags: 0xff &^ vnet.HdrFNeedsCsum, CsumStart: 0xffff}), f})
	got := waitDelivered(t, b, 2)
	for i, fr := range got {
		if !bytes.Equal(fr.frame, f) || fr.offload != nil {
			t.Errorf("frame %d: offload %v", i, fr.offload)
		}
	}
}

func TestTransmitBackendError(t *testing.T) {
	b := newRecBackend()
	b.err = errors.New("refused")
	d := newDevice(t, b, vnet.Options{})
	h := harness(t, d, d.Features())
	h.Add(qTx, [][]byte{hdrBytes(vnet.Header{}), ethFrame(gwMAC, guestMAC, 0x0800, 100)})
	h.WaitUsed(qTx)
	waitDelivered(t, b, 1)
	if s := d.Stats(); s.TxDropped != 1 || s.TxInvalid != 0 || s.TxFrames != 0 {
		t.Errorf("stats %v", s)
	}
}

func TestReceive(t *testing.T) {
	for _, tc := range []struct {
		name     string
		features uint64
		size     int // receive buffer size
		frame    int
		wantBufs int
	}{
		{"plain", vnet.FeatureMAC, 1526, 1514, 1},
		{"big buffer no mrg", vnet.FeatureMAC | vnet.FeatureGuestTSO4, 65562, vnet.MaxFrameLen, 1},
		{"mergeable one buffer", vnet.FeatureMrgRxbuf, 1526, 1514, 1},
		{"mergeable 1500", vnet.FeatureMrgRxbuf, 1500, 1514, 2},
		{"mergeable 64K in 4K", vnet.FeatureMrgRxbuf, 4096, vnet.MaxFrameLen, 17},
		{"mergeable tiny", vnet.FeatureMrgRxbuf, 64, 1000, 16},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := newDevice(t, discardBackend{}, vnet.Options{})
			h := harness(t, d, tc.features)
			mrg := tc.features&vnet.FeatureMrgRxbuf != 0
			postRx(t, h, 32, tc.size)
			f := ethFrame(guestMAC, gwMAC, 0x0800, tc.frame)
			for i := range 3 {
				f[20] = byte(i)
				if err := d.WriteFrame(f); err != nil {
					t.Fatalf("WriteFrame: %v", err)
				}
				hdr, got := rxFrame(t, h, mrg)
				if !bytes.Equal(got, f) {
					t.Fatalf("frame %d: got %d bytes, want %d (equal %v)", i, len(got), len(f), bytes.Equal(got[:min(len(got), len(f))], f[:min(len(got), len(f))]))
				}
				want := vnet.Header{NumBuffers: uint16(tc.wantBufs)} // 1 without MRG_RXBUF
				if hdr != want {
					t.Errorf("header %+v, want %+v", hdr, want)
				}
				postRx(t, h, tc.wantBufs, tc.size)
			}
			if s := d.Stats(); s.RxFrames != 3 || s.RxBytes != 3*uint64(tc.frame) || s.RxDropped != 0 {
				t.Errorf("stats %v", s)
			}
		})
	}
}

func TestReceiveBufferTooSmall(t *testing.T) {
	d := newDevice(t, discardBackend{}, vnet.Options{})
	h := harness(t, d, vnet.FeatureMAC)
	postRx(t, h, 1, 1000)
	wantRefused(t, d, h, "into a small buffer", ethFrame(guestMAC, gwMAC, 0x0800, 1514), vnet.ErrInvalidPacket, 1)
}

// TestReceiveBadChains: receive chains with readable descriptors, or too
// small for the header, are returned unused and the next chain is used.
func TestReceiveBadChains(t *testing.T) {
	d := newDevice(t, discardBackend{}, vnet.Options{})
	h := harness(t, d, vnet.FeatureMrgRxbuf)
	h.Add(qRx, [][]byte{make([]byte, 100)}, 1526) // readable part
	h.Add(qRx, nil, 4)                            // shorter than the header
	h.Add(qRx, nil, 1526)
	f := ethFrame(guestMAC, gwMAC, 0x0800, 1514)
	if err := d.WriteFrame(f); err != nil {
		t.Fatalf("WriteFrame: %v", err)
	}
	for range 2 {
		if u, ok := h.TryUsed(qRx); !ok || u.Len != 0 {
			t.Fatalf("bad chain: %+v %v, want returned with length 0", u, ok)
		}
	}
	if _, got := rxFrame(t, h, true); !bytes.Equal(got, f) {
		t.Errorf("frame not in the good chain")
	}
	if s := d.Stats(); s.RxInvalid != 2 || s.RxFrames != 1 {
		t.Errorf("stats %v", s)
	}
}

func TestReceiveNotReady(t *testing.T) {
	d := newDevice(t, discardBackend{}, vnet.Options{})
	f := ethFrame(guestMAC, gwMAC, 0x0800, 100)
	if err := d.WriteFrame(f); !errors.Is(err, vnet.ErrNotReady) {
		t.Errorf("before activation: %v, want ErrNotReady", err)
	}
	h := harness(t, d, vnet.FeatureMrgRxbuf)
	d.Reset()
	if err := d.WriteFrame(f); !errors.Is(err, vnet.ErrNotReady) {
		t.Errorf("after reset: %v, want ErrNotReady", err)
	}
	h.Activate()
	d.Close()
	if err := d.WriteFrame(f); !errors.Is(err, vnet.ErrClosed) {
		t.Errorf("after close: %v, want ErrClosed", err)
	}
	if err := d.Activate(h.Activation()); !errors.Is(err, virtio.ErrClosed) {
		t.Errorf("Activate after Close: %v", err)
	}
}

func TestReceiveNoBuffers(t *testing.T) {
	d := newDevice(t, discardBackend{}, vnet.Options{RxTimeout: time.Millisecond})
	h := harness(t, d, vnet.FeatureMrgRxbuf)
	f := ethFrame(guestMAC, gwMAC, 0x0800, 3000)
	if err := d.WriteFrame(f); !errors.Is(err, vnet.ErrNoBuffers) {
		t.Fatalf("empty ring: %v, want ErrNoBuffers", err)
	}
	// Too few buffers: the ones taken come back empty.
	postRx(t, h, 1, 1500)
	wantRefused(t, d, h, "with one buffer for three", f, vnet.ErrNoBuffers, 2)
}

// TestReceiveWaitsForBuffers: a frame waits for the guest to post buffers
// and is delivered when it does.
func TestReceiveWaitsForBuffers(t *testing.T) {
	d := newDevice(t, discardBackend{}, vnet.Options{RxTimeout: time.Hour})
	h := harness(t, d, vnet.FeatureMrgRxbuf)
	f := ethFrame(guestMAC, gwMAC, 0x0800, 1514)
	done := make(chan error, 1)
	go func() { done <- d.WriteFrame(f) }()
	postRx(t, h, 2, 1000)
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("WriteFrame: %v", err)
		}
	case <-time.After(virtiotest.WaitTimeout):
		t.Fatal("WriteFrame did not see the posted buffers")
	}
	if _, got := rxFrame(t, h, true); !bytes.Equal(got, f) {
		t.Error("frame mismatch")
	}
}

// TestReceiveUnblockedByReset: Reset and Close end WriteFrame calls
// waiting for buffers, including ones waiting for the receive lock.
func TestReceiveUnblockedByReset(t *testing.T) {
	for _, stop := range []string{"Reset", "Close"} {
		t.Run(stop, func(t *testing.T) {
			d := newDevice(t, discardBackend{}, vnet.Options{RxTimeout: time.Hour})
			harness(t, d, vnet.FeatureMrgRxbuf)
			f := ethFrame(guestMAC, gwMAC, 0x0800, 1514)
			errs := make(chan error, 4)
			for range 4 {
				go func() { errs <- d.WriteFrame(f) }()
			}
			time.Sleep(10 * time.Millisecond) // let them block (the test passes either way)
			if stop == "Reset" {
				d.Reset()
			} else {
				d.Close()
			}
			for range 4 {
				select {
				case err := <-errs:
					want := vnet.ErrNotReady
					if stop == "Close" {
						want = vnet.ErrClosed
					}
					if !errors.Is(err, want) {
						t.Errorf("WriteFrame after %s: %v, want %v", stop, err, want)
					}
				case <-time.After(virtiotest.WaitTimeout):
					t.Fatalf("WriteFrame still blocked after %s", stop)
				}
			}
		})
	}
}

// TestReceiveBrokenRing: a corrupted receive ring fails the device with a
// QueueError and WriteFrame returns ErrBroken.
func TestReceiveBrokenRing(t *testing.T) {
	for _, c := range virtiotest.HostileRings() {
		t.Run(c.Name, func(t *testing.T) {
			d := newDevice(t, discardBackend{}, vnet.Options{})
			h := harness(t, d, vnet.FeatureMrgRxbuf)
			c.Setup(h.Queues[qRx])
			h.Kick(qRx)
			err := d.WriteFrame(ethFrame(guestMAC, gwMAC, 0x0800, 100))
			if !errors.Is(err, vnet.ErrBroken) || !errors.Is(err, c.Want) {
				t.Fatalf("WriteFrame: %v, want ErrBroken and %v", err, c.Want)
			}
			var qe *virtio.QueueError
			if !errors.As(h.FailErr(), &qe) || qe.Queue != qRx {
				t.Errorf("Fail(%v), want a QueueError on queue %d", h.FailErr(), qRx)
			}
			if err := d.WriteFrame(ethFrame(guestMAC, gwMAC, 0x0800, 100)); !errors.Is(err, vnet.ErrBroken) {
				t.Errorf("second WriteFrame: %v", err)
			}
		})
	}
}

func TestReceiveBadFrames(t *testing.T) {
	d := newDevice(t, discardBackend{}, vnet.Options{})
	h := harness(t, d, vnet.FeatureMrgRxbuf)
	postRx(t, h, 64, 4096)
	for _, n := range []int{0, 13, vnet.MaxFrameLen + 1} {
		if err := d.WriteFrame(make([]byte, n)); !errors.Is(err, vnet.ErrInvalidPacket) {
			t.Errorf("WriteFrame(%d bytes) = %v, want ErrInvalidPacket", n, err)
		}
	}
	if _, ok := h.TryUsed(qRx); ok {
		t.Error("a buffer was used for an invalid frame")
	}
}

// TestReceiveConcurrent: many goroutines write frames while the driver
// refills; every frame arrives intact.
func TestReceiveConcurrent(t *testing.T) {
	d := newDevice(t, discardBackend{}, vnet.Options{RxTimeout: time.Hour})
	h := harness(t, d, vnet.FeatureMrgRxbuf)
	const writers, per = 8, 50
	var wg sync.WaitGroup
	errs := make(chan error, writers*per)
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range per {
				f := ethFrame(guestMAC, gwMAC, 0x0800, 200+i*20)
				f[14], f[15] = byte(w), byte(i)
				if err := d.WriteFrame(f); err != nil {
					errs <- err
				}
			}
		}()
	}
	seen := map[[2]byte]bool{}
	postRx(t, h, 128, 1024)
	deadline := time.After(virtiotest.WaitTimeout)
	for len(seen) < writers*per {
		u, ok := h.TryUsed(qRx)
		if !ok {
			select {
			case <-h.Interrupts(qRx):
			case err := <-errs:
				t.Fatalf("WriteFrame: %v", err)
			case <-deadline:
				t.Fatalf("got %d frames of %d", len(seen), writers*per)
			}
			continue
		}
		hdr, _ := vnet.ParseHeader(u.Written)
		data := u.Written[vnet.HeaderLen:]
		for i := 1; i < int(hdr.NumBuffers); i++ {
			var more virtiotest.Used
			for {
				if more, ok = h.TryUsed(qRx); ok {
					break
				}
				<-h.Interrupts(qRx)
			}
			data = append(data, more.Written...)
		}
		i := int(data[15])
		want := ethFrame(guestMAC, gwMAC, 0x0800, 200+i*20)
		want[14], want[15] = data[14], data[15]
		if !bytes.Equal(data, want) {
			t.Fatalf("frame %d/%d corrupted (%d bytes)", data[14], i, len(data))
		}
		seen[[2]byte{data[14], data[15]}] = true
		postRx(t, h, int(hdr.NumBuffers), 1024)
	}
	wg.Wait()
}

func TestReceiveOffload(t *testing.T) {
	seg4 := tcpSegment(t, false, 20000)
	seg6 := tcpSegment(t, true, 20000)
	o4 := netstack.Offload{NeedsChecksum: true, ChecksumStart: 34, ChecksumOffset: 16, Segmented: true, SegmentSize: 1448}
	o6 := netstack.Offload{NeedsChecksum: true, ChecksumStart: 54, ChecksumOffset: 16, Segmented: true, SegmentSize: 1428}
	t.Run("negotiated", func(t *testing.T) {
		d := newDevice(t, discardBackend{}, vnet.Options{})
		h := harness(t, d, d.Features())
		postRx(t, h, 64, 4096)
		for _, c := range []struct {
			f       []byte
			o       netstack.Offload
			gsoType uint8
		}{{seg4, o4, vnet.GSOTCPv4}, {seg6, o6, vnet.GSOTCPv6}} {
			if err := d.WriteFrameOffload(c.f, c.o); err != nil {
				t.Fatal(err)
			}
			hdr, got := rxFrame(t, h, true)
			if !bytes.Equal(got, c.f) {
				t.Error("segment changed")
			}
			want := vnet.Header{Flags: vnet.HdrFNeedsCsum, GSOType: c.gsoType, GSOSize: c.o.SegmentSize,
				CsumStart: c.o.ChecksumStart, CsumOffset: c.o.ChecksumOffset, HdrLen: c.o.ChecksumStart + 20, NumBuffers: hdr.NumBuffers}
			if hdr != want {
				t.Errorf("header %+v, want %+v", hdr, want)
			}
		}
		// A small segment with a partial checksum only.
		small := tcpSegment(t, false, 100)
		if err := d.WriteFrameOffload(small, netstack.Offload{NeedsChecksum: true, ChecksumStart: 34, ChecksumOffset: 16, SegmentSize: 1448}); err != nil {
			t.Fatal(err)
		}
		if hdr, _ := rxFrame(t, h, true); hdr.Flags != vnet.HdrFNeedsCsum || hdr.GSOType != vnet.GSONone || hdr.CsumStart != 34 {
			t.Errorf("small segment header %+v", hdr)
		}
		// Plain frames are marked DATA_VALID under GUEST_CSUM.
		if err := d.WriteFrame(ethFrame(guestMAC, gwMAC, 0x0806, 42)); err != nil {
			t.Fatal(err)
		}
		if hdr, _ := rxFrame(t, h, true); hdr.Flags != vnet.HdrFDataValid {
			t.Errorf("plain frame header %+v", hdr)
		}
	})
	t.Run("software fallback", func(t *testing.T) {
		d := newDevice(t, discardBackend{}, vnet.Options{})
		h := harness(t, d, vnet.FeatureMrgRxbuf)
		postRx(t, h, 128, 2048)
		for _, c := range []struct {
			f  []byte
			o  netstack.Offload
			v6 bool
		}{{seg4, o4, false}, {seg6, o6, true}} {
			if err := d.WriteFrameOffload(c.f, c.o); err != nil {
				t.Fatal(err)
			}
			var payload []byte
			n := 0
			for {
				u, ok := h.TryUsed(qRx)
				if !ok {
					break
				}
				hdr, _ := vnet.ParseHeader(u.Written)
				if hdr.Flags != 0 || hdr.GSOType != 0 || hdr.NumBuffers != 1 {
					t.Fatalf("segment header %+v", hdr)
				}
				seg := u.Written[vnet.HeaderLen:]
				payload = append(payload, checkSegment(t, seg, c.v6, int(c.o.SegmentSize))...)
				n++
			}
			if n != (20000+int(c.o.SegmentSize)-1)/int(c.o.SegmentSize) {
				t.Errorf("%d segments", n)
			}
			if !bytes.Equal(payload, c.f[int(c.o.ChecksumStart)+20:]) {
				t.Errorf("payload of %d bytes differs from the %d sent", len(payload), len(c.f)-int(c.o.ChecksumStart)-20)
			}
			postRx(t, h, n, 2048)
		}
		// A checksum-only frame gets its checksum completed.
		small := tcpSegment(t, false, 100)
		if err := d.WriteFrameOffload(small, netstack.Offload{NeedsChecksum: true, ChecksumStart: 34, ChecksumOffset: 16}); err != nil {
			t.Fatal(err)
		}
		_, got := rxFrame(t, h, true)
		checkSegment(t, got, false, 1448)
	})
	t.Run("invalid", func(t *testing.T) {
		d := newDevice(t, discardBackend{}, vnet.Options{})
		h := harness(t, d, vnet.FeatureMrgRxbuf)
		postRx(t, h, 64, 4096)
		for _, o := range []netstack.Offload{
			{NeedsChecksum: true, ChecksumStart: 2},
			{NeedsChecksum: true, ChecksumStart: 34, ChecksumOffset: 0xffff},
			{NeedsChecksum: true, ChecksumStart: 34, ChecksumOffset: 16, Segmented: true},
			{NeedsChecksum: true, ChecksumStart: 30, ChecksumOffset: 16, Segmented: true, SegmentSize: 100},
		} {
			if err := d.WriteFrameOffload(seg4, o); !errors.Is(err, vnet.ErrInvalidPacket) {
				t.Errorf("%+v: %v, want ErrInvalidPacket", o, err)
			}
		}
	})
}

// TestReceiveOverMTU: with VIRTIO_NET_F_MTU negotiated, a frame larger
// than the announced MTU is refused rather than passed to the guest.
func TestReceiveOverMTU(t *testing.T) {
	d := newDevice(t, discardBackend{}, vnet.Options{MTU: 1500})
	h := harness(t, d, vnet.FeatureMrgRxbuf|vnet.FeatureMTU)
	postRx(t, h, 8, 4096)
	if err := d.WriteFrame(ethFrame(guestMAC, gwMAC, 0x0800, 1515)); !errors.Is(err, vnet.ErrInvalidPacket) {
		t.Errorf("1515-byte frame at MTU 1500: %v, want ErrInvalidPacket", err)
	}
	if err := d.WriteFrame(ethFrame(guestMAC, gwMAC, 0x0800, 1514)); err != nil {
		t.Errorf("1514-byte frame at MTU 1500: %v", err)
	}
}

// TestReceiveTinyBuffers: a frame that needs more mergeable buffers than
// the ring holds is dropped and every buffer taken is returned.
func TestReceiveTinyBuffers(t *testing.T) {
	d := newDevice(t, discardBackend{}, vnet.Options{RxTimeout: time.Hour})
	h := virtiotest.NewHarness(t, d, virtiotest.HarnessOptions{Features: vnet.FeatureMrgRxbuf | baseFeatures, QueueSize: 8})
	postRx(t, h, 8, 16)
	if err := d.WriteFrame(ethFrame(guestMAC, gwMAC, 0x0800, 1514)); !errors.Is(err, vnet.ErrInvalidPacket) {
		t.Fatalf("WriteFrame: %v, want ErrInvalidPacket", err)
	}
	for i := range 8 {
		if u, ok := h.TryUsed(qRx); !ok || u.Len != 0 {
			t.Fatalf("buffer %d: %+v %v, want returned empty", i, u, ok)
		}
	}
	// A frame that fits 8 buffers still goes through.
	postRx(t, h, 8, 16)
	f := ethFrame(guestMAC, gwMAC, 0x0800, 100)
	if err := d.WriteFrame(f); err != nil {
		t.Fatal(err)
	}
	if _, got := rxFrame(t, h, true); !bytes.Equal(got, f) {
		t.Error("frame differs")
	}
}

// TestReceiveSegmentWithCWR: a TSO segment with CWR set is cut by the
// device, since GUEST_ECN is not offered.
func TestReceiveSegmentWithCWR(t *testing.T) {
	d := newDevice(t, discardBackend{}, vnet.Options{})
	h := harness(t, d, d.Features())
	postRx(t, h, 64, 2048)
	seg := tcpSegment(t, false, 3000)
	seg[34+13] |= 0x80 // CWR
	if err := d.WriteFrameOffload(seg, netstack.Offload{NeedsChecksum: true, ChecksumStart: 34, ChecksumOffset: 16, Segmented: true, SegmentSize: 1448}); err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		hdr, got := rxFrame(t, h, true)
		if hdr.GSOType != vnet.GSONone {
			t.Fatalf("segment %d: header %+v", i, hdr)
		}
		checkSegment(t, got, false, 1448)
		if cwr := got[34+13]&0x80 != 0; cwr != (i == 0) {
			t.Errorf("segment %d: CWR %v", i, cwr)
		}
	}
}
