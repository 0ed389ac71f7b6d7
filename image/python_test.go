package image

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"golang.org/x/sys/unix"
)

// pythonLayer returns a layer tar of Debian bookworm minbase with python3,
// built once with debootstrap and cached under the user's cache directory
// (about 60 s and 261 MB). It skips when debootstrap is missing or fails
// (for example without a Debian mirror).
func pythonLayer(t testing.TB) []byte {
	t.Helper()
	cache, err := os.UserCacheDir()
	if err != nil {
		t.Skip(err)
	}
	dir := filepath.Join(cache, "gosandbox", "testdata")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "python3-bookworm-minbase.tar")
	unlock, err := lock(context.Background(), out+".lock", unix.LOCK_EX)
	if err != nil {
		t.Fatal(err)
	}
	defer unlock()
	if b, err := os.ReadFile(out); err == nil {
		return b
	}
	if os.Getuid() != 0 {
		t.Skip("building the python rootfs needs root (debootstrap)")
	}
	deb, err := exec.LookPath("debootstrap")
	if err != nil {
		t.Skip("debootstrap not installed (apt-get install debootstrap); skipping the python image")
	}
	root := filepath.Join(dir, "python-rootfs.build")
	_ = os.RemoveAll(root)
	defer os.RemoveAll(root)
	start := time.Now()
	if b, err := exec.Command(deb, "--variant=minbase", "--include=python3", "bookworm", root, "http://deb.debian.org/debian").CombinedOutput(); err != nil {
		t.Skipf("debootstrap failed (no mirror?): %v\n%s", err, tail(b))
	}
	tmp := out + ".tmp"
	if b, err := exec.Command("tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "--sort=name", "-C", root, "-cf", tmp, ".").CombinedOutput(); err != nil {
		t.Fatalf("tar: %v\n%s", err, b)
	}
	if err := os.Rename(tmp, out); err != nil {
		t.Fatal(err)
	}
	t.Logf("built python rootfs layer in %v", time.Since(start))
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func tail(b []byte) []byte {
	if len(b) > 2000 {
		return b[len(b)-2000:]
	}
	return b
}

// TestPythonImage pulls a realistic Debian python3 image through the
// in-process registry and checks the converted layer file by file against
// a reference extraction. Not in -short mode.
func TestPythonImage(t *testing.T) {
	if testing.Short() {
		t.Skip("slow: builds/reads a 261 MB rootfs")
	}
	if os.Getuid() != 0 {
		t.Skip("needs root for unsquashfs owners and devices")
	}
	layer := pythonLayer(t)
	_, host := startRegistry(t)
	ref := host + "/debian/python:3-bookworm"
	push(t, ref, buildImage(t, v1.Config{Cmd: []string{"python3"}}, layer))
	s := openStore(t, t.TempDir())
	img, err := s.Pull(context.Background(), ref)
	if err != nil {
		t.Fatal(err)
	}
	got, _ := readTree(t, unsquash(t, img.Layers[0].Path))
	want := tree{}
	refApply(t, want, layer)
	compareTrees(t, want, got)
	if n, ok := got["usr/bin/python3"]; !ok || n.Type != "symlink" {
		t.Errorf("usr/bin/python3 = %+v", n)
	}
	fi, _ := os.Stat(img.Layers[0].Path)
	t.Logf("python layer: tar %d MB, squashfs %d MB, %d paths", len(layer)>>20, fi.Size()>>20, len(got))
}
