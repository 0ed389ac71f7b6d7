package kernel

import (
	"archive/zip"
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"golang.org/x/mod/sumdb/dirhash"

	"github.com/gosandbox/sandbox/vmm/guestmem"
	"github.com/gosandbox/sandbox/vmm/linuxboot"
	"github.com/gosandbox/sandbox/vmm/linuxboot/linuxboottest"
)

// fakeVersion is a module version no real proxy has.
const fakeVersion = "v0.0.0-20990101000000-0123456789ab"

// synthBzImage is a tiny bzImage with a zstd payload holding
// linuxboottest.Kernel.
func synthBzImage(t testing.TB) []byte {
	t.Helper()
	p, err := linuxboottest.Compress("zstd", linuxboottest.Kernel())
	if err != nil {
		t.Fatal(err)
	}
	return linuxboottest.BzImage(p)
}

// moduleZip builds a module zip for Module@version holding files, and
// returns it with its h1: hash.
func moduleZip(t testing.TB, version string, files map[string][]byte) ([]byte, string) {
	t.Helper()
	var buf bytes.Buffer
	w := zip.NewWriter(&buf)
	for name, data := range files {
		f, err := w.Create(Module + "@" + version + "/" + name)
		if err != nil {
			t.Fatal(err)
		}
		f.Write(data)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "m.zip")
	if err := os.WriteFile(path, buf.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	sum, err := dirhash.HashZip(path, dirhash.Hash1)
	if err != nil {
		t.Fatal(err)
	}
	return buf.Bytes(), sum
}

// testProxy is a Go module proxy on loopback serving module zips.
type testProxy struct {
	*httptest.Server
	mu       sync.Mutex
	zips     map[string][]byte // version -> zip
	requests atomic.Int32
}

func newTestProxy(t testing.TB) *testProxy {
	p := &testProxy{zips: map[string][]byte{}}
	p.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p.requests.Add(1)
		prefix := "/" + Module + "/@v/"
		v, ok := strings.CutPrefix(r.URL.Path, prefix)
		v, isZip := strings.CutSuffix(v, ".zip")
		p.mu.Lock()
		z, found := p.zips[v]
		p.mu.Unlock()
		if !ok || !isZip || !found {
			http.NotFound(w, r)
			return
		}
		w.Write(z)
	}))
	t.Cleanup(p.Close)
	return p
}

func (p *testProxy) serve(version string, zip []byte) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.zips[version] = zip
}

// countHandler counts log records by message.
type countHandler struct {
	mu   sync.Mutex
	msgs map[string]int
	t    testing.TB
}

func (h *countHandler) Enabled(context.Context, slog.Level) bool { return true }
func (h *countHandler) Handle(_ context.Context, r slog.Record) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.msgs[r.Message]++
	return nil
}
func (h *countHandler) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h *countHandler) WithGroup(string) slog.Handler      { return h }
func (h *countHandler) count(msg string) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.msgs[msg]
}

func newCounter() (*countHandler, *slog.Logger) {
	h := &countHandler{msgs: map[string]int{}}
	return h, slog.New(h)
}

// isolated returns options that use only what the test gives: a fresh
// cache, no module cache, the given GOPROXY.
func isolated(t testing.TB, goproxy string) []Option {
	return []Option{WithCacheDir(t.TempDir()), WithModCache(""), WithGOPROXY(goproxy),
		WithGetenv(func(string) string { return "" })}
}

