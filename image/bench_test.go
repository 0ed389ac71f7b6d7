package image

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"io"
	"math/rand"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/gosandbox/sandbox/internal/testimage"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/gosandbox/sandbox/image/squashfs"
	"golang.org/x/sys/unix"
)

// syntheticLayer is ~48 MiB of files shaped like a distro layer: many small
// text files, some mid-size, a few large binaries-like ones.
func syntheticLayer(b testing.TB) []byte {
	rnd := rand.New(rand.NewSource(7))
	words := strings.Fields("the quick brown fox jumps over lazy dog import def return class self none true false for while if else elif print module package lib usr share doc python")
	text := func(n int) string {
		var sb strings.Builder
		for sb.Len() < n {
			sb.WriteString(words[rnd.Intn(len(words))])
			if rnd.Intn(8) == 0 {
				sb.WriteByte('\n')
			} else {
				sb.WriteByte(' ')
			}
		}
		return sb.String()[:n]
	}
	bin := func(n int) string {
		p := make([]byte, n)
		for i := 0; i < n; i += 64 {
			if rnd.Intn(3) == 0 {
				rnd.Read(p[i:min(i+64, n)])
			}
		}
		return string(p)
	}
	var ents []tent
	for d := 0; d < 40; d++ {
		ents = append(ents, tent{name: fmt.Sprintf("usr/lib/pkg%d/", d), typ: tar.TypeDir, mode: 0o755})
		for f := 0; f < 100; f++ {
			ents = append(ents, tent{name: fmt.Sprintf("usr/lib/pkg%d/mod%d.py", d, f), body: text(200 + rnd.Intn(6000))})
		}
		ents = append(ents, tent{name: fmt.Sprintf("usr/lib/pkg%d/lib.so", d), body: bin(300 << 10), mode: 0o755})
		ents = append(ents, tent{name: fmt.Sprintf("usr/lib/pkg%d/link", d), typ: tar.TypeSymlink, link: "lib.so", mode: 0o777})
	}
	for i := 0; i < 4; i++ {
		ents = append(ents, tent{name: fmt.Sprintf("usr/bin/big%d", i), body: bin(4 << 20), mode: 0o755})
	}
	return mkTar(b, ents...)
}

func benchConvert(b *testing.B, layer []byte, opts ...squashfs.Option) {
	dir := b.TempDir()
	b.SetBytes(int64(len(layer)))
	b.ReportAllocs()
	b.ResetTimer()
	var out int64
	for i := 0; i < b.N; i++ {
		f, err := os.Create(filepath.Join(dir, "l.sqfs"))
		if err != nil {
			b.Fatal(err)
		}
		st, err := ConvertLayer(context.Background(), bytes.NewReader(layer), f, opts...)
		if err != nil {
			b.Fatal(err)
		}
		out = st.ImageBytes
		_ = f.Close()
	}
	b.ReportMetric(float64(out)/float64(len(layer)), "img/tar")
}

// extractTar is the baseline: a plain (trusted, no checks) tar extraction
// to disk with metadata, what a runtime without block images would do.
func extractTar(b testing.TB, layer []byte, dir string) {
	tr := tar.NewReader(bytes.NewReader(layer))
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return
		}
		if err != nil {
			b.Fatal(err)
		}
		p := filepath.Join(dir, h.Name)
		_ = os.MkdirAll(filepath.Dir(p), 0o755)
		switch h.Typeflag {
		case tar.TypeDir:
			_ = os.Mkdir(p, os.FileMode(h.Mode&0o777))
		case tar.TypeReg:
			f, err := os.OpenFile(p, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, os.FileMode(h.Mode&0o777))
			if err != nil {
				b.Fatal(err)
			}
			if _, err := io.Copy(f, tr); err != nil {
				b.Fatal(err)
			}
			_ = f.Close()
		case tar.TypeSymlink:
			_ = os.Symlink(h.Linkname, p)
		case tar.TypeLink:
			_ = os.Link(filepath.Join(dir, h.Linkname), p)
		case tar.TypeChar, tar.TypeBlock, tar.TypeFifo:
			mode := uint32(unix.S_IFCHR)
			if h.Typeflag == tar.TypeBlock {
				mode = unix.S_IFBLK
			} else if h.Typeflag == tar.TypeFifo {
				mode = unix.S_IFIFO
			}
			_ = unix.Mknod(p, mode|uint32(h.Mode&0o777), int(unix.Mkdev(uint32(h.Devmajor), uint32(h.Devminor))))
		}
		_ = os.Lchown(p, h.Uid, h.Gid)
		if h.Typeflag != tar.TypeSymlink {
			_ = os.Chtimes(p, h.ModTime, h.ModTime)
		}
	}
}

func benchExtract(b *testing.B, layer []byte) {
	root := b.TempDir()
	b.SetBytes(int64(len(layer)))
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		dir := filepath.Join(root, fmt.Sprint(i))
		extractTar(b, layer, dir)
		b.StopTimer()
		_ = os.RemoveAll(dir)
		b.StartTimer()
	}
}

