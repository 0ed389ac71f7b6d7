package image

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"math/rand"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func convertToFile(t testing.TB, layer []byte) (string, LayerStats) {
	t.Helper()
	p := filepath.Join(t.TempDir(), "layer.sqfs")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	st, err := ConvertLayer(context.Background(), bytes.NewReader(layer), f)
	if err != nil {
		t.Fatalf("ConvertLayer: %v", err)
	}
	return p, st
}

func testLayers(t testing.TB) (base, top []byte) {
	rnd := rand.New(rand.NewSource(1))
	big := make([]byte, 300<<10)
	rnd.Read(big)
	exact := strings.Repeat("a", 128<<10)
	sparse := string(make([]byte, 256<<10)) + "tail"
	base = mkTar(t,
		tent{name: "./", typ: tar.TypeDir, mode: 0o755},
		tent{name: "etc/", typ: tar.TypeDir, mode: 0o755},
		tent{name: "etc/passwd", body: "root:x:0:0:root:/root:/bin/sh\n", mode: 0o644},
		tent{name: "etc/shadow", body: "secret", mode: 0o640, gid: 42},
		tent{name: "usr/bin/tool", body: string(big), mode: 0o4755, uid: 1000, gid: 1000, xattrs: map[string]string{"user.origin": "test"}},
		tent{name: "usr/bin/tool2", typ: tar.TypeLink, link: "usr/bin/tool"},
		tent{name: "usr/lib/exact", body: exact},
		tent{name: "usr/lib/sparse", body: sparse},
		tent{name: "usr/lib/empty", body: ""},
		tent{name: "usr/lib/abs", typ: tar.TypeSymlink, link: "/etc/passwd", mode: 0o777},
		tent{name: "usr/lib/rel", typ: tar.TypeSymlink, link: "../bin/tool", mode: 0o777},
		tent{name: "usr/lib/dangling", typ: tar.TypeSymlink, link: "nowhere/at/all", mode: 0o777},
		tent{name: "dev/", typ: tar.TypeDir, mode: 0o755},
		tent{name: "dev/null", typ: tar.TypeChar, major: 1, minor: 3, mode: 0o666},
		tent{name: "dev/sda1", typ: tar.TypeBlock, major: 8, minor: 1, mode: 0o660, gid: 6},
		tent{name: "run/fifo", typ: tar.TypeFifo, mode: 0o600},
		tent{name: "tmp/", typ: tar.TypeDir, mode: 0o1777},
		tent{name: "var/cache/a", body: "a"},
		tent{name: "var/cache/b/c", body: "c"},
		tent{name: "var/log/old", body: "old"},
		tent{name: "opt/gone/deep/file", body: "x"},
	)
	// Like real layer tars, the top layer lists the parents of what it
	// changes (implicit parents would get 0755 root:root mtime 0 and hide
	// the lower directory's metadata).
	top = mkTar(t,
		tent{name: "etc/", typ: tar.TypeDir, mode: 0o755},
		tent{name: "var/", typ: tar.TypeDir, mode: 0o755},
		tent{name: "var/cache/", typ: tar.TypeDir, mode: 0o755},
		tent{name: "opt/", typ: tar.TypeDir, mode: 0o755},
		tent{name: "usr/", typ: tar.TypeDir, mode: 0o755, mtime: 1600000000},
		tent{name: "usr/lib/", typ: tar.TypeDir, mode: 0o755},
		tent{name: "home/", typ: tar.TypeDir, mode: 0o755},
		tent{name: "etc/passwd", body: "root:x:0:0:root:/root:/bin/bash\n", mode: 0o600},
		tent{name: "etc/.wh.shadow", body: ""},
		tent{name: "var/cache/.wh..wh..opq", body: ""},
		tent{name: "var/cache/new", body: "new"},
		tent{name: "opt/.wh.gone", body: ""},
		tent{name: "usr/lib/exact", typ: tar.TypeDir, mode: 0o700},
		tent{name: "home/user/", typ: tar.TypeDir, mode: 0o750, uid: 1000, gid: 1000, xattrs: map[string]string{"trusted.note": "kept", "trusted.overlay.redirect": "/etc"}},
	)
	return base, top
}

