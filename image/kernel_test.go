package image

import (
	"crypto/sha256"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/gosandbox/sandbox/image/ext4"
)

func fileSum(t testing.TB, p string) [32]byte {
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	var s [32]byte
	copy(s[:], h.Sum(nil))
	return s
}

func mount(t *testing.T, args ...string) {
	t.Helper()
	out, err := exec.Command("mount", args...).CombinedOutput()
	if err != nil {
		t.Skipf("mount %v not permitted here (needs root, loop devices, squashfs/overlay): %v: %s", args, err, out)
	}
	target := args[len(args)-1]
	t.Cleanup(func() {
		if out, err := exec.Command("umount", target).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v: %s", target, err, out)
		}
	})
}

// TestKernelOverlayMatchesReference does on the host exactly what the
// guest will do (see the package doc): the Linux kernel mounts each layer's
// SquashFS image, an empty ext4 from package ext4 holds the upper and work
// directories, and overlayfs stacks them. The merged tree must equal a
// reference extraction of the layer tars, writes must land in the upper
// layer only, and the layer images must stay unchanged.
func TestKernelOverlayMatchesReference(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("mounting needs root")
	}
	bb := busyboxLayer(t)
	base, top := testLayers(t)
	layers := [][]byte{bb, base, top}
	dir := t.TempDir()
	want := tree{}
	var lower []string
	var sums [][32]byte
	var imgs []string
	for i, l := range layers {
		img, _ := convertToFile(t, l)
		imgs = append(imgs, img)
		sums = append(sums, fileSum(t, img))
		refApply(t, want, l)
		mp := filepath.Join(dir, "l", string(rune('0'+i)))
		if err := os.MkdirAll(mp, 0o755); err != nil {
			t.Fatal(err)
		}
		mount(t, "-t", "squashfs", "-o", "loop,ro,nodev,nosuid", img, mp)
		lower = append([]string{mp}, lower...) // top first
	}
	upperImg := filepath.Join(dir, "upper.ext4")
	if err := ext4.CreateFile(upperImg, 64<<20, ext4.Options{}); err != nil {
		t.Fatal(err)
	}
	u := filepath.Join(dir, "u")
	merged := filepath.Join(dir, "merged")
	for _, d := range []string{u, merged} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	mount(t, "-t", "ext4", "-o", "loop", upperImg, u)
	for _, d := range []string{"upper", "work"} {
		if err := os.Mkdir(filepath.Join(u, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	mount(t, "-t", "overlay", "overlay", "-o",
		"lowerdir="+strings.Join(lower, ":")+",upperdir="+filepath.Join(u, "upper")+",workdir="+filepath.Join(u, "work")+",redirect_dir=off,index=off,metacopy=off",
		merged)

	got, _ := readTree(t, merged)
	compareTrees(t, want, got)

	// A write goes to the upper layer only.
	if err := os.WriteFile(filepath.Join(merged, "etc", "passwd"), []byte("changed\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(filepath.Join(merged, "bin", "busybox")); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(u, "upper", "etc", "passwd")); err != nil || string(b) != "changed\n" {
		t.Errorf("upper etc/passwd = %q, %v", b, err)
	}
	for i, img := range imgs {
		if fileSum(t, img) != sums[i] {
			t.Errorf("layer image %d changed under a mounted overlay", i)
		}
	}
}
