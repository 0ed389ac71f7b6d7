// Package rng is the virtio entropy device (virtio-rng, VIRTIO 1.2 section
// 5.4): the guest's hwrng, filled from crypto/rand.
package rng

import (
	"crypto/rand"
	"io"
	"sync"

	"github.com/gosandbox/sandbox/virtio"
)

// QueueSize is the size of the request queue.
const QueueSize = 64

// MaxRequest caps the bytes returned for one request; the guest asks again
// for more.
const MaxRequest = 64 << 10

// Device is a virtio entropy device.
type Device struct {
	src     io.Reader
	workers virtio.Workers

	mu     sync.Mutex
	closed bool
}

var _ virtio.Device = (*Device)(nil)

// New returns an entropy device reading from src; nil means crypto/rand.
func New(src io.Reader) *Device {
	if src == nil {
		src = rand.Reader
	}
	return &Device{src: src}
}

// Type implements virtio.Device.
func (d *Device) Type() virtio.DeviceType { return virtio.TypeEntropy }

// Features implements virtio.Device: the device has none of its own.
func (d *Device) Features() uint64 { return 0 }

// QueueSizes implements virtio.Device: one request queue.
func (d *Device) QueueSizes() []uint16 { return []uint16{QueueSize} }

// ConfigSize implements virtio.Device: no config space.
func (d *Device) ConfigSize() int { return 0 }

// ReadConfig implements virtio.Device.
func (d *Device) ReadConfig(int, []byte) {}

// WriteConfig implements virtio.Device.
func (d *Device) WriteConfig(int, []byte) {}

// Activate implements virtio.Device.
func (d *Device) Activate(a *virtio.Activation) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return virtio.ErrClosed
	}
	q := a.Queues[0]
	if q == nil {
		return nil
	}
	d.workers.Go(func(stop <-chan struct{}) { d.serve(q, a, stop) })
	return nil
}

func (d *Device) serve(q *virtio.Queue, a *virtio.Activation, stop <-chan struct{}) {
	var ch virtio.Chain
	buf := make([]byte, 4096)
	for q.Wait(stop) {
		for {
			ok, err := q.Pop(&ch)
			if err != nil || !ok {
				break
			}
			want := min(ch.WritableLen(), MaxRequest)
			written := 0
			for written < want {
				n := min(want-written, len(buf))
				if _, err := io.ReadFull(d.src, buf[:n]); err != nil {
					a.Fail(err)
					return
				}
				ch.CopyToGuest(written, buf[:n])
				written += n
			}
			q.Push(ch.Head, uint32(written))
		}
		q.Notify()
	}
}

// Reset implements virtio.Device.
func (d *Device) Reset() { d.workers.Stop() }

// Close implements virtio.Device.
func (d *Device) Close() error {
	d.mu.Lock()
	d.closed = true
	d.mu.Unlock()
	d.workers.Stop()
	return nil
}