func TestProxyTamperedZip(t *testing.T) {
	p := newTestProxy(t)
	// The pinned version, but a zip with another kernel in it.
	z, _ := moduleZip(t, Version, map[string][]byte{"go.mod": []byte("module " + Module + "\n"), KernelFile: synthBzImage(t)})
	p.serve(Version, z)
	cache := t.TempDir()
	opts := append(isolated(t, p.URL), WithCacheDir(cache))
	k, err := Default(context.Background(), opts...)
	var ce *ChecksumError
	if k != nil || !errors.Is(err, ErrChecksum) || !errors.As(err, &ce) {
		t.Fatalf("Default = %v, %v; want a *ChecksumError", k, err)
	}
	if ce.Source != SourceProxy || !strings.HasPrefix(ce.Path, p.URL) || ce.Want != Sum || ce.Got == Sum {
		t.Fatalf("ChecksumError = %+v", ce)
	}
	if !strings.Contains(err.Error(), "GOPROXY") {
		t.Errorf("error does not tell what to do: %v", err)
	}
	// Nothing unverified is left in the cache.
	for _, dir := range []string{"modules", "vmlinux"} {
		if _, err := os.Stat(filepath.Join(cache, dir)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s exists after a checksum failure", dir)
		}
	}
	if ents, _ := os.ReadDir(filepath.Join(cache, "tmp")); len(ents) != 0 {
		t.Errorf("temporary files left: %v", ents)
	}
	// A zip that is not a zip is corrupt too.
	p.serve(Version, []byte("not a zip"))
	if _, err := Default(context.Background(), opts...); !errors.Is(err, ErrChecksum) {
		t.Fatalf("garbage zip: err = %v, want ErrChecksum", err)
	}
}

func TestProxyGoodZip(t *testing.T) {
	p := newTestProxy(t)
	bz := synthBzImage(t)
	z, sum := moduleZip(t, fakeVersion, map[string][]byte{"go.mod": []byte("module " + Module + "\n"), KernelFile: bz, "README.md": []byte("hi")})
	p.serve(fakeVersion, z)
	h, log := newCounter()
	opts := append(isolated(t, p.URL), WithModuleVersion(fakeVersion, sum), WithLogger(log))
	k, err := Default(context.Background(), opts...)
	if err != nil {
		t.Fatal(err)
	}
	if k.Source != SourceProxy || k.Module != Module+"@"+fakeVersion || k.SetupHeader == nil {
		t.Fatalf("kernel = %+v", k)
	}
	got, _ := os.ReadFile(k.Path)
	if !bytes.Equal(got, bz) {
		t.Fatal("cached bzImage differs from the module's")
	}
	elf, _ := os.ReadFile(k.Vmlinux)
	if !bytes.Equal(elf, linuxboottest.Kernel()) || k.VmlinuxSize != int64(len(elf)) {
		t.Fatal("extracted vmlinux differs")
	}
	// Second call: from the cache, no download, no extraction.
	k2, err := Default(context.Background(), opts...)
	if err != nil {
		t.Fatal(err)
	}
	if k2.Source != SourceCache || k2.Vmlinux != k.Vmlinux || k2.SHA256 != k.SHA256 || !bytes.Equal(k2.SetupHeader, k.SetupHeader) {
		t.Fatalf("second call = %+v", k2)
	}
	if n := p.requests.Load(); n != 1 {
		t.Errorf("%d proxy requests, want 1", n)
	}
	if n := h.count("kernel: extracting vmlinux"); n != 1 {
		t.Errorf("%d extractions, want 1", n)
	}
	// A different pinned sum must not be satisfied by the cache.
	_, err = Default(context.Background(), append(opts, WithModuleVersion(fakeVersion, Sum))...)
	if !errors.Is(err, ErrChecksum) {
		t.Fatalf("other sum: err = %v, want ErrChecksum", err)
	}

	// The kernel loads.
	mem, err := guestmem.New(64 << 20)
	if err != nil {
		t.Fatal(err)
	}
	defer mem.Close()
	l, err := k.Load(mem, linuxboot.Config{Cmdline: "console=ttyS0"})
	if err != nil {
		t.Fatal(err)
	}
	if l.Entry != linuxboottest.KernelEntry {
		t.Fatalf("entry %#x", l.Entry)
	}
	if v, _ := mem.Uint32(linuxboot.ZeroPageAddr + 0x238); v != 2047 {
		t.Errorf("cmdline_size in the zero page = %d, want the bzImage's 2047", v)
	}
}

