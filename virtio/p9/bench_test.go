package p9_test

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/hugelgupf/p9/fsimpl/localfs"
	ninep "github.com/hugelgupf/p9/p9"

	"github.com/gosandbox/sandbox/virtio/p9"
	"github.com/gosandbox/sandbox/virtio/virtiotest"
)

// BenchmarkSequentialRead reads a 64 MiB file front to back through the
// device (p9 client -> virtqueue chains -> device -> p9 server -> localfs)
// at several msize values. MB/s is the device's throughput with the page
// cache warm; compare runs with benchstat.
func BenchmarkSequentialRead(b *testing.B) {
	const size = 64 << 20
	dir := b.TempDir()
	data := pattern(size, 3)
	if err := os.WriteFile(filepath.Join(dir, "big"), data, 0o644); err != nil {
		b.Fatal(err)
	}
	for _, msize := range []int{4 << 10, 64 << 10, 512 << 10, 1 << 20} {
		b.Run(fmt.Sprintf("msize=%dKiB", msize>>10), func(b *testing.B) {
			c, h, _ := newClient(b, localfs.Attacher(dir), msize)
			root, err := c.Attach("/")
			if err != nil {
				b.Fatal(err)
			}
			_, f, err := root.Walk([]string{"big"})
			if err != nil {
				b.Fatal(err)
			}
			if _, _, err := f.Open(ninep.ReadOnly); err != nil {
				b.Fatal(err)
			}
			buf := make([]byte, 1<<20)
			b.SetBytes(size)
			b.ReportAllocs()
			b.ResetTimer()
			for b.Loop() {
				total := 0
				for total < size {
					n, err := f.ReadAt(buf, int64(total))
					if n == 0 || (err != nil && n < len(buf) && total+n < size) {
						b.Fatalf("read at %d: %d bytes, %v", total, n, err)
					}
					total += n
				}
			}
			b.StopTimer()
			if err := h.FailErr(); err != nil {
				b.Fatal(err)
			}
		})
	}
}

// BenchmarkReadRequest measures one Tread round trip through the device
// and the 9P server alone: the driver side reuses one request and one
// response buffer in guest memory (no client, no copies out), so B/op and
// allocs/op are the device's and hugelgupf/p9's own per-request cost.
func BenchmarkReadRequest(b *testing.B) {
	const fileSize = 8 << 20
	dir := b.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "f"), pattern(fileSize, 5), 0o644); err != nil {
		b.Fatal(err)
	}
	for _, count := range []int{4 << 10, 64 << 10, 512 << 10} {
		b.Run(fmt.Sprintf("count=%dKiB", count>>10), func(b *testing.B) {
			dev, err := p9.New(p9.Options{Tag: "bench", Attacher: localfs.Attacher(dir), MaxMessage: 1 << 20})
			if err != nil {
				b.Fatal(err)
			}
			h := virtiotest.NewHarness(b, dev, virtiotest.HarnessOptions{QueueSize: 8, DataPerQueue: 8 * (2 << 20), Features: features(dev)})
			r := &rawDevice{t: b, dev: dev, h: h}
			expect(b, r.do(tversion(0xffff, 1<<20), 64), tRversion, 0xffff)
			expect(b, r.do(tattach(1, 1), 64), tRattach, 1)
			expect(b, r.do(twalk(2, 1, 2, "f"), 64), tRwalk, 2)
			expect(b, r.do(tlopen(3, 2), 64), 13, 3)
			q := h.Queues[0]
			reqAddr, respAddr := q.DataBase, q.DataBase+4096
			off := uint64(0)
			b.SetBytes(int64(count))
			b.ReportAllocs()
			b.ResetTimer()
			for b.Loop() {
				m := tread(7, 2, off, uint32(count))
				off = (off + uint64(count)) % (fileSize - uint64(count))
				h.Mem.WriteAt(m, reqAddr)
				if _, err := q.AddBuffers([]virtiotest.Buffer{{Addr: reqAddr, Len: uint32(len(m))}, {Addr: respAddr, Len: uint32(count + 11), Write: true}}); err != nil {
					b.Fatal(err)
				}
				h.Kick(0)
				for {
					u, ok, err := q.PopUsed()
					if err != nil {
						b.Fatal(err)
					}
					if ok {
						if int(u.Len) != count+11 {
							b.Fatalf("used length %d, want %d", u.Len, count+11)
						}
						break
					}
					select {
					case <-h.Interrupts(0):
					case <-h.Failed():
						b.Fatal(h.FailErr())
					}
				}
			}
		})
	}
}
