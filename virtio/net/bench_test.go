package net_test

import (
	"fmt"
	"io"
	stdnet "net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/gosandbox/sandbox/virtio"
	vnet "github.com/gosandbox/sandbox/virtio/net"
	"github.com/gosandbox/sandbox/virtio/virtiotest"
)

// rawRing drives one queue with fixed single-descriptor chains (descriptor
// i is buffer i, written once), recycling each as the device returns it:
// the driver side costs no allocation or copy, so a benchmark measures
// the device.
type rawRing struct {
	h        *virtiotest.Harness
	qi       int
	q        *virtiotest.DriverQueue
	lastUsed uint16
}

func newRawRing(h *virtiotest.Harness, qi int, bufAddr func(i uint16) uint64, bufLen uint32, write bool) *rawRing {
	q := h.Queues[qi]
	var flags uint16
	if write {
		flags = virtio.DescFWrite
	}
	for i := range q.Size {
		q.WriteDesc(i, bufAddr(i), bufLen, flags, 0)
	}
	return &rawRing{h: h, qi: qi, q: q}
}

// publish makes n chains available (the first n descriptors).
func (r *rawRing) publish(n uint16) {
	for i := range n {
		r.q.PublishRaw(i, 1)
	}
	r.h.Kick(r.qi)
}

// recycle returns every used chain to the avail ring and reports how many
// there were, asking for an interrupt at the next one.
func (r *rawRing) recycle() int {
	n := 0
	for {
		used := r.q.UsedIdx()
		for r.lastUsed != used {
			head, _ := r.h.Mem.Uint32(r.q.Used + 4 + 8*uint64(r.lastUsed%r.q.Size))
			r.lastUsed++
			r.q.PublishRaw(uint16(head), 1)
			n++
		}
		r.h.Mem.PutUint16(r.q.Avail+4+2*uint64(r.q.Size), r.lastUsed) // used_event
		if r.q.UsedIdx() == used {
			break
		}
	}
	if n > 0 {
		r.h.Kick(r.qi)
	}
	return n
}

// BenchmarkTransmit measures guest→host frames through the device: the
// driver keeps the transmit ring full of one frame (header included)
// written once into guest memory; the device copies each out, validates
// it and hands it to a backend that discards it.
func BenchmarkTransmit(b *testing.B) {
	for _, size := range []int{1514, vnet.MaxFrameLen} {
		b.Run(fmt.Sprintf("frame=%d", size), func(b *testing.B) {
			d := newDevice(b, discardBackend{}, vnet.Options{})
			h := harness(b, d, vnet.FeatureMrgRxbuf)
			q := h.Queues[qTx]
			pkt := append(hdrBytes(vnet.Header{}), ethFrame(gwMAC, guestMAC, 0x0800, size)...)
			h.Mem.WriteAt(pkt, q.DataBase)
			r := newRawRing(h, qTx, func(uint16) uint64 { return q.DataBase }, uint32(len(pkt)), false)
			b.SetBytes(int64(size))
			b.ReportAllocs()
			b.ResetTimer()
			inFlight := min(b.N, int(q.Size))
			r.publish(uint16(inFlight))
			sent := inFlight
			for done := 0; done < b.N; {
				n := r.recycle() // republishes n chains
				done += n
				sent += n
				if n == 0 {
					<-h.Interrupts(qTx)
				}
			}
			b.StopTimer()
			if s := d.Stats(); s.TxFrames < uint64(b.N) {
				b.Fatalf("stats %v, want %d frames", s, b.N)
			}
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "frames/s")
		})
	}
}

