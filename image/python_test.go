package image

import (
	"context"
	"os"
	"testing"

	"github.com/gosandbox/sandbox/internal/testimage"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// pythonLayer returns a layer tar of Debian bookworm minbase with python3,
// built once with debootstrap and cached under the user's cache directory
// (about 60 s and 261 MB). It skips when debootstrap is missing or fails
// (for example without a Debian mirror).
func pythonLayer(t testing.TB) []byte {
	return testimage.PythonLayer(t)
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
