package image

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// startDockerRegistry runs Debian's docker-registry (distribution 2.8) on a
// random loopback port for the test's duration and returns host:port.
func startDockerRegistry(t testing.TB) string {
	t.Helper()
	bin := needTool(t, "docker-registry")
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	_ = l.Close()
	dir := t.TempDir()
	cfg := filepath.Join(dir, "config.yml")
	conf := fmt.Sprintf(`version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: %s
  delete:
    enabled: true
http:
  addr: %s
`, filepath.Join(dir, "data"), addr)
	if err := os.WriteFile(cfg, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "serve", cfg)
	logf, err := os.Create(filepath.Join(dir, "registry.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-done
		_ = logf.Close()
	})
	for i := 0; ; i++ {
		resp, err := http.Get("http://" + addr + "/v2/")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return addr
			}
		}
		select {
		case <-done:
			b, _ := os.ReadFile(filepath.Join(dir, "registry.log"))
			t.Fatalf("docker-registry exited: %s", b)
		case <-time.After(100 * time.Millisecond):
		}
		if i > 300 {
			t.Fatal("docker-registry did not answer on /v2/ within 30 s")
		}
	}
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