// TestConvertMatchesReference converts two layers, reads them back with
// squashfs-tools' unsquashfs, stacks them with overlayfs semantics and
// compares the result with a reference extraction of the same tars.
func TestConvertMatchesReference(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("unsquashfs needs root to restore owners and device nodes")
	}
	base, top := testLayers(t)
	var trees []tree
	want := tree{}
	for i, l := range [][]byte{base, top} {
		img, st := convertToFile(t, l)
		if st.DiffID != digestOf(l) {
			t.Fatalf("layer %d DiffID = %s, want %s", i, st.DiffID, digestOf(l))
		}
		dir := unsquash(t, img)
		tr, inos := readTree(t, dir)
		trees = append(trees, tr)
		refApply(t, want, l)
		compareTrees(t, want, overlayMerge(trees))
		if i == 0 && inos["usr/bin/tool"] != inos["usr/bin/tool2"] {
			t.Errorf("hard link lost: inodes %d and %d", inos["usr/bin/tool"], inos["usr/bin/tool2"])
		}
	}
	// The top layer keeps whiteouts in overlayfs form.
	topTree := trees[1]
	if n := topTree["etc/shadow"]; n.Type != "char" || n.Rdev != "0:0" {
		t.Errorf("whiteout etc/shadow = %+v, want char 0:0", n)
	}
	if n := topTree["var/cache"]; !strings.Contains(n.Xattrs, "trusted.overlay.opaque=y") {
		t.Errorf("opaque dir var/cache xattrs = %q", n.Xattrs)
	}
	if n := topTree["home/user"]; strings.Contains(n.Xattrs, "redirect") || !strings.Contains(n.Xattrs, "trusted.note=kept") {
		t.Errorf("home/user xattrs = %q: want trusted.note kept and forged trusted.overlay.* dropped", n.Xattrs)
	}
	if _, ok := topTree["opt/.wh.gone"]; ok {
		t.Error("OCI whiteout name leaked into the image")
	}
}

// TestConvertBusybox converts a layer built from Debian's busybox-static.
func TestConvertBusybox(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root for unsquashfs")
	}
	layer := busyboxLayer(t)
	img, _ := convertToFile(t, layer)
	got, _ := readTree(t, unsquash(t, img))
	want := tree{}
	refApply(t, want, layer)
	compareTrees(t, want, got)
	if got["bin/busybox"].Size < 100000 {
		t.Errorf("bin/busybox is %d bytes", got["bin/busybox"].Size)
	}
}

// busyboxLayer builds a layer from /bin/busybox (Debian busybox-static).
func busyboxLayer(t testing.TB) []byte {
	t.Helper()
	bb, err := os.ReadFile("/bin/busybox")
	if err != nil || !bytes.Contains(bb[:min(len(bb), 4096)], []byte("ELF")) {
		if os.Getenv("CI") == "true" {
			t.Fatalf("/bin/busybox (apt-get install busybox-static) is required under CI=true: %v", err)
		}
		t.Skipf("/bin/busybox not available (apt-get install busybox-static): %v", err)
	}
	ents := []tent{
		{name: "bin/", typ: tar.TypeDir, mode: 0o755},
		{name: "bin/busybox", body: string(bb), mode: 0o755},
		{name: "etc/passwd", body: "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n"},
		{name: "etc/group", body: "root:x:0:\n"},
		{name: "tmp/", typ: tar.TypeDir, mode: 0o1777},
		{name: "root/", typ: tar.TypeDir, mode: 0o700},
	}
	for _, app := range []string{"sh", "ls", "cat", "echo", "env", "id", "true", "false", "sleep", "uname"} {
		ents = append(ents, tent{name: "bin/" + app, typ: tar.TypeSymlink, link: "busybox", mode: 0o777})
	}
	return mkTar(t, ents...)
}

func TestConvertDeterministic(t *testing.T) {
	base, _ := testLayers(t)
	a, _ := convertToFile(t, base)
	b, _ := convertToFile(t, base)
	ab, _ := os.ReadFile(a)
	bb, _ := os.ReadFile(b)
	if !bytes.Equal(ab, bb) {
		t.Fatal("two conversions of the same layer differ")
	}
	if len(ab)%4096 != 0 {
		t.Fatalf("image size %d is not a multiple of 4096", len(ab))
	}
}

