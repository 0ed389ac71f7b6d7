package p9_test

import (
	"archive/tar"
	"errors"
	"maps"
	"slices"
	"strings"
	"testing"

	"github.com/hugelgupf/p9/linux"
	ninep "github.com/hugelgupf/p9/p9"

	"github.com/gosandbox/sandbox/image"
	"github.com/gosandbox/sandbox/image/lazy9p"
	"github.com/gosandbox/sandbox/internal/testimage"
	"github.com/gosandbox/sandbox/internal/testimage/testlazy"
)

// lazyTestImage pushes a one-layer eStargz image with files (a name ending
// in "/" is a directory) to an in-process registry and opens it lazily.
func lazyTestImage(t *testing.T, files map[string]string) *image.LazyImage {
	t.Helper()
	names := slices.Sorted(maps.Keys(files))
	ents := make([]testimage.Entry, 0, len(names))
	for _, n := range names {
		if strings.HasSuffix(n, "/") {
			ents = append(ents, testimage.Entry{Name: n, Type: tar.TypeDir})
		} else {
			ents = append(ents, testimage.Entry{Name: n, Body: files[n]})
		}
	}
	return testlazy.Open(t, testimage.Tar(t, ents...))
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
