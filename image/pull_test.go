package image

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gosandbox/sandbox/internal/testimage"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
)

// buildImage makes a linux/amd64 image from uncompressed layer tars.
func buildImage(t testing.TB, cfg v1.Config, layers ...[]byte) v1.Image {
	return testimage.Build(t, cfg, layers...)
}

type countingHandler struct {
	h     http.Handler
	blobs atomic.Int64
	all   atomic.Int64
	// corrupt, when set, flips a byte in GET responses for blobs whose
	// URL contains it.
	corrupt string
	// user/pass, when set, require basic auth.
	user, pass string
}

func (c *countingHandler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if c.user != "" {
		u, p, ok := r.BasicAuth()
		if !ok || u != c.user || p != c.pass {
			w.Header().Set("WWW-Authenticate", `Basic realm="test"`)
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
	}
	c.all.Add(1)
	if r.Method == http.MethodGet && strings.Contains(r.URL.Path, "/blobs/") {
		c.blobs.Add(1)
		if c.corrupt != "" && strings.Contains(r.URL.Path, c.corrupt) {
			rec := httptest.NewRecorder()
			c.h.ServeHTTP(rec, r)
			b := rec.Body.Bytes()
			if len(b) > 100 {
				b[len(b)/2] ^= 0xff
			}
			for k, v := range rec.Header() {
				w.Header()[k] = v
			}
			w.WriteHeader(rec.Code)
			_, _ = w.Write(b)
			return
		}
	}
	c.h.ServeHTTP(w, r)
}

func startRegistry(t testing.TB) (*countingHandler, string) {
	t.Helper()
	ch := &countingHandler{h: registry.New(registry.Logger(nilLogger()))}
	srv := httptest.NewServer(ch)
	t.Cleanup(srv.Close)
	return ch, strings.TrimPrefix(srv.URL, "http://")
}

func push(t testing.TB, ref string, img v1.Image) {
	t.Helper()
	r, err := name.ParseReference(ref)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(r, img); err != nil {
		t.Fatal(err)
	}
}

func openStore(t testing.TB, root string) *Store {
	t.Helper()
	s, err := Open(WithRoot(root))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

func TestPullPolicies(t *testing.T) {
	ch, host := startRegistry(t)
	base, top := testLayers(t)
	img := buildImage(t, v1.Config{Cmd: []string{"/bin/sh"}, Env: []string{"PATH=/bin"}}, base, top)
	ref := host + "/test/app:v1"
	push(t, ref, img)

	s := openStore(t, t.TempDir())
	ctx := context.Background()
	if _, err := s.Pull(ctx, ref, WithPolicy(PullNever)); !errors.Is(err, ErrNotPresent) {
		t.Fatalf("PullNever on empty cache: %v, want ErrNotPresent", err)
	}
	var mu sync.Mutex
	last := map[string]Progress{}
	got, err := s.Pull(ctx, ref, WithProgress(func(p Progress) {
		mu.Lock()
		last[p.Layer] = p
		mu.Unlock()
	}))
	if err != nil {
		t.Fatal(err)
	}
	want, _ := img.Digest()
	if got.Digest != want.String() || len(got.Layers) != 2 {
		t.Fatalf("pulled %s with %d layers, want %s with 2", got.Digest, len(got.Layers), want)
	}
	for _, l := range got.Layers {
		p, ok := last[l.Digest]
		if !ok || p.Done != l.Size || p.Total != l.Size || p.Cached {
			t.Errorf("last progress for %s = %+v, want done=total=%d", l.Digest, p, l.Size)
		}
		if fi, err := os.Stat(l.Path); err != nil || fi.Size()%4096 != 0 {
			t.Errorf("layer image %s: %v", l.Path, err)
		}
	}
	if lp := got.LayerPaths(); lp[0] != got.Layers[1].Path {
		t.Error("LayerPaths is not top-first")
	}
	if got.Config.Config.Cmd[0] != "/bin/sh" {
		t.Errorf("config Cmd = %v", got.Config.Config.Cmd)
	}

	// IfMissing: served from the cache, no registry traffic.
	before := ch.all.Load()
	if _, err := s.Pull(ctx, ref); err != nil {
		t.Fatal(err)
	}
	if n := ch.all.Load() - before; n != 0 {
		t.Errorf("PullIfMissing with a cached image made %d requests", n)
	}
	// Never: served from the cache too.
	if _, err := s.Pull(ctx, ref, WithPolicy(PullNever)); err != nil {
		t.Fatal(err)
	}
	// Always: resolves the manifest but downloads no cached layer.
	blobsBefore := ch.blobs.Load()
	if _, err := s.Pull(ctx, ref, WithPolicy(PullAlways)); err != nil {
		t.Fatal(err)
	}
	if n := ch.blobs.Load() - blobsBefore; n > 1 { // the config blob at most
		t.Errorf("PullAlways downloaded %d blobs for a cached image", n)
	}
	// By digest, and Get by reference.
	if _, err := s.Pull(ctx, host+"/test/app@"+want.String()); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Get(ctx, ref); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Pull(ctx, host+"/test/nothing:here"); !errors.Is(err, ErrNotFound) {
		t.Errorf("missing repo: %v, want ErrNotFound", err)
	}
	assertNoScratch(t, s)
}

// countFiles counts the files in root/dir whose names end in suffix.
func countFiles(t testing.TB, root, dir, suffix string) int {
	t.Helper()
	ents, err := os.ReadDir(filepath.Join(root, dir))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	n := 0
	for _, e := range ents {
		if strings.HasSuffix(e.Name(), suffix) {
			n++
		}
	}
	return n
}

func assertNoScratch(t testing.TB, s *Store) {
	t.Helper()
	ents, _ := os.ReadDir(filepath.Join(s.Root(), "tmp"))
	if len(ents) != 0 {
		t.Errorf("%d scratch files left in tmp/", len(ents))
	}
}

func TestPullIndexResolvesAmd64(t *testing.T) {
	_, host := startRegistry(t)
	bb := busyboxLayer(t)
	amd := buildImage(t, v1.Config{Cmd: []string{"sh"}}, bb)
	arm := buildImage(t, v1.Config{Cmd: []string{"arm"}}, mkTar(t, tent{name: "arm", body: "arm"}))
	idx := mutate.AppendManifests(empty.Index,
		mutate.IndexAddendum{Add: arm, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "arm64"}}},
		mutate.IndexAddendum{Add: amd, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "amd64"}}},
	)
	r, _ := name.ParseReference(host + "/multi:latest")
	if err := remote.WriteIndex(r, idx); err != nil {
		t.Fatal(err)
	}
	armOnly := mutate.AppendManifests(empty.Index,
		mutate.IndexAddendum{Add: arm, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "arm64"}}})
	r2, _ := name.ParseReference(host + "/armonly:latest")
	if err := remote.WriteIndex(r2, armOnly); err != nil {
		t.Fatal(err)
	}
	s := openStore(t, t.TempDir())
	img, err := s.Pull(context.Background(), host+"/multi:latest")
	if err != nil {
		t.Fatal(err)
	}
	want, _ := amd.Digest()
	if img.Digest != want.String() {
		t.Fatalf("resolved %s, want the amd64 manifest %s", img.Digest, want)
	}
	if _, err := s.Pull(context.Background(), host+"/armonly:latest"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("arm64-only index: %v, want ErrNotFound", err)
	}
}