func TestGOPROXYList(t *testing.T) {
	good := newTestProxy(t)
	empty := newTestProxy(t) // 404 for everything
	z, sum := moduleZip(t, fakeVersion, map[string][]byte{KernelFile: synthBzImage(t)})
	good.serve(fakeVersion, z)
	dead := "http://127.0.0.1:1" // nothing listens on port 1
	cases := []struct {
		list string
		want error // nil: success
	}{
		{empty.URL + "," + good.URL, nil},
		{dead + "|" + good.URL, nil},
		{dead + "," + good.URL, ErrDownload},
		{empty.URL, ErrKernelNotFound},
		{"off," + good.URL, ErrKernelNotFound},
		{"direct", ErrKernelNotFound},
		{"direct," + good.URL, nil},
		{"file://" + t.TempDir(), ErrKernelNotFound},
	}
	for _, c := range cases {
		t.Run(c.list, func(t *testing.T) {
			k, err := Default(context.Background(), append(isolated(t, c.list), WithModuleVersion(fakeVersion, sum))...)
			if c.want == nil {
				if err != nil || k.Source != SourceProxy {
					t.Fatalf("Default = %+v, %v", k, err)
				}
				return
			}
			if !errors.Is(err, c.want) {
				t.Fatalf("err = %v, want %v", err, c.want)
			}
			if c.list == "direct" && !strings.Contains(err.Error(), "version control") {
				t.Errorf("error does not explain direct: %v", err)
			}
		})
	}
}

func TestFileProxy(t *testing.T) {
	dir := t.TempDir()
	z, sum := moduleZip(t, fakeVersion, map[string][]byte{KernelFile: synthBzImage(t)})
	zdir := filepath.Join(dir, Module, "@v")
	os.MkdirAll(zdir, 0o755)
	os.WriteFile(filepath.Join(zdir, fakeVersion+".zip"), z, 0o644)
	k, err := Default(context.Background(), append(isolated(t, "file://"+dir), WithModuleVersion(fakeVersion, sum))...)
	if err != nil || k.Source != SourceProxy {
		t.Fatalf("Default = %+v, %v", k, err)
	}
}

// fakeModCache lays out Module@version in a module cache directory, as an
// extracted directory and/or a download zip.
func fakeModCache(t *testing.T, version string, files map[string][]byte, extracted, zipped bool) (string, string) {
	mc := t.TempDir()
	z, sum := moduleZip(t, version, files)
	if extracted {
		dir := filepath.Join(mc, Module+"@"+version)
		os.MkdirAll(dir, 0o755)
		for name, data := range files {
			os.WriteFile(filepath.Join(dir, name), data, 0o444)
		}
	}
	if zipped {
		dir := filepath.Join(mc, "cache", "download", Module, "@v")
		os.MkdirAll(dir, 0o755)
		os.WriteFile(filepath.Join(dir, version+".zip"), z, 0o444)
	}
	return mc, sum
}

func TestModCacheSynthetic(t *testing.T) {
	files := map[string][]byte{"go.mod": []byte("module " + Module + "\n"), KernelFile: synthBzImage(t)}
	t.Run("dir", func(t *testing.T) {
		mc, sum := fakeModCache(t, fakeVersion, files, true, false)
		k, err := Default(context.Background(), append(isolated(t, "off"), WithModCache(mc), WithModuleVersion(fakeVersion, sum))...)
		if err != nil || k.Source != SourceModCache {
			t.Fatalf("Default = %+v, %v", k, err)
		}
	})
	t.Run("zip", func(t *testing.T) {
		mc, sum := fakeModCache(t, fakeVersion, files, false, true)
		k, err := Default(context.Background(), append(isolated(t, "off"), WithModCache(mc), WithModuleVersion(fakeVersion, sum))...)
		if err != nil || k.Source != SourceModCacheZip {
			t.Fatalf("Default = %+v, %v", k, err)
		}
	})
	t.Run("tampered dir", func(t *testing.T) {
		mc, sum := fakeModCache(t, fakeVersion, files, true, false)
		dir := filepath.Join(mc, Module+"@"+fakeVersion)
		os.Chmod(filepath.Join(dir, "go.mod"), 0o644)
		os.WriteFile(filepath.Join(dir, "go.mod"), []byte("module evil\n"), 0o644)
		_, err := Default(context.Background(), append(isolated(t, "off"), WithModCache(mc), WithModuleVersion(fakeVersion, sum))...)
		var ce *ChecksumError
		if !errors.As(err, &ce) || ce.Source != SourceModCache || ce.Path != dir || !strings.Contains(err.Error(), "go clean -modcache") {
			t.Fatalf("err = %v, want a *ChecksumError naming %s", err, dir)
		}
	})
	t.Run("tampered zip", func(t *testing.T) {
		mc, _ := fakeModCache(t, fakeVersion, files, false, true)
		_, err := Default(context.Background(), append(isolated(t, "off"), WithModCache(mc), WithModuleVersion(fakeVersion, "h1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="))...)
		var ce *ChecksumError
		if !errors.As(err, &ce) || ce.Source != SourceModCacheZip || !strings.HasSuffix(ce.Path, fakeVersion+".zip") || !strings.Contains(err.Error(), "rm ") {
			t.Fatalf("err = %v, want a *ChecksumError naming the zip", err)
		}
	})
	t.Run("missing, GOPROXY=off", func(t *testing.T) {
		_, err := Default(context.Background(), append(isolated(t, "off"), WithModCache(t.TempDir()), WithModuleVersion(fakeVersion, "h1:x"))...)
		var nf *NotFoundError
		if !errors.Is(err, ErrKernelNotFound) || !errors.As(err, &nf) || len(nf.Tried) != 2 {
			t.Fatalf("err = %v, want a *NotFoundError after trying the dir and the zip", err)
		}
	})
}

