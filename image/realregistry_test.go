package image

import (
	"context"
	"os"
	"testing"

	"github.com/gosandbox/sandbox/internal/testimage"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// startDockerRegistry runs Debian's docker-registry (distribution 2.8) on a
// random loopback port for the test's duration and returns host:port.
func startDockerRegistry(t testing.TB) string {
	return testimage.StartRegistry(t)
}

// TestPullRealRegistry pushes a busybox image to Debian's docker-registry
// and pulls it through a fresh Store, then checks the converted layer
// against a reference extraction.
func TestPullRealRegistry(t *testing.T) {
	host := startDockerRegistry(t)
	bb := busyboxLayer(t)
	_, top := testLayers(t)
	img := buildImage(t, v1.Config{Entrypoint: []string{"/bin/sh", "-c"}, Cmd: []string{"echo hi"}}, bb, top)
	ref := host + "/gosandbox/busybox:1"
	push(t, ref, img)

	s := openStore(t, t.TempDir())
	var calls int
	got, err := s.Pull(context.Background(), ref, WithInsecure(), WithProgress(func(Progress) { calls++ }))
	if err != nil {
		t.Fatal(err)
	}
	want, _ := img.Digest()
	if got.Digest != want.String() || len(got.Layers) != 2 || calls == 0 {
		t.Fatalf("pulled %s (%d layers, %d progress calls), want %s", got.Digest, len(got.Layers), calls, want)
	}
	cmd, err := CommandFor(&got.Config.Config, Overrides{})
	if err != nil || cmd.Args[0] != "/bin/sh" || cmd.Args[2] != "echo hi" {
		t.Fatalf("CommandFor = %+v, %v", cmd, err)
	}
	if os.Getuid() == 0 {
		var layers []tree
		ref := tree{}
		for i, l := range [][]byte{bb, top} {
			tr, _ := readTree(t, unsquash(t, got.Layers[i].Path))
			layers = append(layers, tr)
			refApply(t, ref, l)
		}
		compareTrees(t, ref, overlayMerge(layers))
	}
	// Digest references against the real registry too.
	if _, err := s.Pull(context.Background(), host+"/gosandbox/busybox@"+want.String(), WithPolicy(PullAlways)); err != nil {
		t.Fatal(err)
	}
}
