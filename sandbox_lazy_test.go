package sandbox

import (
	"archive/tar"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/gosandbox/sandbox/image"
	"github.com/gosandbox/sandbox/internal/kvmhost"
	"github.com/gosandbox/sandbox/internal/testimage"
	"github.com/gosandbox/sandbox/kernel"
)

// lazyLayoutDir is where the host side leaves an eStargz test image (an
// OCI layout) for the side that boots sandboxes.
func lazyLayoutDir(t testing.TB, name string) string {
	cache, err := os.UserCacheDir()
	if err != nil {
		t.Fatal(err)
	}
	return filepath.Join(cache, "gosandbox", "test", "lazy-"+name)
}

// prepareLazy builds the eStargz test images on the host (fast there;
// inside the emulated host compression is slow) and saves them as OCI
// layouts under the cache directory, which the emulated host shares.
func prepareLazy(t testing.TB, python bool) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	if _, err := kernel.Default(ctx); err != nil {
		t.Fatal(err)
	}
	app := testimage.Tar(t,
		testimage.Entry{Name: "app/", Type: tar.TypeDir},
		testimage.Entry{Name: "app/hello.txt", Body: "hello from a lazy image\n"},
	)
	bb := testimage.BuildEStargz(t, v1.Config{Env: []string{"PATH=/bin"}, WorkingDir: "/app"},
		[][]string{{"bin/busybox"}}, testimage.BusyboxLayer(t), app)
	testimage.SaveLayout(t, lazyLayoutDir(t, "busybox"), bb)
	if python {
		py := testimage.BuildEStargz(t, v1.Config{Env: []string{"PATH=/usr/bin:/bin"}},
			[][]string{testimage.PythonStartup}, testimage.PythonLayer(t))
		testimage.SaveLayout(t, lazyLayoutDir(t, "python"), py)
	}
}

// pushLazy starts a registry (where the sandboxes run) and pushes the
// saved eStargz image there; it returns the reference.
func pushLazy(t testing.TB, name string) string {
	host := testimage.StartRegistry(t)
	ref := host + "/test/lazy-" + name + ":1"
	testimage.Push(t, ref, testimage.LoadLayout(t, lazyLayoutDir(t, name)))
	return ref
}

// startLazy is the common start of the lazy-image tests: on the host it
// prepares the eStargz images and hands the test to the emulated host
// (for at most delegate), where it returns ok false and the caller
// returns. Where sandboxes boot it pushes image name to a local registry
// and returns the boot mode, the reference and a context that ends after
// run (or with the test).
func startLazy(t testing.TB, name string, delegate, run time.Duration) (mode kvmhost.Mode, ref string, ctx context.Context, ok bool) {
	t.Helper()
	mode, _ = kvmhost.Detect()
	if mode != kvmhost.Inside {
		prepareLazy(t, name == "python")
	}
	if kvmhost.Delegate(t, kvmhost.WithTimeout(delegate)) {
		return mode, "", nil, false
	}
	ref = pushLazy(t, name)
	ctx, cancel := context.WithTimeout(context.Background(), run)
	t.Cleanup(cancel)
	return mode, ref, ctx, true
}

func tempStore(t testing.TB) *image.Store {
	st, err := image.Open(image.WithRoot(filepath.Join(t.TempDir(), "images")))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return st
}

// TestLazyImageSandbox boots a sandbox from an eStargz image that is never
// pulled: the guest reads the image over virtio-9p while the host fetches
// what it reads; writes go to the writable layer.
func TestLazyImageSandbox(t *testing.T) {
	mode, ref, ctx, ok := startLazy(t, "busybox", 30*time.Minute, 15*time.Minute)
	if !ok {
		return
	}
	sb := bootSmall(t, mode, LazyImage(ref, image.WithInsecure()), ImageStore(tempStore(t)), NoNetwork())
	res, err := sb.Run(ctx, "sh", "-c", "cat hello.txt && echo new > /app/new && cat /app/new && ls /bin | wc -l")
	if err != nil || res.ExitCode != 0 {
		t.Fatalf("%v %+v %s", err, res, res.Stderr)
	}
	lines := strings.Split(strings.TrimSpace(string(res.Stdout)), "\n")
	if len(lines) != 3 || lines[0] != "hello from a lazy image" || lines[1] != "new" || strings.TrimSpace(lines[2]) == "0" {
		t.Errorf("output %q", res.Stdout)
	}
	st := sb.disks.lazy.Stats()
	t.Logf("lazy fetch stats: %+v", st)
	if st.Requests == 0 {
		t.Error("no range request was made")
	}
}

// BenchmarkLazyFirstExec compares, for the same eStargz python image in a
// registry next to the sandboxes, New → first output of
// `python3 -c 'print(1)'` booting lazily (LazyImage) and after a full pull
// and conversion into an empty cache (Image). Both include the guest boot;
// the image preparation (New → image ready: TOC fetch, or pull and
// conversion) is reported separately too.
func BenchmarkLazyFirstExec(b *testing.B) {
	_, ref, ctx, ok := startLazy(b, "python", 60*time.Minute, 40*time.Minute)
	if !ok {
		return
	}
	firstExec := func(b *testing.B, opts ...Option) (time.Duration, Phases) {
		start := time.Now()
		sb, err := New(ctx, append(opts, Memory(256<<20), NoNetwork())...)
		if err != nil {
			b.Fatal(err)
		}
		defer sb.Close()
		fb := &firstByteWriter{}
		p, err := sb.Exec(ctx, Cmd{Args: []string{"python3", "-c", "print(1)"}, Stdout: fb})
		if err != nil {
			b.Fatal(err)
		}
		if st, err := p.Wait(ctx); err != nil || st.Code != 0 || fb.at.IsZero() {
			b.Fatalf("python3: %v %+v", err, st)
		}
		ph := sb.Phases()
		b.Logf("first output %v after New; %s", fb.at.Sub(start), ph)
		return fb.at.Sub(start), ph
	}
	var lazy, full, lazyPre, fullPre time.Duration
	for i := 0; i < b.N; i++ {
		d, ph := firstExec(b, LazyImage(ref, image.WithInsecure()), ImageStore(tempStore(b)))
		lazy += d
		lazyPre += ph.ToImageReady()
		d, ph = firstExec(b, Image(ref, image.WithInsecure()), ImageStore(tempStore(b)))
		full += d
		fullPre += ph.ToImageReady()
	}
	n := float64(b.N)
	b.ReportMetric(lazy.Seconds()/n, "lazy-s-to-first-output")
	b.ReportMetric(full.Seconds()/n, "full-s-to-first-output")
	b.ReportMetric(lazy.Seconds()/full.Seconds(), "ratio")
	b.ReportMetric(lazyPre.Seconds()/n, "lazy-s-image-ready")
	b.ReportMetric(fullPre.Seconds()/n, "full-s-image-ready")
}
