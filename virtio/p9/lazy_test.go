package p9_test

import (
	"archive/tar"
	"bytes"
	"errors"
	"io"
	"log"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/hugelgupf/p9/linux"
	ninep "github.com/hugelgupf/p9/p9"

	"github.com/gosandbox/sandbox/image"
	"github.com/gosandbox/sandbox/image/lazy9p"
)

// lazyTestImage pushes a one-layer eStargz image with files to an
// in-process registry and opens it lazily.
func lazyTestImage(t *testing.T, files map[string]string) *image.LazyImage {
	t.Helper()
	var layer bytes.Buffer
	tw := tar.NewWriter(&layer)
	names := make([]string, 0, len(files))
	for n := range files {
		names = append(names, n)
	}
	slices.Sort(names)
	for _, n := range names {
		h := &tar.Header{Name: n, Mode: 0o644, ModTime: time.Unix(1700000000, 0)}
		if strings.HasSuffix(n, "/") {
			h.Typeflag, h.Mode = tar.TypeDir, 0o755
		} else {
			h.Typeflag, h.Size = tar.TypeReg, int64(len(files[n]))
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		io.WriteString(tw, files[n])
	}
	tw.Close()
	blob, err := estargz.Build(io.NewSectionReader(bytes.NewReader(layer.Bytes()), 0, int64(layer.Len())), estargz.WithChunkSize(4096))
	if err != nil {
		t.Fatal(err)
	}
	data, _ := io.ReadAll(blob)
	blob.Close()
	l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(data)), nil })
	if err != nil {
		t.Fatal(err)
	}
	img, err := mutate.Append(empty.Image, mutate.Addendum{Layer: l, Annotations: map[string]string{estargz.TOCJSONDigestAnnotation: blob.TOCDigest().String()}})
	if err != nil {
		t.Fatal(err)
	}
	cf, _ := img.ConfigFile()
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", "amd64"
	img, _ = mutate.ConfigFile(img, cf)
	srv := httptest.NewServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	t.Cleanup(srv.Close)
	ref := strings.TrimPrefix(srv.URL, "http://") + "/p9dev:1"
	r, err := name.ParseReference(ref)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(r, img); err != nil {
		t.Fatal(err)
	}
	store, err := image.Open(image.WithRoot(t.TempDir()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	li, err := store.OpenLazy(t.Context(), ref)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { li.Close() })
	return li
}

// TestLazyImage serves the project's own lazily pulled image tree
// (image/lazy9p, eStargz from an in-process registry) through the device.
func TestLazyImage(t *testing.T) {
	big := strings.Repeat("0123456789abcdef", 8192) // 128 KiB: many chunks
	li := lazyTestImage(t, map[string]string{
		"bin/": "", "bin/tool": big, "etc/": "", "etc/motd": "hi\n",
	})
	c, h, _ := newClient(t, lazy9p.New(li), 32<<10)
	root, err := c.Attach("/")
	if err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]string{"bin/tool": big, "etc/motd": "hi\n"} {
		f := walk(t, root, name)
		if got := readAll(t, f); string(got) != want {
			t.Errorf("%s: %d bytes, want %d", name, len(got), len(want))
		}
		f.Close()
	}
	d := walk(t, root, "etc")
	if _, _, err := d.Open(ninep.ReadOnly); err != nil {
		t.Fatal(err)
	}
	ents, err := d.Readdir(0, 4096)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name)
	}
	if !slices.Contains(names, "motd") {
		t.Errorf("readdir etc = %v, want motd in it", names)
	}
	f := walk(t, root, "etc/motd")
	if _, _, err := f.Open(ninep.WriteOnly); !errors.Is(err, linux.EROFS) {
		t.Errorf("open for write: %v, want EROFS", err)
	}
	if err := h.FailErr(); err != nil {
		t.Errorf("device failed: %v", err)
	}
}