func BenchmarkConvertSynthetic(b *testing.B) { benchConvert(b, syntheticLayer(b)) }
func BenchmarkExtractSynthetic(b *testing.B) { benchExtract(b, syntheticLayer(b)) }
func BenchmarkConvertBusybox(b *testing.B)   { benchConvert(b, busyboxLayer(b)) }
func BenchmarkExtractBusybox(b *testing.B)   { benchExtract(b, busyboxLayer(b)) }
func BenchmarkConvertPython(b *testing.B)    { benchConvert(b, pythonLayer(b)) }
func BenchmarkConvertPythonLevel1(b *testing.B) {
	benchConvert(b, pythonLayer(b), squashfs.WithCompressionLevel(1))
}
func BenchmarkExtractPython(b *testing.B) { benchExtract(b, pythonLayer(b)) }

// BenchmarkPullPython measures a cold pull + convert of the Debian python3
// image (one 255 MB layer) from the in-process registry into an empty
// cache.
func BenchmarkPullPython(b *testing.B) {
	layer := pythonLayer(b)
	_, host := startRegistry(b)
	ref := host + "/debian/python:bench"
	img := buildImage(b, v1.Config{Cmd: []string{"python3"}}, layer)
	push(b, ref, img)
	ls, _ := img.Layers()
	size, _ := ls[0].Size()
	b.SetBytes(size)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		root := b.TempDir()
		s, err := Open(WithRoot(root))
		if err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		if _, err := s.Pull(context.Background(), ref); err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		_ = os.RemoveAll(root)
		b.StartTimer()
	}
}

// pythonStartup lists the files python3 -c 'print(1)' opens in the Debian
// python rootfs (recorded once with strace), as an image builder would
// prioritize them for eStargz prefetch.
var pythonStartup = testimage.PythonStartup

// BenchmarkFirstExecPython compares, for the same eStargz python image in
// the in-process registry, the host-side work before python's first exec:
// "lazy" opens the image (TOCs only), prefetches the landmark region and
// reads every file python opens at startup; "full" pulls and converts the
// whole image. Guest boot is not included.
func BenchmarkFirstExecPython(b *testing.B) {
	layer := pythonLayer(b)
	_, host := startRegistry(b)
	ref := host + "/debian/python:estargz"
	push(b, ref, buildEStargzImage(b, v1.Config{Cmd: []string{"python3"}}, [][]string{pythonStartup}, layer))
	ctx := context.Background()
	b.Run("lazy", func(b *testing.B) {
		for i := 0; i < b.N; i++ {
			s, err := Open(WithRoot(b.TempDir()))
			if err != nil {
				b.Fatal(err)
			}
			li, err := s.OpenLazy(ctx, ref)
			if err != nil {
				b.Fatal(err)
			}
			if err := li.Prefetch(ctx); err != nil {
				b.Fatal(err)
			}
			for _, f := range pythonStartup {
				if _, err := li.ReadFile(ctx, f); err != nil {
					b.Fatal(err)
				}
			}
			st := li.Stats()
			b.ReportMetric(float64(st.Bytes)/float64(st.Total), "fetched/total")
			b.ReportMetric(float64(st.Requests), "requests")
			_ = li.Close()
		}
	})
	b.Run("full", func(b *testing.B) {
		for i := 0; i < b.N; i++ {
			s, err := Open(WithRoot(b.TempDir()))
			if err != nil {
				b.Fatal(err)
			}
			if _, err := s.Pull(ctx, ref); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkOpaqueWhiteoutsPython measures what a layer with opaque
// directories costs on top of its conversion: computing its whiteouts from
// the layer indexes, here for an upper layer that makes /usr/lib/python3.11
// and /usr/share opaque over the Debian python3 rootfs (re-creating one
// file in each). It reports the index size against the tar and the image.
func BenchmarkOpaqueWhiteoutsPython(b *testing.B) {
	lower := pythonLayer(b)
	upper := mkTar(b,
		tent{name: "usr/lib/python3.11/.wh..wh..opq"},
		tent{name: "usr/lib/python3.11/os.py", body: "# replaced\n"},
		tent{name: "usr/share/.wh..wh..opq"},
		tent{name: "usr/share/keep", body: "k"},
	)
	var ix bytes.Buffer
	var img memAt
	st, err := convertLayer(context.Background(), bytes.NewReader(lower), &img, convConfig{index: &ix})
	if err != nil {
		b.Fatal(err)
	}
	lowIdx := ix.Bytes()
	upIdx := layerIndex(b, upper)
	var n int
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		w, err := opaqueWhiteouts(sources(lowIdx, upIdx), []int{0, 2}, map[int]bool{1: true})
		if err != nil {
			b.Fatal(err)
		}
		n = len(w[1])
	}
	b.ReportMetric(float64(n), "whiteouts")
	b.ReportMetric(float64(len(lowIdx)), "idx-bytes")
	b.ReportMetric(float64(st.Entries), "entries")
	b.ReportMetric(float64(len(lowIdx))/float64(st.ImageBytes), "idx/img")
}
