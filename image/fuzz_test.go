package image

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func fuzzSeeds(f *testing.F) {
	// Small seeds: the fuzzer mutates faster on small inputs.
	base := mkTar(f,
		tent{name: "./", typ: tar.TypeDir, mode: 0o755},
		tent{name: "bin/sh", body: "#!", mode: 0o4755, uid: 1, gid: 2, xattrs: map[string]string{"user.a": "b"}},
		tent{name: "bin/ln", typ: tar.TypeLink, link: "bin/sh"},
		tent{name: "lib", typ: tar.TypeSymlink, link: "usr/lib", mode: 0o777},
		tent{name: "dev/null", typ: tar.TypeChar, major: 1, minor: 3},
		tent{name: "fifo", typ: tar.TypeFifo},
		tent{name: "etc/.wh.gone"},
	)
	f.Add(base)
	f.Add(mkTar(f, tent{name: "/abs", body: "x"}))
	f.Add(mkTar(f, tent{name: "a", typ: tar.TypeSymlink, link: "/etc", mode: 0o777}, tent{name: "a/b", body: "x"}))
	f.Add(mkTar(f, tent{name: "h", typ: tar.TypeLink, link: "../x"}))
	f.Add(mkTar(f, tent{name: "d/.wh..wh..opq"}, tent{name: "d/.wh.x"}, tent{name: "d/x", body: "1"}))
	f.Add(base[:len(base)/3])
	f.Add([]byte{})
}

// FuzzTarWalk feeds arbitrary bytes to the layer tar walker: it must never
// panic or hang, and every entry it yields must be clean and relative.
func FuzzTarWalk(f *testing.F) {
	fuzzSeeds(f)
	f.Fuzz(func(t *testing.T, data []byte) {
		err := walkTar(context.Background(), bytes.NewReader(data), func(e *layerEntry, r io.Reader) error {
			if len(e.Path) > 0 && (e.Path[0] == '/' || e.Path == ".." || bytes.Contains([]byte("/"+e.Path+"/"), []byte("/../"))) {
				t.Fatalf("unsafe path %q yielded", e.Path)
			}
			if e.Kind == kindHardlink && (e.LinkTarget == "" || e.LinkTarget[0] == '/') {
				t.Fatalf("unsafe link target %q yielded", e.LinkTarget)
			}
			if r != nil {
				_, err := io.Copy(io.Discard, r)
				return err
			}
			return nil
		})
		_ = err
	})
}

// FuzzConvert converts arbitrary bytes: it must return an image or a typed
// error, never panic.
func FuzzConvert(f *testing.F) {
	fuzzSeeds(f)
	f.Fuzz(func(t *testing.T, data []byte) {
		m := &memAt{}
		st, err := ConvertLayer(context.Background(), bytes.NewReader(data), m)
		if err != nil {
			for _, s := range []error{ErrUnsafePath, ErrLinkEscape, ErrDuplicateEntry, ErrTruncated, ErrInvalidLayer} {
				if errors.Is(err, s) {
					return
				}
			}
			t.Fatalf("untyped error: %v", err)
		}
		if st.ImageBytes != int64(len(m.b)) || len(m.b) < 96 || string(m.b[:4]) != "hsqs" {
			t.Fatalf("bad image: %d bytes, stats %+v", len(m.b), st)
		}
	})
}