func TestPullCorruptLayer(t *testing.T) {
	ch, host := startRegistry(t)
	base, _ := testLayers(t)
	img := buildImage(t, v1.Config{}, base)
	push(t, host+"/bad:1", img)
	ls, _ := img.Layers()
	d, _ := ls[0].Digest()
	ch.corrupt = d.Hex
	s := openStore(t, t.TempDir())
	_, err := s.Pull(context.Background(), host+"/bad:1")
	var de *DigestError
	if !errors.Is(err, ErrDigestMismatch) && !errors.As(err, &de) {
		t.Fatalf("corrupt blob: %v, want ErrDigestMismatch", err)
	}
	if exists(filepath.Join(s.Root(), "blobs", "sha256", d.Hex)) {
		t.Error("corrupt blob was kept")
	}
	if ents, _ := os.ReadDir(filepath.Join(s.Root(), "layers", "sha256")); len(ents) != 0 {
		t.Errorf("%d layer images kept after a failed pull", len(ents))
	}
	assertNoScratch(t, s)
}

func TestPullWrongDiffID(t *testing.T) {
	_, host := startRegistry(t)
	base, top := testLayers(t)
	img := buildImage(t, v1.Config{}, base)
	cf, _ := img.ConfigFile()
	cf = cf.DeepCopy()
	cf.RootFS.DiffIDs[0], _ = v1.NewHash(digestOf(top))
	img, err := mutate.ConfigFile(img, cf)
	if err != nil {
		t.Fatal(err)
	}
	push(t, host+"/baddiff:1", img)
	s := openStore(t, t.TempDir())
	_, err = s.Pull(context.Background(), host+"/baddiff:1")
	var de *DigestError
	if !errors.As(err, &de) || !strings.Contains(de.What, "diff_id") {
		t.Fatalf("wrong diff_id: %v, want a diff_id DigestError", err)
	}
	assertNoScratch(t, s)
}

