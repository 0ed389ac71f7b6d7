package sandbox

import (
	"archive/tar"
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/gosandbox/sandbox/image"
	"github.com/gosandbox/sandbox/internal/kvmhost"
	"github.com/gosandbox/sandbox/internal/testimage"
	"github.com/gosandbox/sandbox/kernel"
)

// imageSpec is what the host side of TestImageSandbox hands to the side
// that boots the sandboxes (inside the emulated host the image cache is
// shared over 9p, where file locks are not to be relied on, so the inner
// side takes the pulled images as they are instead of asking the Store).
type imageSpec struct {
	Python, App, Other *image.Image
}

func imageSpecPath(t *testing.T) string {
	cache, err := os.UserCacheDir()
	if err != nil {
		t.Fatal(err)
	}
	return filepath.Join(cache, "gosandbox", "test", "image-e2e.json")
}

// prepareImages builds the test images from Debian packages, pushes them
// to a real registry server (Debian's docker-registry on loopback) and
// pulls them into an image cache under the user's cache directory.
func prepareImages(t *testing.T) {
	host := testimage.StartRegistry(t)
	base := testimage.BusyboxLayer(t)
	app := testimage.Tar(t,
		testimage.Entry{Name: "app/", Type: tar.TypeDir},
		testimage.Entry{Name: "app/hello.txt", Body: "hello from the image\n"},
	)
	other := testimage.Tar(t,
		testimage.Entry{Name: "etc/", Type: tar.TypeDir},
		testimage.Entry{Name: "etc/other", Body: "other\n"},
	)
	images := map[string]v1.Image{
		host + "/test/python:3": testimage.Build(t, v1.Config{Cmd: []string{"python3"},
			Env: []string{"PATH=/usr/local/bin:/usr/bin:/bin", "LANG=C.UTF-8"}}, testimage.PythonLayer(t)),
		host + "/test/app:1": testimage.Build(t, v1.Config{User: "nobody", WorkingDir: "/app",
			Env: []string{"PATH=/bin", "GREETING=hi"}}, base, app),
		host + "/test/other:1": testimage.Build(t, v1.Config{Env: []string{"PATH=/bin"}}, base, other),
	}
	cache, _ := os.UserCacheDir()
	st, err := image.Open(image.WithRoot(filepath.Join(cache, "gosandbox", "test", "images")))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	pulled := map[string]*image.Image{}
	for ref, img := range images {
		testimage.Push(t, ref, img)
		var mu sync.Mutex
		last := map[string]image.Progress{}
		got, err := st.Pull(context.Background(), ref, image.WithInsecure(), image.WithPolicy(image.PullAlways),
			image.WithProgress(func(p image.Progress) { mu.Lock(); last[p.Layer] = p; mu.Unlock() }))
		if err != nil {
			t.Fatalf("pull %s: %v", ref, err)
		}
		if len(last) != len(got.Layers) {
			t.Errorf("pull %s: progress for %d layers, want %d", ref, len(last), len(got.Layers))
		}
		for l, p := range last {
			if !p.Cached && (p.Total <= 0 || p.Done != p.Total) {
				t.Errorf("pull %s: last progress of layer %s = %+v, want done = total", ref, l, p)
			}
		}
		pulled[strings.TrimPrefix(ref, host+"/test/")] = got
	}
	spec := imageSpec{Python: pulled["python:3"], App: pulled["app:1"], Other: pulled["other:1"]}
	b, err := json.Marshal(spec)
	if err != nil {
		t.Fatal(err)
	}
	p := imageSpecPath(t)
	if err := os.WriteFile(p+".tmp", b, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(p+".tmp", p); err != nil {
		t.Fatal(err)
	}
}

// imageTestSetup prepares the test images on the host side, delegates
// the calling test to where KVM is (ok false: the caller returns), and
// there loads the images' description.
func imageTestSetup(t *testing.T) (kvmhost.Mode, imageSpec, bool) {
	mode, _ := kvmhost.Detect()
	if mode != kvmhost.Inside {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		if _, err := kernel.Default(ctx); err != nil {
			t.Fatal(err)
		}
		prepareImages(t)
	}
	var spec imageSpec
	if kvmhost.Delegate(t, kvmhost.WithTimeout(40*time.Minute)) {
		return mode, spec, false
	}
	b, err := os.ReadFile(imageSpecPath(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &spec); err != nil {
		t.Fatal(err)
	}
	return mode, spec, true
}

// bootSmall boots a 256 MiB sandbox for t, closed when t ends; when t
// failed, the console is logged and an emulator fault reported.
func bootSmall(t *testing.T, mode kvmhost.Mode, opts ...Option) *Sandbox {
	t.Helper()
	sb, con := newE2E(t, append([]Option{Memory(256 << 20)}, opts...)...)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("console:\n%s", con)
			reportEmulatorFault(t, mode, sb)
		}
		sb.Close()
	})
	return sb
}

