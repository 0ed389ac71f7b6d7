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
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
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
