package image

import (
	"archive/tar"
	"context"
	"crypto/sha256"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"

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

// kernelTestLayers is the image TestKernelOverlayMatchesReference mounts,
// base first: busybox, the two layers of testLayers (the top one makes
// var/cache opaque over var/cache/a and var/cache/b/c) and a layer that
// makes var opaque and re-creates var/cache (a directory the layers below
// also have, so overlayfs would merge the two if nothing hid the lower
// var/cache/new), and one whose opaque directory hides nothing.
func kernelTestLayers(t *testing.T) [][]byte {
	bb := busyboxLayer(t)
	base, top := testLayers(t)
	top2 := mkTar(t,
		tent{name: "var/", typ: tar.TypeDir, mode: 0o755},
		tent{name: "var/.wh..wh..opq"},
		tent{name: "var/cache/", typ: tar.TypeDir, mode: 0o700},
		tent{name: "var/cache/fresh", body: "fresh"},
	)
	// opt/new does not exist below: this layer's opaque directory hides
	// nothing, so it keeps its shared image (with the xattr).
	top3 := mkTar(t,
		tent{name: "opt/", typ: tar.TypeDir, mode: 0o755},
		tent{name: "opt/new/", typ: tar.TypeDir, mode: 0o755},
		tent{name: "opt/new/.wh..wh..opq"},
		tent{name: "opt/new/f", body: "f"},
	)
	return [][]byte{bb, base, top, top2, top3}
}

// TestKernelOverlayMatchesReference does on the host exactly what the
// guest will do (see the package doc): the image is pulled into a Store
// from a real (in-process) registry, the Linux kernel mounts each of
// img.LayerPaths() as SquashFS, an empty ext4 from package ext4 holds the
// upper and work directories, and overlayfs stacks them. The merged tree
// must equal a reference extraction of the layer tars (plain archive/tar
// with OCI semantics), writes must land in the upper layer only, and the
// layer images must stay unchanged.
//
// It runs in two modes:
//
//   - "xattrs": a plain overlay mount, which honours
//     trusted.overlay.opaque (this host's squashfs has xattrs, as a guest
//     kernel with CONFIG_SQUASHFS_XATTR=y does). The chain variants carry
//     no opaque xattr: an opaque directory is not merged, so whiteouts in
//     it would show up in readdir as entries that cannot be stat'ed
//     (which this mode catches); the shared images keep it.
//   - "no-xattrs": the overlay is mounted with userxattr, so overlayfs
//     looks for user.overlay.* and never sees the trusted.overlay.opaque
//     the images carry; the opaque directories then work only through
//     the whiteouts of the chain variants, as in the default guest kernel
//     (no CONFIG_SQUASHFS_XATTR: squashfs reports no xattrs at all). The
//     opaque xattr itself is visible through such a mount and is left out
//     of the comparison (the reference has none). A control mount of the
//     shared diff_id images in the same mode must show the entries the
//     opaque directories hide, proving the mode really ignores the xattr.
func TestKernelOverlayMatchesReference(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("mounting needs root")
	}
	layers := kernelTestLayers(t)
	_, host := startRegistry(t)
	push(t, host+"/kernel:1", buildImage(t, v1.Config{}, layers...))
	s := openStore(t, t.TempDir())
	img, err := s.Pull(context.Background(), host+"/kernel:1")
	if err != nil {
		t.Fatal(err)
	}
	want := tree{}
	for _, l := range layers {
		refApply(t, want, l)
	}
	dir := t.TempDir()
	mountLayers := func(name string, paths []string) []string {
		var lower []string
		for i, p := range paths {
			mp := filepath.Join(dir, name, strconv.Itoa(i))
			if err := os.MkdirAll(mp, 0o755); err != nil {
				t.Fatal(err)
			}
			mount(t, "-t", "squashfs", "-o", "loop,ro,nodev,nosuid", p, mp)
			lower = append(lower, mp)
		}
		return lower // top first, like paths
	}
	paths := img.LayerPaths()
	var sums [][32]byte
	for _, p := range paths {
		sums = append(sums, fileSum(t, p))
	}
	lower := mountLayers("l", paths)
	variants := 0
	for _, l := range img.Layers {
		if v, _, _ := s.chainPaths(l.ChainID); l.Path == v {
			variants++
		}
	}
	if variants != 2 {
		t.Errorf("%d layers use a chain variant, want 2 (the two opaque layers)", variants)
	}

	for _, mode := range []string{"xattrs", "no-xattrs"} {
		t.Run(mode, func(t *testing.T) {
			extra := ",redirect_dir=off"
			if mode == "no-xattrs" {
				// userxattr refuses redirect_dir=off (it means
				// "follow"); nofollow is the strictest it takes.
				extra = ",redirect_dir=nofollow,userxattr"
			}
			m := filepath.Join(dir, mode)
			upperImg := m + ".ext4"
			if err := ext4.CreateFile(upperImg, 64<<20, ext4.Options{}); err != nil {
				t.Fatal(err)
			}
			u := filepath.Join(m, "u")
			merged := filepath.Join(m, "merged")
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
				"lowerdir="+strings.Join(lower, ":")+",upperdir="+filepath.Join(u, "upper")+",workdir="+filepath.Join(u, "work")+",index=off,metacopy=off"+extra,
				merged)

			got, _ := readTree(t, merged)
			if mode == "no-xattrs" {
				for k, n := range got {
					n.Xattrs = stripOverlay(n.Xattrs)
					got[k] = n
				}
			}
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
		})
	}
	for i, p := range paths {
		if fileSum(t, p) != sums[i] {
			t.Errorf("layer image %d changed under a mounted overlay", i)
		}
	}

	t.Run("control", func(t *testing.T) {
		var shared []string
		for i := len(img.Layers) - 1; i >= 0; i-- {
			p, _ := s.layerPath(img.Layers[i].DiffID)
			shared = append(shared, p)
		}
		lower := mountLayers("shared", shared)
		merged := filepath.Join(dir, "control")
		if err := os.MkdirAll(merged, 0o755); err != nil {
			t.Fatal(err)
		}
		mount(t, "-t", "overlay", "overlay", "-o", "ro,userxattr,lowerdir="+strings.Join(lower, ":"), merged)
		for _, p := range []string{"var/log/old", "var/cache/new"} {
			if _, err := os.Lstat(filepath.Join(merged, p)); err != nil {
				t.Errorf("control: %s hidden without the variants (%v): the no-xattrs mode would prove nothing", p, err)
			}
		}
	})
}