// BenchmarkReceive measures host→guest frames through WriteFrame while a
// driver goroutine keeps the receive ring full: 4 KiB mergeable buffers
// (as Linux posts), or one 64 KiB buffer per frame without them.
func BenchmarkReceive(b *testing.B) {
	for _, tc := range []struct {
		name     string
		features uint64
		bufSize  uint32
	}{
		{"mergeable", vnet.FeatureMrgRxbuf, 4096},
		{"big", 0, vnet.HeaderLen + vnet.MaxFrameLen},
	} {
		for _, size := range []int{1514, vnet.MaxFrameLen} {
			b.Run(fmt.Sprintf("%s/frame=%d", tc.name, size), func(b *testing.B) {
				d := newDevice(b, discardBackend{}, vnet.Options{RxTimeout: time.Hour})
				h := harness(b, d, tc.features|vnet.FeatureMAC)
				q := h.Queues[qRx]
				r := newRawRing(h, qRx, func(i uint16) uint64 { return q.DataBase + uint64(i)*uint64(tc.bufSize) }, tc.bufSize, true)
				r.publish(q.Size)
				stop := make(chan struct{})
				var wg sync.WaitGroup
				wg.Add(1)
				go func() {
					defer wg.Done()
					for {
						if r.recycle() > 0 {
							continue
						}
						select {
						case <-h.Interrupts(qRx):
						case <-stop:
							return
						}
					}
				}()
				frame := ethFrame(guestMAC, gwMAC, 0x0800, size)
				b.SetBytes(int64(size))
				b.ReportAllocs()
				b.ResetTimer()
				for range b.N {
					if err := d.WriteFrame(frame); err != nil {
						b.Fatal(err)
					}
				}
				b.StopTimer()
				close(stop)
				wg.Wait()
				b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "frames/s")
			})
		}
	}
}

// BenchmarkEndToEndTCP measures one TCP stream between a gVisor stack
// playing the guest (over the virtiotest driver and this device) and a
// host loopback socket, through the real netstack: "up" is guest→host,
// "down" host→guest, 64 KiB per op. It includes both gVisor stacks, the
// netstack proxy and the host socket, so it bounds what a guest sees
// rather than measuring the device alone.
func BenchmarkEndToEndTCP(b *testing.B) {
	const chunk = 64 << 10
	all := uint64(allFeatures)
	plain := uint64(vnet.FeatureMAC | vnet.FeatureMTU | vnet.FeatureStatus | vnet.FeatureMrgRxbuf)
	for _, tc := range []struct {
		name     string
		features uint64
		mtu      int
	}{
		{"mtu=1500", plain, 1500},
		{"mtu=1500+offloads", all, 1500},
		{"mtu=65520", plain, 65520},
	} {
		for _, dir := range []string{"up", "down"} {
			b.Run(tc.name+"/"+dir, func(b *testing.B) {
				l, err := stdnet.Listen("tcp", "127.0.0.1:0")
				if err != nil {
					b.Fatal(err)
				}
				defer l.Close()
				served := make(chan int64, 1)
				go func() {
					c, err := l.Accept()
					if err != nil {
						served <- -1
						return
					}
					defer c.Close()
					if dir == "up" {
						n, _ := io.Copy(io.Discard, c)
						served <- n
						return
					}
					buf := make([]byte, chunk)
					var n int64
					for range b.N {
						k, err := c.Write(buf)
						n += int64(k)
						if err != nil {
							break
						}
					}
					served <- n
				}()
				g := newVirtioGuest(b, tc.features, tc.mtu)
				c, err := g.dialTCP(netip.AddrPortFrom(g.n.Guest().GatewayIPv4, uint16(l.Addr().(*stdnet.TCPAddr).Port)))
				if err != nil {
					b.Fatal(err)
				}
				defer c.Close()
				buf := make([]byte, chunk)
				b.SetBytes(chunk)
				b.ReportAllocs()
				b.ResetTimer()
				if dir == "up" {
					for range b.N {
						if _, err := c.Write(buf); err != nil {
							b.Fatal(err)
						}
					}
					c.CloseWrite()
					if n := <-served; n != int64(b.N)*chunk {
						b.Fatalf("host got %d bytes, want %d", n, int64(b.N)*chunk)
					}
				} else {
					if _, err := io.ReadFull(c, make([]byte, int64(b.N)*chunk)); err != nil {
						b.Fatalf("read: %v (device %v)", err, g.dev)
					}
					<-served
				}
				b.StopTimer()
				s := g.dev.Stats()
				b.ReportMetric(float64(s.RxDropped+s.TxDropped)/float64(b.N), "drops/op")
			})
		}
	}
}