// realModCache returns the module cache holding the pinned module, or skips.
func realModCache(t testing.TB) string {
	mc := newGoEnv(os.Getenv).modCache()
	if _, err := os.Stat(filepath.Join(mc, Module+"@"+Version, KernelFile)); err != nil {
		t.Skipf("%s@%s not in the Go module cache %s (go mod download %s@%s)", Module, Version, mc, Module, Version)
	}
	return mc
}

func TestModCacheReal(t *testing.T) {
	mc := realModCache(t)
	h, log := newCounter()
	k, err := Default(context.Background(), WithCacheDir(t.TempDir()), WithModCache(mc), WithGOPROXY("off"), WithLogger(log))
	if err != nil {
		t.Fatal(err)
	}
	if k.Source != SourceModCache || k.Module != Module+"@"+Version || k.VmlinuxSize < 10<<20 || h.count("kernel: extracting vmlinux") != 1 {
		t.Fatalf("kernel = %+v", k)
	}
	mem, err := guestmem.New(256 << 20)
	if err != nil {
		t.Fatal(err)
	}
	defer mem.Close()
	l, err := k.Load(mem, linuxboot.Config{Cmdline: "console=ttyS0"})
	if err != nil {
		t.Fatal(err)
	}
	ins := make([]byte, 3)
	mem.ReadAt(ins, l.Entry)
	if !bytes.Equal(ins, []byte{0x49, 0x89, 0xf7}) {
		t.Fatalf("entry %#x holds % x, not startup_64", l.Entry, ins)
	}
}

func TestProxyRealZip(t *testing.T) {
	mc := realModCache(t)
	z, err := os.ReadFile(filepath.Join(mc, "cache", "download", Module, "@v", Version+".zip"))
	if err != nil {
		t.Skip(err)
	}
	p := newTestProxy(t)
	p.serve(Version, z)
	k, err := Default(context.Background(), isolated(t, p.URL)...)
	if err != nil {
		t.Fatal(err)
	}
	if k.Source != SourceProxy || k.Module != Module+"@"+Version {
		t.Fatalf("kernel = %+v", k)
	}
}

func TestConcurrentDefault(t *testing.T) {
	p := newTestProxy(t)
	z, sum := moduleZip(t, fakeVersion, map[string][]byte{KernelFile: synthBzImage(t)})
	p.serve(fakeVersion, z)
	h, log := newCounter()
	opts := append(isolated(t, p.URL), WithModuleVersion(fakeVersion, sum), WithLogger(log))
	const n = 8
	var wg sync.WaitGroup
	ks := make([]*Kernel, n)
	errs := make([]error, n)
	for i := range n {
		wg.Go(func() { ks[i], errs[i] = Default(context.Background(), opts...) })
	}
	wg.Wait()
	for i := range n {
		if errs[i] != nil {
			t.Fatal(errs[i])
		}
		if ks[i].Vmlinux != ks[0].Vmlinux {
			t.Fatalf("different vmlinux paths %s, %s", ks[i].Vmlinux, ks[0].Vmlinux)
		}
	}
	if got := h.count("kernel: extracting vmlinux"); got != 1 {
		t.Errorf("%d extractions, want 1", got)
	}
	if got := p.requests.Load(); got != 1 {
		t.Errorf("%d downloads, want 1", got)
	}
}

