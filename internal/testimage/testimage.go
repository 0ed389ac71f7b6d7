// Package testimage builds OCI images for tests from what a Debian build
// machine has: the busybox-static binary and a debootstrap'ed minbase with
// python3. No public registry is reachable from the build machines, so
// tests push these to a registry they start themselves (Debian's
// docker-registry, or go-containerregistry's in-process one).
package testimage

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"golang.org/x/sys/unix"
)

// unavailable skips the test, or fails it under CI=true, where every
// prerequisite is installed by .ci/run and a skip would hide a gap.
func unavailable(t testing.TB, format string, args ...any) {
	t.Helper()
	if os.Getenv("CI") == "true" {
		t.Fatalf(format, args...)
	}
	t.Skipf(format, args...)
}

// Entry is one member of a layer tar.
type Entry struct {
	Name     string
	Type     byte // tar.TypeReg by default
	Body     string
	Link     string
	Mode     int64
	UID, GID int
}

// Tar builds a layer tar from entries.
func Tar(t testing.TB, ents ...Entry) []byte {
	t.Helper()
	var b bytes.Buffer
	tw := tar.NewWriter(&b)
	for _, e := range ents {
		h := &tar.Header{Name: e.Name, Typeflag: e.Type, Linkname: e.Link, Mode: e.Mode, Uid: e.UID, Gid: e.GID,
			ModTime: time.Unix(1700000000, 0), Format: tar.FormatPAX}
		if h.Typeflag == 0 {
			h.Typeflag = tar.TypeReg
		}
		if h.Mode == 0 {
			h.Mode = 0o644
			if h.Typeflag == tar.TypeDir {
				h.Mode = 0o755
			}
		}
		if h.Typeflag == tar.TypeReg {
			h.Size = int64(len(e.Body))
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if h.Typeflag == tar.TypeReg {
			if _, err := io.WriteString(tw, e.Body); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// BusyboxLayer is a base layer with /bin/busybox (from Debian's
// busybox-static) and links for common applets, /etc/passwd with root and
// nobody, and /tmp and /root.
func BusyboxLayer(t testing.TB) []byte {
	t.Helper()
	bb, err := os.ReadFile("/bin/busybox")
	if err != nil || len(bb) < 4 || string(bb[1:4]) != "ELF" {
		unavailable(t, "/bin/busybox is needed (apt-get install busybox-static): %v", err)
	}
	ents := []Entry{
		{Name: "bin/", Type: tar.TypeDir},
		{Name: "bin/busybox", Body: string(bb), Mode: 0o755},
		{Name: "etc/", Type: tar.TypeDir},
		{Name: "etc/passwd", Body: "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"},
		{Name: "etc/group", Body: "root:x:0:\nnogroup:x:65534:\n"},
		{Name: "tmp/", Type: tar.TypeDir, Mode: 0o1777},
		{Name: "root/", Type: tar.TypeDir, Mode: 0o700},
	}
	for _, app := range []string{"sh", "ls", "cat", "echo", "env", "id", "true", "false", "sleep", "uname", "mount", "df", "dd", "rm", "mkdir", "touch", "stat", "wc", "sha256sum", "head", "ip", "wget", "nc", "hostname", "grep", "sed"} {
		ents = append(ents, Entry{Name: "bin/" + app, Type: tar.TypeSymlink, Link: "busybox", Mode: 0o777})
	}
	return Tar(t, ents...)
}

// PythonLayer is Debian bookworm minbase with python3 as one layer tar,
// built once with debootstrap (about a minute and 260 MB) and cached under
// the user's cache directory. It needs root, debootstrap and a Debian
// mirror.
func PythonLayer(t testing.TB) []byte {
	t.Helper()
	cache, err := os.UserCacheDir()
	if err != nil {
		unavailable(t, "no cache directory: %v", err)
	}
	dir := filepath.Join(cache, "gosandbox", "testdata")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "python3-bookworm-minbase.tar")
	lf, err := os.OpenFile(out+".lock", os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer lf.Close()
	if err := unix.Flock(int(lf.Fd()), unix.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(out); err == nil {
		return b
	}
	if os.Getuid() != 0 {
		unavailable(t, "building the python rootfs needs root (debootstrap)")
	}
	deb, err := exec.LookPath("debootstrap")
	if err != nil {
		unavailable(t, "debootstrap is needed (apt-get install debootstrap)")
	}
	root := filepath.Join(dir, "python-rootfs.build")
	_ = os.RemoveAll(root)
	defer os.RemoveAll(root)
	mirror := os.Getenv("GOSANDBOX_DEBIAN_MIRROR")
	if mirror == "" {
		mirror = "http://deb.debian.org/debian"
	}
	if b, err := exec.Command(deb, "--variant=minbase", "--include=python3", "bookworm", root, mirror).CombinedOutput(); err != nil {
		if len(b) > 2000 {
			b = b[len(b)-2000:]
		}
		unavailable(t, "debootstrap failed (no Debian mirror? set GOSANDBOX_DEBIAN_MIRROR): %v\n%s", err, b)
	}
	tmp := out + ".tmp"
	if b, err := exec.Command("tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "--sort=name", "-C", root, "-cf", tmp, ".").CombinedOutput(); err != nil {
		t.Fatalf("tar: %v\n%s", err, b)
	}
	if err := os.Rename(tmp, out); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// Build makes a linux/amd64 image of layers (base first) with config cfg.
func Build(t testing.TB, cfg v1.Config, layers ...[]byte) v1.Image {
	t.Helper()
	img := empty.Image
	for _, l := range layers {
		layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
			return io.NopCloser(bytes.NewReader(l)), nil
		})
		if err != nil {
			t.Fatal(err)
		}
		if img, err = mutate.AppendLayers(img, layer); err != nil {
			t.Fatal(err)
		}
	}
	return withConfig(t, img, cfg)
}

// withConfig sets img's platform to linux/amd64 and its config to cfg.
func withConfig(t testing.TB, img v1.Image, cfg v1.Config) v1.Image {
	t.Helper()
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture, cf.Config = "linux", "amd64", cfg
	if img, err = mutate.ConfigFile(img, cf); err != nil {
		t.Fatal(err)
	}
	return img
}

// Push writes img to ref (a plain-HTTP registry on loopback).
func Push(t testing.TB, ref string, img v1.Image) {
	t.Helper()
	r, err := name.ParseReference(ref, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(r, img); err != nil {
		t.Fatalf("push %s: %v", ref, err)
	}
}

// StartLocalRegistry serves go-containerregistry's in-process registry
// (quiet, in memory) on a loopback port until the test ends and returns
// its host:port. Unlike StartRegistry it needs nothing installed.
func StartLocalRegistry(t testing.TB) string {
	t.Helper()
	srv := httptest.NewServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	t.Cleanup(srv.Close)
	return strings.TrimPrefix(srv.URL, "http://")
}

// StartRegistry runs Debian's docker-registry (distribution) on a free
// loopback port until the test ends and returns its host:port.
func StartRegistry(t testing.TB) string {
	t.Helper()
	bin, err := exec.LookPath("docker-registry")
	if err != nil {
		unavailable(t, "docker-registry is needed (apt-get install docker-registry)")
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	dir := t.TempDir()
	conf := fmt.Sprintf("version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: %s\nhttp:\n  addr: %s\n", filepath.Join(dir, "data"), addr)
	cfg := filepath.Join(dir, "config.yml")
	if err := os.WriteFile(cfg, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	logf, err := os.Create(filepath.Join(dir, "registry.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "serve", cfg)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-done
		logf.Close()
	})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for ctx.Err() == nil {
		if resp, err := http.Get("http://" + addr + "/v2/"); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return addr
			}
		}
		select {
		case <-done:
			b, _ := os.ReadFile(logf.Name())
			t.Fatalf("docker-registry exited: %s", b)
		case <-time.After(100 * time.Millisecond):
		}
	}
	t.Fatal("docker-registry did not answer on /v2/ within 30 s")
	return ""
}

// BuildEStargz is Build with every layer converted to eStargz (64 KiB
// chunks, gzip level 1); prio[i] lists the files of layer i to place
// before the prefetch landmark. The layer descriptors carry the TOC digest
// annotation lazy pulling needs.
func BuildEStargz(t testing.TB, cfg v1.Config, prio [][]string, layers ...[]byte) v1.Image {
	t.Helper()
	return buildEStargz(t, 64<<10, cfg, prio, layers)
}

// BuildEStargzChunks is BuildEStargz with chunkSize-byte chunks and no
// prioritized files: small chunks let a small test file span many of them.
func BuildEStargzChunks(t testing.TB, chunkSize int, cfg v1.Config, layers ...[]byte) v1.Image {
	t.Helper()
	return buildEStargz(t, chunkSize, cfg, nil, layers)
}

func buildEStargz(t testing.TB, chunkSize int, cfg v1.Config, prio [][]string, layers [][]byte) v1.Image {
	t.Helper()
	img := empty.Image
	for i, l := range layers {
		opts := []estargz.Option{estargz.WithChunkSize(chunkSize), estargz.WithCompressionLevel(1)}
		if i < len(prio) && prio[i] != nil {
			opts = append(opts, estargz.WithPrioritizedFiles(prio[i]))
		}
		blob, err := estargz.Build(io.NewSectionReader(bytes.NewReader(l), 0, int64(len(l))), opts...)
		if err != nil {
			t.Fatal(err)
		}
		data, err := io.ReadAll(blob)
		blob.Close()
		if err != nil {
			t.Fatal(err)
		}
		layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(data)), nil })
		if err != nil {
			t.Fatal(err)
		}
		img, err = mutate.Append(img, mutate.Addendum{Layer: layer, Annotations: map[string]string{estargz.TOCJSONDigestAnnotation: blob.TOCDigest().String()}})
		if err != nil {
			t.Fatal(err)
		}
	}
	return withConfig(t, img, cfg)
}

// SaveLayout writes img as an OCI image layout in dir (replacing it);
// unlike a Docker archive, the layout keeps descriptor annotations.
func SaveLayout(t testing.TB, dir string, img v1.Image) {
	t.Helper()
	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	p, err := layout.Write(dir, empty.Index)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.AppendImage(img); err != nil {
		t.Fatal(err)
	}
}

// LoadLayout reads the single image of the OCI layout in dir.
func LoadLayout(t testing.TB, dir string) v1.Image {
	t.Helper()
	idx, err := layout.ImageIndexFromPath(dir)
	if err != nil {
		t.Fatal(err)
	}
	m, err := idx.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	if len(m.Manifests) != 1 {
		t.Fatalf("%s holds %d images, want 1", dir, len(m.Manifests))
	}
	img, err := idx.Image(m.Manifests[0].Digest)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// PythonStartup lists the files `python3 -c 'print(1)'` opens in the
// Debian python rootfs, the prefetch list an image builder would give.
var PythonStartup = []string{
	"usr/bin/python3.11",
	"usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
	"usr/lib/x86_64-linux-gnu/libc.so.6",
	"usr/lib/x86_64-linux-gnu/libm.so.6",
	"usr/lib/x86_64-linux-gnu/libz.so.1.2.13",
	"usr/lib/x86_64-linux-gnu/libexpat.so.1.8.10",
	"usr/lib/locale/C.utf8/LC_CTYPE",
	"usr/lib/x86_64-linux-gnu/gconv/gconv-modules.cache",
	"usr/lib/python3.11/encodings/__init__.py",
	"usr/lib/python3.11/encodings/aliases.py",
	"usr/lib/python3.11/encodings/utf_8.py",
	"etc/python3.11/sitecustomize.py",
}