// TestImageSandbox boots sandboxes from OCI images pulled from a real
// registry: python prints its version, the image's User, WorkingDir and
// Env apply, a file written in one sandbox is absent from the next, two
// images share their base layer's cached file, a disk-backed writable
// layer takes writes, and a broken layer gives ErrSetup.
func TestImageSandbox(t *testing.T) {
	mode, spec, ok := imageTestSetup(t)
	if !ok {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	run := func(t *testing.T, sb *Sandbox, cmd Cmd) string {
		t.Helper()
		var out, errb strings.Builder
		cmd.Stdout, cmd.Stderr = &out, &errb
		p, err := sb.Exec(ctx, cmd)
		if err != nil {
			t.Fatalf("%q: %v", cmd.Args, err)
		}
		st, err := p.Wait(ctx)
		if err != nil || st.Code != 0 || st.Signal != 0 {
			t.Fatalf("%q: %v %+v\nstdout: %s\nstderr: %s", cmd.Args, err, st, out.String(), errb.String())
		}
		return out.String()
	}
	boot := func(t *testing.T, opts ...Option) *Sandbox { return bootSmall(t, mode, opts...) }

	t.Run("python", func(t *testing.T) {
		sb := boot(t, FromImage(spec.Python), Name("python"), TmpfsSize(48<<20))
		if out := run(t, sb, Cmd{Args: []string{"python3", "--version"}}); !strings.HasPrefix(out, "Python 3.") {
			t.Errorf("python3 --version = %q", out)
		}
		out := run(t, sb, Cmd{Args: []string{"python3", "-c", "import os, socket; print(os.getcwd(), socket.gethostname(), os.environ['LANG'])"}})
		if out != "/ python C.UTF-8\n" {
			t.Errorf("python cwd, hostname, LANG = %q", out)
		}
		// The writable layer is a 48 MiB tmpfs: statfs of / reports it.
		if out := run(t, sb, Cmd{Args: []string{"python3", "-c", "import os; s = os.statvfs('/'); print(s.f_blocks * s.f_frsize >> 20)"}}); out != "48\n" {
			t.Errorf("size of / with TmpfsSize(48 MiB) = %q MiB", out)
		}
		if c, err := sb.ImageCommand(); err != nil || strings.Join(c.Args, " ") != "python3" {
			t.Errorf("ImageCommand() = %+v, %v; want the image's Cmd [python3]", c, err)
		}
		c, err := sb.ImageCommand("python3", "-c", "print(6*7)")
		if err != nil {
			t.Fatal(err)
		}
		if out := run(t, sb, c); out != "42\n" {
			t.Errorf("image command with args printed %q", out)
		}
	})

	t.Run("config, isolation and shared layers", func(t *testing.T) {
		if a, o := spec.App.Layers[0].Path, spec.Other.Layers[0].Path; a != o {
			t.Errorf("the images' common base layer is cached twice: %s and %s", a, o)
		}
		root := uint32(0)
		a := boot(t, FromImage(spec.App), Name("app-a"))
		if _, err := a.ImageCommand(); err == nil {
			t.Error("ImageCommand of an image without Entrypoint or Cmd succeeded")
		}
		if out := run(t, a, Cmd{Args: []string{"sh", "-c", "id -u; pwd; echo $GREETING; cat hello.txt"}}); out != "65534\n/app\nhi\nhello from the image\n" {
			t.Errorf("image user, dir, env, file = %q", out)
		}
		run(t, a, Cmd{Args: []string{"sh", "-c", "echo written-by-a > /etc/marker && rm /app/hello.txt"}, UID: &root})
		if out := run(t, a, Cmd{Args: []string{"cat", "/etc/marker"}}); out != "written-by-a\n" {
			t.Errorf("marker in a = %q", out)
		}
		// b runs from the same image files while a is alive, and from
		// a disk-backed writable layer.
		b := boot(t, FromImage(spec.App), Name("app-b"), DiskSize(64<<20))
		if out := run(t, b, Cmd{Args: []string{"sh", "-c", "ls /etc; cat /app/hello.txt"}, UID: &root}); strings.Contains(out, "marker") || !strings.Contains(out, "hello from the image") {
			t.Errorf("b sees a's changes: %q", out)
		}
		out := run(t, b, Cmd{Args: []string{"sh", "-c", "dd if=/dev/zero of=/root/big bs=1M count=24 2>/dev/null && wc -c </root/big && grep -c '^overlay / overlay' /proc/mounts"}, UID: &root})
		if out != "25165824\n1\n" {
			t.Errorf("write to the disk-backed upper and root mount = %q", out)
		}
		o := boot(t, FromImage(spec.Other), Name("other"))
		if out := run(t, o, Cmd{Args: []string{"cat", "/etc/other"}}); out != "other\n" {
			t.Errorf("other image file = %q", out)
		}
	})

	t.Run("broken layer", func(t *testing.T) {
		bad := *spec.Other
		bad.Layers = append([]image.Layer(nil), spec.Other.Layers...)
		junk := filepath.Join(t.TempDir(), "junk.squashfs")
		if err := os.WriteFile(junk, make([]byte, 64<<10), 0o644); err != nil {
			t.Fatal(err)
		}
		bad.Layers[1].Path = junk
		sctx, cancel := context.WithTimeout(ctx, 15*time.Minute)
		defer cancel()
		e2eBoots++
		sb, err := New(sctx, FromImage(&bad), Memory(256<<20))
		if err == nil {
			sb.Close()
			t.Fatal("New booted an image with a junk layer")
		}
		if !errors.Is(err, ErrSetup) {
			t.Fatalf("New with a junk layer: %v, want ErrSetup", err)
		}
		t.Logf("junk layer: %v", err)
	})
}