func TestPullCredentials(t *testing.T) {
	ch, host := startRegistry(t)
	img := buildImage(t, v1.Config{}, mkTar(t, tent{name: "f", body: "x"}))
	push(t, host+"/private:1", img)
	ch.user, ch.pass = "alice", "s3cret"
	s := openStore(t, t.TempDir())
	if _, err := s.Pull(context.Background(), host+"/private:1"); err == nil {
		t.Fatal("pull without credentials succeeded")
	}
	if _, err := s.Pull(context.Background(), host+"/private:1", WithCredentials("alice", "s3cret")); err != nil {
		t.Fatal(err)
	}
}

func TestStoreConcurrentPulls(t *testing.T) {
	_, host := startRegistry(t)
	base, top := testLayers(t)
	push(t, host+"/shared:1", buildImage(t, v1.Config{}, base, top))
	push(t, host+"/shared:2", buildImage(t, v1.Config{}, base))
	root := t.TempDir()
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for i := 0; i < 4; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s, err := Open(WithRoot(root)) // separate Stores: separate lock fds
			if err != nil {
				errs <- err
				return
			}
			_, err = s.Pull(context.Background(), host+"/shared:"+string(rune('1'+i%2)))
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	s := openStore(t, root)
	if n := countFiles(t, root, "layers/sha256", ".sqfs"); n != 2 {
		t.Errorf("%d layer images, want 2 (base shared)", n)
	}
	if n := countFiles(t, root, "layers/sha256", ".idx"); n != 2 {
		t.Errorf("%d layer indexes, want 2", n)
	}
	// The top layer's opaque var/cache hides base entries: one variant.
	if n := countFiles(t, root, "layers/chain", ".sqfs"); n != 1 {
		t.Errorf("%d chain variants, want 1", n)
	}
	list, err := s.List(context.Background())
	if err != nil || len(list) != 2 {
		t.Fatalf("List = %v, %v", list, err)
	}
	assertNoScratch(t, s)

	// Remove one reference: Prune keeps the shared base, drops the top.
	if err := s.Remove(context.Background(), host+"/shared:1"); err != nil {
		t.Fatal(err)
	}
	if err := s.Remove(context.Background(), host+"/shared:1"); !errors.Is(err, ErrNotPresent) {
		t.Errorf("second Remove: %v, want ErrNotPresent", err)
	}
	rep, err := s.Prune(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if rep.Files < 3 { // top blob, top layer image, manifest (+config)
		t.Errorf("Prune removed %d files", rep.Files)
	}
	if _, err := s.Get(context.Background(), host+"/shared:2"); err != nil {
		t.Fatalf("image 2 broken after prune: %v", err)
	}
	if n := countFiles(t, root, "layers/sha256", ""); n != 2 {
		t.Errorf("%d layer images and indexes after prune, want 2", n)
	}
	if n := countFiles(t, root, "layers/chain", ""); n != 0 {
		t.Errorf("%d chain variants after prune, want 0", n)
	}
	_ = s.Close()
	_ = s.Close()
	if _, err := s.List(context.Background()); !errors.Is(err, ErrClosed) {
		t.Errorf("List after Close: %v", err)
	}
}

func nilLogger() *log.Logger { return log.New(io.Discard, "", 0) }

// TestNoLeaks pulls, lazily opens and loads images, closes everything and
// checks that goroutines return to the baseline and no scratch file stays.
func TestNoLeaks(t *testing.T) {
	_, host := startRegistry(t)
	base, top := testLayers(t)
	push(t, host+"/leak:1", buildImage(t, v1.Config{}, base, top))
	push(t, host+"/leak:lazy", buildEStargzImage(t, v1.Config{}, nil, base))
	before := runtime.NumGoroutine()
	for i := 0; i < 3; i++ {
		s, err := Open(WithRoot(t.TempDir()))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := s.Pull(context.Background(), host+"/leak:1"); err != nil {
			t.Fatal(err)
		}
		li, err := s.OpenLazy(context.Background(), host+"/leak:lazy")
		if err != nil {
			t.Fatal(err)
		}
		if _, err := li.ReadFile(context.Background(), "etc/passwd"); err != nil {
			t.Fatal(err)
		}
		_ = li.Close()
		var buf bytes.Buffer
		if err := s.Save(context.Background(), &buf, FormatBoth, host+"/leak:1"); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Load(context.Background(), &buf); err != nil {
			t.Fatal(err)
		}
		assertNoScratch(t, s)
		_ = s.Close()
	}
	// Idle connection goroutines exit asynchronously after Close; wait for
	// them (this is a condition, not a timing assertion).
	deadline := time.Now().Add(10 * time.Second)
	for runtime.NumGoroutine() > before && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if n := runtime.NumGoroutine(); n > before {
		buf := make([]byte, 1<<20)
		t.Fatalf("%d goroutines before, %d after:\n%s", before, n, buf[:runtime.Stack(buf, true)])
	}
}

func TestVerifyDetectsCorruption(t *testing.T) {
	_, host := startRegistry(t)
	base, _ := testLayers(t)
	ref := host + "/verify:1"
	push(t, ref, buildImage(t, v1.Config{Cmd: []string{"x"}}, base))
	s := openStore(t, t.TempDir())
	img, err := s.Pull(context.Background(), ref)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Verify(context.Background(), ref); err != nil {
		t.Fatal(err)
	}
	if c, err := img.Command(Overrides{}); err != nil || c.Args[0] != "x" {
		t.Fatalf("Command = %+v, %v", c, err)
	}
	bp, _ := s.blobPath(img.Layers[0].Digest)
	if err := os.WriteFile(bp, []byte("tampered"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := s.Verify(context.Background(), ref); !errors.Is(err, ErrDigestMismatch) {
		t.Fatalf("Verify after tampering: %v, want ErrDigestMismatch", err)
	}
}

func TestPullHostileLayer(t *testing.T) {
	_, host := startRegistry(t)
	bad := mkTar(t, tent{name: "ok", body: strings.Repeat("x", 1<<20)}, tent{name: "../../etc/cron.d/evil", body: "boom"})
	push(t, host+"/evil:1", buildImage(t, v1.Config{}, bad))
	s := openStore(t, t.TempDir())
	_, err := s.Pull(context.Background(), host+"/evil:1")
	var le *LayerError
	if !errors.Is(err, ErrUnsafePath) || !errors.As(err, &le) || le.Path != "../../etc/cron.d/evil" {
		t.Fatalf("err = %v, want a *LayerError wrapping ErrUnsafePath", err)
	}
	if ents, _ := os.ReadDir(filepath.Join(s.Root(), "layers", "sha256")); len(ents) != 0 {
		t.Errorf("%d layer images kept", len(ents))
	}
	assertNoScratch(t, s)
}

// TestPullInsecureOnlyWhenAsked serves the registry over TLS with a
// self-signed certificate: the pull fails certificate verification unless
// WithInsecure is given.
func TestPullInsecureOnlyWhenAsked(t *testing.T) {
	srv := httptest.NewTLSServer(registry.New(registry.Logger(nilLogger())))
	t.Cleanup(srv.Close)
	host := strings.TrimPrefix(srv.URL, "https://")
	img := buildImage(t, v1.Config{}, mkTar(t, tent{name: "f", body: "x"}))
	r, _ := name.ParseReference(host + "/tls:1")
	if err := remote.Write(r, img, remote.WithTransport(srv.Client().Transport)); err != nil {
		t.Fatal(err)
	}
	s := openStore(t, t.TempDir())
	if _, err := s.Pull(context.Background(), host+"/tls:1"); err == nil {
		t.Fatal("pull from a registry with an untrusted certificate succeeded without WithInsecure")
	}
	if _, err := s.Pull(context.Background(), host+"/tls:1", WithInsecure()); err != nil {
		t.Fatalf("WithInsecure: %v", err)
	}
}

// TestPullRepeatedLayer pulls an image that lists the same (empty) layer
// several times, as many Dockerfile builds do.
func TestPullRepeatedLayer(t *testing.T) {
	_, host := startRegistry(t)
	emptyLayer := mkTar(t)
	f := mkTar(t, tent{name: "f", body: "x"})
	push(t, host+"/rep:1", buildImage(t, v1.Config{}, emptyLayer, f, emptyLayer, emptyLayer))
	s := openStore(t, t.TempDir())
	img, err := s.Pull(context.Background(), host+"/rep:1")
	if err != nil {
		t.Fatal(err)
	}
	if len(img.Layers) != 4 || img.Layers[0].Path != img.Layers[3].Path {
		t.Fatalf("layers %+v", img.Layers)
	}
	if err := s.Verify(context.Background(), host+"/rep:1"); err != nil {
		t.Fatal(err)
	}
}