type memAt struct{ b []byte }

func (m *memAt) WriteAt(p []byte, off int64) (int, error) {
	if end := int(off) + len(p); end > len(m.b) {
		m.b = append(m.b, make([]byte, end-len(m.b))...)
	}
	copy(m.b[off:], p)
	return len(p), nil
}

func TestConvertHostile(t *testing.T) {
	huge := strings.Repeat("a/", 2100) + "f"
	cases := []struct {
		name string
		tar  []byte
		want error
	}{
		{"absolute", mkTar(t, tent{name: "/etc/passwd", body: "x"}), ErrUnsafePath},
		{"dotdot", mkTar(t, tent{name: "a/../../etc/passwd", body: "x"}), ErrUnsafePath},
		{"dotdot-plain", mkTar(t, tent{name: "../x", body: "x"}), ErrUnsafePath},
		{"hardlink-escape", mkTar(t, tent{name: "x", typ: tar.TypeLink, link: "../../etc/shadow"}), ErrLinkEscape},
		{"hardlink-absolute", mkTar(t, tent{name: "x", typ: tar.TypeLink, link: "/etc/shadow"}), ErrLinkEscape},
		{"hardlink-missing", mkTar(t, tent{name: "x", typ: tar.TypeLink, link: "nope"}), ErrLinkEscape},
		{"hardlink-dir", mkTar(t, tent{name: "d/", typ: tar.TypeDir}, tent{name: "x", typ: tar.TypeLink, link: "d"}), ErrLinkEscape},
		{"through-symlink", mkTar(t, tent{name: "l", typ: tar.TypeSymlink, link: "/etc"}, tent{name: "l/passwd", body: "x"}), ErrLinkEscape},
		{"through-file", mkTar(t, tent{name: "f", body: "x"}, tent{name: "f/g", body: "x"}), ErrLinkEscape},
		{"duplicate", mkTar(t, tent{name: "f", body: "x"}, tent{name: "f", body: "y"}), ErrDuplicateEntry},
		{"file-and-whiteout", mkTar(t, tent{name: "f", body: "x"}, tent{name: ".wh.f"}), ErrDuplicateEntry},
		{"long-path", mkTar(t, tent{name: huge, body: "x"}), ErrInvalidLayer},
		{"long-component", mkTar(t, tent{name: strings.Repeat("n", 300), body: "x"}), ErrInvalidLayer},
		{"bad-device", mkTar(t, tent{name: "d", typ: tar.TypeChar, major: 5000, minor: 1}), ErrInvalidLayer},
		{"root-not-dir", mkTar(t, tent{name: "./", typ: tar.TypeSymlink, link: "/"}), ErrInvalidLayer},
		{"garbage", bytes.Repeat([]byte{0xAB}, 2048), ErrInvalidLayer},
	}
	base, _ := testLayers(t)
	cases = append(cases, struct {
		name string
		tar  []byte
		want error
	}{"truncated", base[:len(base)/2], ErrTruncated})
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := ConvertLayer(context.Background(), bytes.NewReader(c.tar), &memAt{})
			if !errors.Is(err, c.want) {
				t.Fatalf("err = %v, want %v", err, c.want)
			}
		})
	}
}

func TestConvertCancel(t *testing.T) {
	base, _ := testLayers(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := ConvertLayer(ctx, bytes.NewReader(base), &memAt{})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v, want context.Canceled", err)
	}
}

func TestConvertDiffID(t *testing.T) {
	base, _ := testLayers(t)
	st, err := ConvertLayer(context.Background(), bytes.NewReader(base), &memAt{})
	if err != nil {
		t.Fatal(err)
	}
	s := sha256.Sum256(base)
	if st.DiffID != "sha256:"+hex.EncodeToString(s[:]) || st.TarBytes != int64(len(base)) {
		t.Fatalf("stats %+v", st)
	}
	if _, err := io.Copy(io.Discard, bytes.NewReader(nil)); err != nil {
		t.Fatal(err)
	}
}
