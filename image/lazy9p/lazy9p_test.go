package lazy9p_test

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"io"
	"log"
	"net"
	"net/http/httptest"
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
	"github.com/gosandbox/sandbox/image"
	"github.com/gosandbox/sandbox/image/lazy9p"
	"github.com/hugelgupf/p9/linux"
	"github.com/hugelgupf/p9/p9"
)

type ent struct {
	name, body, link string
	typ              byte
	mode             int64
}

func layerTar(t *testing.T, ents ...ent) []byte {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range ents {
		h := &tar.Header{Name: e.name, Typeflag: e.typ, Mode: e.mode, Linkname: e.link, ModTime: time.Unix(1700000000, 0)}
		if h.Typeflag == 0 {
			h.Typeflag, h.Size = tar.TypeReg, int64(len(e.body))
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		_, _ = tw.Write([]byte(e.body))
	}
	_ = tw.Close()
	return buf.Bytes()
}

// lazyImage pushes an eStargz image made of layers to an in-process
// registry and opens it lazily.
func lazyImage(t *testing.T, layers ...[]byte) *image.LazyImage {
	srv := httptest.NewServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	t.Cleanup(srv.Close)
	img := empty.Image
	for _, l := range layers {
		blob, err := estargz.Build(io.NewSectionReader(bytes.NewReader(l), 0, int64(len(l))), estargz.WithCompressionLevel(1), estargz.WithChunkSize(4096))
		if err != nil {
			t.Fatal(err)
		}
		data, _ := io.ReadAll(blob)
		_ = blob.Close()
		layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(data)), nil })
		if err != nil {
			t.Fatal(err)
		}
		if img, err = mutate.Append(img, mutate.Addendum{Layer: layer, Annotations: map[string]string{estargz.TOCJSONDigestAnnotation: blob.TOCDigest().String()}}); err != nil {
			t.Fatal(err)
		}
	}
	cf, _ := img.ConfigFile()
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", "amd64"
	img, _ = mutate.ConfigFile(img, cf)
	ref := strings.TrimPrefix(srv.URL, "http://") + "/lazy9p:1"
	r, _ := name.ParseReference(ref)
	if err := remote.Write(r, img); err != nil {
		t.Fatal(err)
	}
	s, err := image.Open(image.WithRoot(t.TempDir()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	li, err := s.OpenLazy(context.Background(), ref)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = li.Close() })
	return li
}

// TestServe9P mounts the lazy image through a real 9P client and server
// (hugelgupf/p9) over an in-memory connection.
func TestServe9P(t *testing.T) {
	big := strings.Repeat("0123456789abcdef", 4096) // 64 KiB: several chunks
	li := lazyImage(t,
		layerTar(t, ent{name: "bin/", typ: tar.TypeDir, mode: 0o755}, ent{name: "bin/tool", body: big, mode: 0o755},
			ent{name: "bin/sh", typ: tar.TypeSymlink, link: "tool", mode: 0o777}, ent{name: "etc/gone", body: "x", mode: 0o644}),
		layerTar(t, ent{name: "etc/", typ: tar.TypeDir, mode: 0o755}, ent{name: "etc/.wh.gone", mode: 0o644}, ent{name: "etc/motd", body: "hi\n", mode: 0o644}),
	)
	srvConn, cliConn := net.Pipe()
	server := p9.NewServer(lazy9p.New(li))
	done := make(chan error, 1)
	go func() { done <- server.Handle(srvConn, srvConn) }()
	client, err := p9.NewClient(cliConn)
	if err != nil {
		t.Fatal(err)
	}
	root, err := client.Attach("/")
	if err != nil {
		t.Fatal(err)
	}

	_, tool, err := root.Walk([]string{"bin", "tool"})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := tool.Open(p9.ReadOnly); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(big)+10)
	n, err := tool.ReadAt(got, 0)
	if err != nil && err != io.EOF || string(got[:n]) != big {
		t.Fatalf("read %d bytes (%v), want the %d-byte file", n, err, len(big))
	}
	_, mask, attr, err := tool.GetAttr(p9.AttrMaskAll)
	if err != nil || !mask.Size || attr.Size != uint64(len(big)) || attr.Mode.Permissions() != 0o755 || !attr.Mode.IsRegular() {
		t.Fatalf("GetAttr = %+v, %v", attr, err)
	}
	_, tool2, err := root.Walk([]string{"bin", "tool"})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := tool2.Open(p9.WriteOnly); !errors.Is(err, linux.EROFS) {
		t.Errorf("open for write: %v, want EROFS", err)
	}

	_, sh, err := root.Walk([]string{"bin", "sh"})
	if err != nil {
		t.Fatal(err)
	}
	if tg, err := sh.Readlink(); err != nil || tg != "tool" {
		t.Errorf("Readlink = %q, %v", tg, err)
	}
	_, etc, err := root.Walk([]string{"etc"})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := etc.Open(p9.ReadOnly); err != nil {
		t.Fatal(err)
	}
	dents, err := etc.Readdir(0, 4096)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, d := range dents {
		names = append(names, d.Name)
	}
	if strings.Join(names, ",") != "motd" {
		t.Errorf("etc lists %v, want [motd] (gone is whited out)", names)
	}
	if _, _, err := root.Walk([]string{"etc", "gone"}); !errors.Is(err, linux.ENOENT) {
		t.Errorf("walk to whited-out file: %v, want ENOENT", err)
	}
	// The p9 server refuses ".." names itself; lazy9p would clean them
	// to stay inside the root anyway.
	if qids, _, err := root.Walk([]string{"..", "..", "bin"}); err == nil && (len(qids) != 3 || qids[2].Type != p9.TypeDir) {
		t.Errorf("walk above the root escaped: %v", qids)
	}

	_ = client.Close()
	_ = cliConn.Close()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("9P server did not stop after the client closed")
	}
}
