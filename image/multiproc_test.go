package image

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// TestHelperPullProcess is not a test: TestMultiProcessPull runs the test
// binary again with it selected to pull from a separate process.
func TestHelperPullProcess(t *testing.T) {
	root, ref := os.Getenv("GOSANDBOX_IMAGE_HELPER_ROOT"), os.Getenv("GOSANDBOX_IMAGE_HELPER_REF")
	if root == "" {
		t.Skip("helper process only")
	}
	s, err := Open(WithRoot(root))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, err := s.Pull(context.Background(), ref); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Prune(context.Background()); err != nil {
		t.Fatal(err)
	}
}

// TestMultiProcessPull has several processes pull (and prune) images that
// share layers into one cache root at the same time.
func TestMultiProcessPull(t *testing.T) {
	_, host := startRegistry(t)
	base, top := testLayers(t)
	bb := busyboxLayer(t)
	push(t, host+"/mp:1", buildImage(t, v1.Config{}, base, top))
	push(t, host+"/mp:2", buildImage(t, v1.Config{}, base, bb))
	root := t.TempDir()
	var cmds []*exec.Cmd
	for i := 0; i < 4; i++ {
		cmd := exec.Command(os.Args[0], "-test.run=^TestHelperPullProcess$", "-test.count=1")
		cmd.Env = append(os.Environ(), "GOSANDBOX_IMAGE_HELPER_ROOT="+root, fmt.Sprintf("GOSANDBOX_IMAGE_HELPER_REF=%s/mp:%d", host, 1+i%2))
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		cmds = append(cmds, cmd)
	}
	for i, cmd := range cmds {
		if err := cmd.Wait(); err != nil {
			t.Errorf("process %d: %v", i, err)
		}
	}
	s := openStore(t, root)
	for _, r := range []string{"/mp:1", "/mp:2"} {
		if err := s.Verify(context.Background(), host+r); err != nil {
			t.Errorf("%s: %v", r, err)
		}
	}
	if n := countFiles(t, root, "layers/sha256", ".sqfs"); n != 3 {
		t.Errorf("%d layer images, want 3 (base shared)", n)
	}
	if n := countFiles(t, root, "layers/chain", ".sqfs"); n != 1 {
		t.Errorf("%d chain variants, want 1 (mp:1's top layer)", n)
	}
	assertNoScratch(t, s)
}
