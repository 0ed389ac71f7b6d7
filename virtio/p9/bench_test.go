package p9_test

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/hugelgupf/p9/fsimpl/localfs"
	ninep "github.com/hugelgupf/p9/p9"
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