func TestLockHonoursContext(t *testing.T) {
	o, err := makeOptions(isolated(t, "off"))
	if err != nil {
		t.Fatal(err)
	}
	unlock, err := o.lock(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer unlock()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := o.lock(ctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("second lock with a cancelled context: %v", err)
	}
}

func TestFromFile(t *testing.T) {
	dir := t.TempDir()
	bzPath := filepath.Join(dir, "bzImage")
	os.WriteFile(bzPath, synthBzImage(t), 0o644)
	h, log := newCounter()
	opts := []Option{WithCacheDir(t.TempDir()), WithLogger(log)}
	k, err := FromFile(context.Background(), bzPath, opts...)
	if err != nil {
		t.Fatal(err)
	}
	if k.Source != SourceFile || k.Path != bzPath || k.Vmlinux == bzPath || k.SetupHeader == nil || !k.Mappable() {
		t.Fatalf("kernel = %+v", k)
	}
	k2, err := FromFile(context.Background(), bzPath, opts...)
	if err != nil || k2.Vmlinux != k.Vmlinux || h.count("kernel: extracting vmlinux") != 1 {
		t.Fatalf("second call = %+v, %v; %d extractions", k2, err, h.count("kernel: extracting vmlinux"))
	}

	elfPath := filepath.Join(dir, "vmlinux")
	os.WriteFile(elfPath, linuxboottest.Kernel(), 0o644)
	k, err = FromFile(context.Background(), elfPath, opts...)
	if err != nil || k.Vmlinux != elfPath || k.SetupHeader != nil || k.Mappable() {
		t.Fatalf("ELF: %+v, %v", k, err)
	}

	bad := map[string][]byte{
		"garbage":   []byte("hello"),
		"truncated": synthBzImage(t)[:0x300],
		"bad ELF":   linuxboottest.Kernel()[:100],
		"not x86":   append([]byte("\x7fELF\x02\x01\x01"), make([]byte, 100)...),
	}
	for name, data := range bad {
		p := filepath.Join(dir, name)
		os.WriteFile(p, data, 0o644)
		if _, err := FromFile(context.Background(), p, opts...); !errors.Is(err, linuxboot.ErrFormat) {
			t.Errorf("%s: err = %v, want linuxboot.ErrFormat", name, err)
		}
	}
	if _, err := FromFile(context.Background(), filepath.Join(dir, "missing"), opts...); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing file: err = %v", err)
	}
}

func TestGoEnv(t *testing.T) {
	env := func(kv ...string) func(string) string {
		m := map[string]string{"GOENV": "off"}
		for i := 0; i < len(kv); i += 2 {
			m[kv[i]] = kv[i+1]
		}
		return func(k string) string { return m[k] }
	}
	cases := []struct {
		getenv       func(string) string
		modc, goprox string
	}{
		{env("GOMODCACHE", "/mc", "GOPATH", "/gp", "HOME", "/h"), "/mc", defaultGOPROXY},
		{env("GOPATH", "/gp1:/gp2", "HOME", "/h", "GOPROXY", "off"), "/gp1/pkg/mod", "off"},
		{env("HOME", "/h"), "/h/go/pkg/mod", defaultGOPROXY},
	}
	for _, c := range cases {
		e := newGoEnv(c.getenv)
		if got := e.modCache(); got != c.modc {
			t.Errorf("modCache = %q, want %q", got, c.modc)
		}
		if got := e.proxy(); got != c.goprox {
			t.Errorf("proxy = %q, want %q", got, c.goprox)
		}
	}
	// The go env file is read when the environment does not say.
	f := filepath.Join(t.TempDir(), "env")
	os.WriteFile(f, []byte("GOPROXY=https://example.test/proxy\nGOMODCACHE=/from/file\n"), 0o644)
	e := newGoEnv(func(k string) string { return map[string]string{"GOENV": f}[k] })
	if e.proxy() != "https://example.test/proxy" || e.modCache() != "/from/file" {
		t.Errorf("go env file not used: %q %q", e.proxy(), e.modCache())
	}
}