// FuzzLoadArchive feeds arbitrary archives to Store.Load: a typed error or
// an image, never a panic, and no scratch file left behind.
func FuzzLoadArchive(f *testing.F) {
	img := mkTar(f, tent{name: "f", body: "x"})
	cfg := []byte(`{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":["` + digestOf(img) + `"]}}`)
	mj := []byte(`[{"Config":"c.json","RepoTags":["t:1"],"Layers":["l.tar"]}]`)
	f.Add(mkTar(f, tent{name: "manifest.json", body: string(mj)}, tent{name: "c.json", body: string(cfg)}, tent{name: "l.tar", body: string(img)}))
	f.Add(mkTar(f, tent{name: "oci-layout", body: `{"imageLayoutVersion":"1.0.0"}`}, tent{name: "index.json", body: `{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:` + strings.Repeat("0", 64) + `","size":1}]}`}))
	root := f.TempDir()
	f.Fuzz(func(t *testing.T, data []byte) {
		s, err := Open(WithRoot(root))
		if err != nil {
			t.Fatal(err)
		}
		_, err = s.Load(context.Background(), bytes.NewReader(data))
		if err != nil {
			typed := false
			for _, e := range []error{ErrUnsafePath, ErrLinkEscape, ErrDuplicateEntry, ErrTruncated, ErrInvalidLayer, ErrInvalidManifest, ErrDigestMismatch, ErrNotFound} {
				typed = typed || errors.Is(err, e)
			}
			if !typed {
				t.Fatalf("untyped error: %v", err)
			}
		}
		if ents, _ := os.ReadDir(filepath.Join(root, "tmp")); len(ents) != 0 {
			t.Fatalf("%d scratch files left", len(ents))
		}
	})
}

// FuzzLayerIndex parses arbitrary bytes as a cached layer index: nil or
// ErrInvalidLayer, never a panic; a good index also goes through the
// whiteout computation.
func FuzzLayerIndex(f *testing.F) {
	for _, l := range opaqueTestLayers(f) {
		f.Add(layerIndex(f, l))
	}
	f.Add([]byte(indexMagic))
	f.Fuzz(func(t *testing.T, data []byte) {
		opq := 0
		err := readIndex(bytes.NewReader(data), func(k byte, p string) error {
			if !validIndexPath(p) {
				t.Fatalf("invalid path %q yielded", p)
			}
			if k == idxOpaque {
				opq++
			}
			return nil
		})
		if err != nil {
			if !errors.Is(err, ErrInvalidLayer) {
				t.Fatalf("untyped error: %v", err)
			}
			return
		}
		w, err := opaqueWhiteouts(sources(data, data), []int{opq, opq}, map[int]bool{1: true})
		if err != nil && !errors.Is(err, ErrInvalidLayer) {
			t.Fatalf("untyped error: %v", err)
		}
		for _, p := range w[1] {
			if !validIndexPath(p) || p == "" {
				t.Fatalf("invalid whiteout path %q", p)
			}
		}
	})
}

// FuzzOpaqueVariant stacks two arbitrary layers: when both convert, the
// upper layer's variant (with the whiteouts its opaque directories need)
// must convert too.
func FuzzOpaqueVariant(f *testing.F) {
	ls := opaqueTestLayers(f)
	f.Add(ls[1], ls[2])
	f.Add(ls[0], mkTar(f, tent{name: ".wh..wh..opq"}, tent{name: "a/x", body: "x"}))
	f.Add(mkTar(f, tent{name: "a", typ: tar.TypeSymlink, link: "b", mode: 0o777}), mkTar(f, tent{name: "a/.wh..wh..opq"}))
	f.Fuzz(func(t *testing.T, lower, upper []byte) {
		var idx [][]byte
		for _, l := range [][]byte{lower, upper} {
			var ix bytes.Buffer
			if _, err := convertLayer(context.Background(), bytes.NewReader(l), &memAt{}, convConfig{index: &ix}); err != nil {
				return
			}
			idx = append(idx, ix.Bytes())
		}
		counts := make([]int, 2)
		for i, b := range idx {
			n, err := indexOpaqueCountBytes(b)
			if err != nil {
				t.Fatalf("index of a converted layer: %v", err)
			}
			counts[i] = n
		}
		w, err := opaqueWhiteouts(sources(idx...), counts, map[int]bool{1: true})
		if err != nil {
			t.Fatalf("whiteouts: %v", err)
		}
		if len(w[1]) == 0 {
			return
		}
		if _, err := convertLayer(context.Background(), bytes.NewReader(upper), &memAt{}, convConfig{whiteouts: w[1]}); err != nil {
			t.Fatalf("variant with whiteouts %q: %v", w[1], err)
		}
	})
}

func indexOpaqueCountBytes(b []byte) (int, error) {
	n := 0
	err := readIndex(bytes.NewReader(b), func(k byte, _ string) error {
		if k == idxOpaque {
			n++
		}
		return nil
	})
	return n, err
}
