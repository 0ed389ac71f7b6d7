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
