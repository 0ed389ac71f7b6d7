package net_test

import (
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

const (
	qRx = 0
	qTx = 1
)

var (
	guestMAC = stdnet.HardwareAddr{0x52, 0x54, 0x00, 0x12, 0x34, 0x56}
	gwMAC    = stdnet.HardwareAddr{0x52, 0x54, 0x00, 0xaa, 0xbb, 0xcc}
)

// delivered is one frame the backend received.
type delivered struct {
	frame   []byte
	offload *netstack.Offload
}

// recBackend records what the device delivers.
type recBackend struct {
	mu     sync.Mutex
	frames []delivered
	err    error
	got    chan struct{}
}

func newRecBackend() *recBackend { return &recBackend{got: make(chan struct{}, 1)} }

func (b *recBackend) add(d delivered) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.frames = append(b.frames, d)
	select {
	case b.got <- struct{}{}:
	default:
	}
	return b.err
}

func (b *recBackend) DeliverFrame(f []byte) error {
	return b.add(delivered{frame: append([]byte(nil), f...)})
}

func (b *recBackend) DeliverFrameOffload(f []byte, o netstack.Offload) error {
	return b.add(delivered{frame: append([]byte(nil), f...), offload: &o})
}

func (b *recBackend) all() []delivered {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]delivered(nil), b.frames...)
}

// discardBackend accepts and forgets frames.
type discardBackend struct{}

func (discardBackend) DeliverFrame([]byte) error                          { return nil }
func (discardBackend) DeliverFrameOffload([]byte, netstack.Offload) error { return nil }

func newDevice(t testing.TB, b vnet.Backend, opts vnet.Options) *vnet.Device {
	t.Helper()
	if opts.MAC == nil {
		opts.MAC = guestMAC
	}
	opts.Backend = b
	d, err := vnet.New(opts)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	return d
}

// baseFeatures is what a modern driver always negotiates.
const baseFeatures = virtio.FeatureVersion1 | virtio.FeatureEventIdx | virtio.FeatureIndirectDesc

// harness activates dev with the given device features (plus the base
// ones) and room for 64 KiB frames in every descriptor slot.
func harness(t testing.TB, dev virtio.Device, features uint64) *virtiotest.Harness {
	t.Helper()
	return virtiotest.NewHarness(t, dev, virtiotest.HarnessOptions{
		Features:     features | baseFeatures,
		DataPerQueue: vnet.QueueSize * 128 << 10,
	})
}

// ethFrame builds an Ethernet frame of n bytes in total.
func ethFrame(dst, src stdnet.HardwareAddr, etherType uint16, n int) []byte {
	f := make([]byte, n)
	copy(f, dst)
	copy(f[6:], src)
	binary.BigEndian.PutUint16(f[12:], etherType)
	for i := 14; i < n; i++ {
		f[i] = byte(i * 7)
	}
	return f
}

func hdrBytes(h vnet.Header) []byte {
	b := make([]byte, vnet.HeaderLen)
	h.Encode(b)
	return b
}

// waitDelivered waits until the backend has n frames.
func waitDelivered(t testing.TB, b *recBackend, n int) []delivered {
	t.Helper()
	deadline := time.After(virtiotest.WaitTimeout)
	for {
		if fs := b.all(); len(fs) >= n {
			return fs
		}
		select {
		case <-b.got:
		case <-deadline:
			t.Fatalf("backend got %d frames, want %d", len(b.all()), n)
		}
	}
}

// postRx posts n receive chains of size bytes each.
func postRx(t testing.TB, h *virtiotest.Harness, n, size int) {
	t.Helper()
	for range n {
		if _, err := h.Queues[qRx].Add(nil, size); err != nil {
			t.Fatalf("post rx: %v", err)
		}
	}
	h.Kick(qRx)
}

// rxFrame reads one received frame (with mergeable buffers, all its
// buffers) and returns its header and frame bytes.
func rxFrame(t testing.TB, h *virtiotest.Harness, mrg bool) (vnet.Header, []byte) {
	t.Helper()
	u, ok := h.TryUsed(qRx)
	if !ok {
		t.Fatalf("no used receive buffer")
	}
	if len(u.Written) < vnet.HeaderLen {
		t.Fatalf("used receive buffer of %d bytes", len(u.Written))
	}
	hdr, err := vnet.ParseHeader(u.Written)
	if err != nil {
		t.Fatal(err)
	}
	data := append([]byte(nil), u.Written[vnet.HeaderLen:]...)
	if mrg {
		if hdr.NumBuffers == 0 {
			t.Fatalf("num_buffers 0")
		}
		for i := 1; i < int(hdr.NumBuffers); i++ {
			u, ok := h.TryUsed(qRx)
			if !ok {
				t.Fatalf("num_buffers %d, only %d used", hdr.NumBuffers, i)
			}
			data = append(data, u.Written...)
		}
	}
	return hdr, data
}

// wantRefused writes f (what says how) and expects the device to refuse
// it with want, to return the one receive buffer it took empty, and to
// count dropped frames in total.
func wantRefused(t testing.TB, d *vnet.Device, h *virtiotest.Harness, what string, f []byte, want error, dropped uint64) {
	t.Helper()
	if err := d.WriteFrame(f); !errors.Is(err, want) {
		t.Fatalf("WriteFrame %s: %v, want %v", what, err, want)
	}
	if u, ok := h.TryUsed(qRx); !ok || u.Len != 0 {
		t.Errorf("WriteFrame %s: buffer not returned empty: %+v %v", what, u, ok)
	}
	if s := d.Stats(); s.RxDropped != dropped {
		t.Errorf("WriteFrame %s: stats %v, want %d dropped", what, s, dropped)
	}
}

func isErr(err, target error) bool { return errors.Is(err, target) }