func TestParseGOPROXY(t *testing.T) {
	got := parseGOPROXY("https://a.example/, https://b.example|direct,,off")
	want := []proxyEntry{{"https://a.example", false}, {"https://b.example", true}, {"direct", false}, {"off", false}}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("parseGOPROXY = %v, want %v", got, want)
	}
}

func BenchmarkExtractVmlinux(b *testing.B) {
	mc := realModCache(b)
	data, err := os.ReadFile(filepath.Join(mc, Module+"@"+Version, KernelFile))
	if err != nil {
		b.Fatal(err)
	}
	z, err := linuxboot.ParseBzImage(data)
	if err != nil {
		b.Fatal(err)
	}
	b.SetBytes(int64(len(data)))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := z.Vmlinux(); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkDefaultCached(b *testing.B) {
	mc := realModCache(b)
	opts := []Option{WithCacheDir(b.TempDir()), WithModCache(mc), WithGOPROXY("off")}
	if _, err := Default(context.Background(), opts...); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		k, err := Default(context.Background(), opts...)
		if err != nil || k.Source != SourceCache {
			b.Fatal(k, err)
		}
	}
}

func BenchmarkDefaultCold(b *testing.B) {
	mc := realModCache(b)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := Default(context.Background(), WithCacheDir(b.TempDir()), WithModCache(mc), WithGOPROXY("off")); err != nil {
			b.Fatal(err)
		}
	}
}

// TestMain lets the test binary act as a separate process calling Default
// (TestConcurrentProcesses).
func TestMain(m *testing.M) {
	if dir := os.Getenv("KERNEL_TEST_HELPER_CACHE"); dir != "" {
		h := slog.NewTextHandler(os.Stderr, nil)
		k, err := Default(context.Background(), WithCacheDir(dir), WithModCache(os.Getenv("KERNEL_TEST_HELPER_MODCACHE")),
			WithGOPROXY("off"), WithModuleVersion(fakeVersion, os.Getenv("KERNEL_TEST_HELPER_SUM")), WithLogger(slog.New(h)),
			WithGetenv(func(string) string { return "" }))
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		fmt.Println(k.Vmlinux)
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func TestConcurrentProcesses(t *testing.T) {
	mc, sum := fakeModCache(t, fakeVersion, map[string][]byte{KernelFile: synthBzImage(t)}, false, true)
	cache := t.TempDir()
	// A stale temporary file from a process that died mid-write.
	os.MkdirAll(filepath.Join(cache, "tmp"), 0o755)
	os.WriteFile(filepath.Join(cache, "tmp", "part-stale"), []byte("x"), 0o644)
	const n = 4
	cmds := make([]*exec.Cmd, n)
	outs := make([]*bytes.Buffer, n)
	errs := make([]*bytes.Buffer, n)
	for i := range n {
		cmds[i] = exec.Command(os.Args[0], "-test.run=^$")
		cmds[i].Env = append(os.Environ(), "KERNEL_TEST_HELPER_CACHE="+cache, "KERNEL_TEST_HELPER_MODCACHE="+mc, "KERNEL_TEST_HELPER_SUM="+sum)
		outs[i], errs[i] = new(bytes.Buffer), new(bytes.Buffer)
		cmds[i].Stdout, cmds[i].Stderr = outs[i], errs[i]
		if err := cmds[i].Start(); err != nil {
			t.Fatal(err)
		}
	}
	extractions := 0
	for i := range n {
		if err := cmds[i].Wait(); err != nil {
			t.Fatalf("process %d: %v: %s", i, err, errs[i])
		}
		extractions += strings.Count(errs[i].String(), "kernel: extracting vmlinux")
		if outs[i].String() != outs[0].String() {
			t.Fatalf("processes disagree: %q vs %q", outs[i], outs[0])
		}
	}
	if extractions != 1 {
		t.Errorf("%d extractions across %d processes, want 1", extractions, n)
	}
	if ents, _ := os.ReadDir(filepath.Join(cache, "tmp")); len(ents) != 0 {
		t.Errorf("tmp not cleaned: %v", ents)
	}
}
