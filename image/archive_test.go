package image

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/validate"
)

func TestSaveLoadRoundTrip(t *testing.T) {
	_, host := startRegistry(t)
	base, top := testLayers(t)
	src := buildImage(t, v1.Config{Cmd: []string{"sh"}}, base, top)
	ref := host + "/round:trip"
	push(t, ref, src)
	s1 := openStore(t, t.TempDir())
	img, err := s1.Pull(context.Background(), ref)
	if err != nil {
		t.Fatal(err)
	}
	for _, format := range []ArchiveFormat{FormatBoth, FormatDocker, FormatOCI} {
		var buf bytes.Buffer
		if err := s1.Save(context.Background(), &buf, format, ref); err != nil {
			t.Fatal(err)
		}
		s2 := openStore(t, t.TempDir())
		got, err := s2.Load(context.Background(), bytes.NewReader(buf.Bytes()))
		if err != nil {
			t.Fatalf("format %d: %v", format, err)
		}
		if len(got) != 1 {
			t.Fatalf("format %d: loaded %d images", format, len(got))
		}
		if format != FormatDocker && got[0].Digest != img.Digest {
			t.Errorf("format %d: digest %s, want %s (preserved)", format, got[0].Digest, img.Digest)
		}
		if got[0].Ref != ref {
			t.Errorf("format %d: ref %q, want %q", format, got[0].Ref, ref)
		}
		if _, err := s2.Get(context.Background(), ref); err != nil {
			t.Errorf("format %d: Get after Load: %v", format, err)
		}
		for i, l := range got[0].Layers {
			if l.DiffID != img.Layers[i].DiffID || !exists(l.Path) {
				t.Errorf("format %d: layer %d = %+v", format, i, l)
			}
		}
		assertNoScratch(t, s2)
	}

	// go-containerregistry reads what we save: as a Docker archive ...
	var buf bytes.Buffer
	if err := s1.Save(context.Background(), &buf, FormatBoth, ref); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), "img.tar")
	if err := os.WriteFile(p, buf.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	tag, _ := name.NewTag(ref)
	timg, err := tarball.ImageFromPath(p, &tag)
	if err != nil {
		t.Fatal(err)
	}
	if err := validate.Image(timg); err != nil {
		t.Fatalf("ggcr validate (docker archive): %v", err)
	}
	// ... and as an OCI layout.
	dir := t.TempDir()
	untar(t, buf.Bytes(), dir)
	lp, err := layout.ImageIndexFromPath(dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := validate.Index(lp); err != nil {
		t.Fatalf("ggcr validate (OCI layout): %v", err)
	}
}

// untar extracts a trusted test archive.
func untar(t testing.TB, b []byte, dir string) {
	tr := tar.NewReader(bytes.NewReader(b))
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return
		}
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(dir, h.Name)
		if h.Typeflag == tar.TypeDir {
			_ = os.MkdirAll(p, 0o755)
			continue
		}
		_ = os.MkdirAll(filepath.Dir(p), 0o755)
		d, _ := io.ReadAll(tr)
		if err := os.WriteFile(p, d, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// TestLoadClassicDockerSave loads an archive in the pre-Docker-25 layout:
// uncompressed "<id>/layer.tar" files and "<hex>.json" configs, written by
// go-containerregistry's tarball package with uncompressed layers.
func TestLoadClassicDockerSave(t *testing.T) {
	bb := busyboxLayer(t)
	src := buildImage(t, v1.Config{Entrypoint: []string{"/bin/sh"}}, bb)
	cfgRaw, _ := src.RawConfigFile()
	cfgName, _ := src.ConfigName()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	add := func(n string, b []byte) {
		_ = tw.WriteHeader(&tar.Header{Name: n, Mode: 0o644, Size: int64(len(b)), Typeflag: tar.TypeReg})
		_, _ = tw.Write(b)
	}
	add(cfgName.Hex+".json", cfgRaw)
	add("abc123/layer.tar", bb)
	mj, _ := json.Marshal([]map[string]any{{"Config": cfgName.Hex + ".json", "RepoTags": []string{"busybox:test"}, "Layers": []string{"abc123/layer.tar"}}})
	add("manifest.json", mj)
	_ = tw.Close()
	s := openStore(t, t.TempDir())
	imgs, err := s.Load(context.Background(), &buf)
	if err != nil {
		t.Fatal(err)
	}
	if imgs[0].Ref != "index.docker.io/library/busybox:test" || imgs[0].Layers[0].MediaType != "application/vnd.docker.image.rootfs.diff.tar" {
		t.Fatalf("loaded %+v", imgs[0])
	}
	if _, err := s.Pull(context.Background(), "busybox:test", WithPolicy(PullNever)); err != nil {
		t.Fatalf("PullNever after Load: %v", err)
	}
}

func TestLoadHostile(t *testing.T) {
	bb := mkTar(t, tent{name: "f", body: "x"})
	src := buildImage(t, v1.Config{}, bb)
	cfgRaw, _ := src.RawConfigFile()
	mk := func(files map[string][]byte, order ...string) []byte {
		var buf bytes.Buffer
		tw := tar.NewWriter(&buf)
		for _, n := range order {
			_ = tw.WriteHeader(&tar.Header{Name: n, Mode: 0o644, Size: int64(len(files[n])), Typeflag: tar.TypeReg})
			_, _ = tw.Write(files[n])
		}
		_ = tw.Close()
		return buf.Bytes()
	}
	mj := func(cfg string, layers ...string) []byte {
		b, _ := json.Marshal([]map[string]any{{"Config": cfg, "Layers": layers}})
		return b
	}
	other := mkTar(t, tent{name: "g", body: "y"})
	cases := []struct {
		name string
		tar  []byte
		want error
	}{
		{"escape-config", mk(map[string][]byte{"manifest.json": mj("../../etc/passwd")}, "manifest.json"), ErrUnsafePath},
		{"absolute-layer", mk(map[string][]byte{"manifest.json": mj("c.json", "/etc/shadow"), "c.json": cfgRaw}, "manifest.json", "c.json"), ErrUnsafePath},
		{"missing-layer", mk(map[string][]byte{"manifest.json": mj("c.json", "l.tar"), "c.json": cfgRaw}, "manifest.json", "c.json"), ErrInvalidManifest},
		{"wrong-diffid", mk(map[string][]byte{"manifest.json": mj("c.json", "l.tar"), "c.json": cfgRaw, "l.tar": other}, "manifest.json", "c.json", "l.tar"), ErrDigestMismatch},
		{"not-an-archive", []byte("hello"), ErrTruncated},
		{"empty", mk(nil), ErrInvalidManifest},
		{"bad-json", mk(map[string][]byte{"manifest.json": []byte("{")}, "manifest.json"), ErrInvalidManifest},
		{"duplicate", mk(map[string][]byte{"manifest.json": mj("c.json")}, "manifest.json", "manifest.json"), ErrDuplicateEntry},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			s := openStore(t, t.TempDir())
			_, err := s.Load(context.Background(), bytes.NewReader(c.tar))
			if !errors.Is(err, c.want) {
				t.Fatalf("err = %v, want %v", err, c.want)
			}
			assertNoScratch(t, s)
			if ents, _ := os.ReadDir(filepath.Join(s.Root(), "layers", "sha256")); len(ents) != 0 {
				t.Errorf("%d layer images left after a failed load", len(ents))
			}
		})
	}
}
