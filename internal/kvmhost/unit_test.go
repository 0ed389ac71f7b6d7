package kvmhost

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"flag"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"testing/fstest"
	"time"

	"github.com/u-root/u-root/pkg/cpio"
)

func fakeProbe() probe {
	return probe{
		goos: "linux", goarch: "amd64",
		getenv:    func(string) string { return "" },
		cpuinfo:   func() (io.ReadCloser, error) { return io.NopCloser(strings.NewReader("flags\t\t: fpu sse svm\n")), nil },
		pvmLoaded: func() bool { return false },
		openKVM:   func() error { return nil },
	}
}

func TestDetect(t *testing.T) {
	tests := []struct {
		name  string
		edit  func(*probe)
		want  Mode
		isErr bool
	}{
		{"hardware", func(p *probe) {}, HardwareKVM, false},
		{"pvm", func(p *probe) { p.pvmLoaded = func() bool { return true } }, NeedsEmulation, false},
		{"no virt flags", func(p *probe) {
			p.cpuinfo = func() (io.ReadCloser, error) {
				return io.NopCloser(strings.NewReader("processor: 0\nflags : fpu hypervisor\n")), nil
			}
		}, NeedsEmulation, false},
		{"no /dev/kvm", func(p *probe) { p.openKVM = func() error { return os.ErrNotExist } }, NeedsEmulation, false},
		{"inside", func(p *probe) {
			p.getenv = func(k string) string { return map[string]string{EnvInside: "1"}[k] }
			p.pvmLoaded = func() bool { return true }
		}, Inside, false},
		{"inside without kvm", func(p *probe) {
			p.getenv = func(k string) string { return map[string]string{EnvInside: "1"}[k] }
			p.openKVM = func() error { return os.ErrNotExist }
		}, Unavailable, true},
		{"darwin", func(p *probe) { p.goos = "darwin" }, Unavailable, true},
		{"arm64", func(p *probe) { p.goarch = "arm64" }, Unavailable, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := fakeProbe()
			tt.edit(&p)
			m, err := p.detect()
			if m != tt.want {
				t.Errorf("mode = %v, want %v", m, tt.want)
			}
			if tt.isErr != (err != nil) {
				t.Errorf("err = %v, want error: %v", err, tt.isErr)
			}
			if err != nil && !errors.Is(err, ErrUnavailable) {
				t.Errorf("err %v does not match ErrUnavailable", err)
			}
		})
	}
}

func TestDetectThisHost(t *testing.T) {
	m, err := Detect()
	t.Logf("this host: mode=%v err=%v", m, err)
	if (m == Unavailable) != (err != nil) {
		t.Errorf("mode %v with err %v: an error must come exactly with Unavailable", m, err)
	}
	if os.Getenv(EnvInside) != "1" && m == Inside {
		t.Errorf("Inside reported without %s=1", EnvInside)
	}
}

func TestModeString(t *testing.T) {
	seen := map[string]bool{}
	for _, m := range []Mode{Unavailable, HardwareKVM, Inside, NeedsEmulation, Mode(99)} {
		s := m.String()
		if s == "" || seen[s] {
			t.Errorf("mode %d: string %q empty or repeated", int(m), s)
		}
		seen[s] = true
	}
	if !HardwareKVM.Direct() || !Inside.Direct() || NeedsEmulation.Direct() || Unavailable.Direct() {
		t.Error("Direct is wrong")
	}
}

func validConfig(t *testing.T) Config {
	t.Helper()
	dir := t.TempDir()
	return Config{Program: "/bin/sh", Dir: dir, CacheDir: dir, AssetDir: dir, Env: []string{"A=1"}}
}

func TestConfigDefaults(t *testing.T) {
	c, err := Config{Program: "/bin/sh", CacheDir: t.TempDir()}.withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	if c.MemoryMiB != DefaultMemoryMiB || c.CPUs != DefaultCPUs {
		t.Errorf("memory %d cpus %d, want defaults", c.MemoryMiB, c.CPUs)
	}
	wd, _ := os.Getwd()
	if c.Dir != wd {
		t.Errorf("Dir = %q, want %q", c.Dir, wd)
	}
	if c.Env == nil || c.Stdout == nil || c.Stderr == nil || c.Logger == nil || c.KernelPackage != DefaultKernelPackage {
		t.Errorf("defaults not filled: %+v", c)
	}
	if !strings.HasSuffix(c.AssetDir, filepath.Join("gosandbox", "kvmhost")) {
		t.Errorf("AssetDir = %q", c.AssetDir)
	}
}

func TestConfigInvalid(t *testing.T) {
	notExec := filepath.Join(t.TempDir(), "f")
	os.WriteFile(notExec, []byte("x"), 0o644)
	tests := map[string]func(*Config){
		"empty program":    func(c *Config) { c.Program = "" },
		"relative program": func(c *Config) { c.Program = "sh" },
		"missing program":  func(c *Config) { c.Program = "/nonexistent/prog" },
		"not executable":   func(c *Config) { c.Program = notExec },
		"directory":        func(c *Config) { c.Program = "/" },
		"program with =":   func(c *Config) { c.Program = "/bin/a=b" },
		"NUL arg":          func(c *Config) { c.Args = []string{"a\x00b"} },
		"bad env":          func(c *Config) { c.Env = []string{"NOEQUALS"} },
		"empty env key":    func(c *Config) { c.Env = []string{"=x"} },
		"relative dir":     func(c *Config) { c.Dir = "rel" },
		"missing dir":      func(c *Config) { c.Dir = "/nonexistent/dir" },
		"small memory":     func(c *Config) { c.MemoryMiB = 100 },
		"many cpus":        func(c *Config) { c.CPUs = 1000 },
		"negative cpus":    func(c *Config) { c.CPUs = -1 },
		"negative timeout": func(c *Config) { c.Timeout = -time.Second },
		"share root":       func(c *Config) { c.Shares = []string{"/"} },
		"share missing":    func(c *Config) { c.Shares = []string{"/nonexistent"} },
		"share file":       func(c *Config) { c.Shares = []string{"/bin/sh"} },
		"bad module":       func(c *Config) { c.Modules = []string{"a b"} },
		"bad kernel pkg":   func(c *Config) { c.KernelPackage = "-o=foo" },
		"relative assets":  func(c *Config) { c.AssetDir = "rel" },
		"dir with newline": func(c *Config) { c.Dir = "/tmp/a\nb" },
	}
	for name, edit := range tests {
		t.Run(name, func(t *testing.T) {
			c := validConfig(t)
			edit(&c)
			_, err := c.withDefaults()
			if !errors.Is(err, ErrInvalidConfig) {
				t.Errorf("err = %v, want ErrInvalidConfig", err)
			}
			if _, err := Run(context.Background(), c); !errors.Is(err, ErrInvalidConfig) {
				t.Errorf("Run err = %v, want ErrInvalidConfig", err)
			}
		})
	}
	if _, err := validConfig(t).withDefaults(); err != nil {
		t.Errorf("valid config rejected: %v", err)
	}
}

func TestProgramEnv(t *testing.T) {
	c := validConfig(t)
	c.Env = []string{"A=1", "GOTMPDIR=/x", "TMPDIR=/var/foo", "A=2", "HOME=/h", "B=x=y"}
	c, err := c.withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	got := c.programEnv()
	want := []string{"A=2", "TMPDIR=/tmp", "HOME=/h", "B=x=y", EnvInside + "=1", "XDG_CACHE_HOME=" + c.CacheDir}
	if !slices.Equal(got, want) {
		t.Errorf("env = %q\nwant  %q", got, want)
	}
}

const modulesDep = `kernel/arch/x86/kvm/kvm-amd.ko: kernel/arch/x86/kvm/kvm.ko kernel/drivers/crypto/ccp/ccp.ko kernel/virt/lib/irqbypass.ko
kernel/arch/x86/kvm/kvm.ko: kernel/virt/lib/irqbypass.ko
kernel/virt/lib/irqbypass.ko:
kernel/drivers/crypto/ccp/ccp.ko:
kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko kernel/fs/fscache/fscache.ko kernel/fs/netfs/netfs.ko
kernel/net/9p/9pnet.ko:
kernel/net/9p/9pnet_virtio.ko: kernel/drivers/virtio/virtio.ko kernel/net/9p/9pnet.ko kernel/drivers/virtio/virtio_ring.ko
kernel/fs/fscache/fscache.ko: kernel/fs/netfs/netfs.ko
kernel/fs/netfs/netfs.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/char/hw_random/virtio-rng.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
`

func TestResolveModules(t *testing.T) {
	ix, err := parseModulesDep(strings.NewReader(modulesDep))
	if err != nil {
		t.Fatal(err)
	}
	ix.parseBuiltin(strings.NewReader("kernel/drivers/block/loop.ko\n"))
	order, err := ix.resolve(append(slices.Clone(defaultModules), "loop", "kvm-amd"))
	if err != nil {
		t.Fatal(err)
	}
	if len(order) != 13 {
		t.Errorf("got %d modules, want 13: %q", len(order), order)
	}
	pos := map[string]int{}
	for i, p := range order {
		if _, dup := pos[moduleName(p)]; dup {
			t.Errorf("%s loaded twice", p)
		}
		pos[moduleName(p)] = i
	}
	for name, deps := range ix.deps {
		if _, ok := pos[name]; !ok {
			t.Errorf("module %s not loaded", name)
			continue
		}
		for _, d := range deps {
			if pos[d] >= pos[name] {
				t.Errorf("%s loaded before its dependency %s: %q", name, d, order)
			}
		}
	}
	if _, err := ix.resolve([]string{"nosuch"}); err == nil || !strings.Contains(err.Error(), "nosuch") {
		t.Errorf("unknown module: err = %v", err)
	}
	// A dependency nobody ships is named with what needs it.
	ix2, _ := parseModulesDep(strings.NewReader("a.ko: b.ko\n"))
	if _, err := ix2.resolve([]string{"a"}); err == nil || !strings.Contains(err.Error(), "needed by a") {
		t.Errorf("missing dependency: err = %v", err)
	}
	cyc, _ := parseModulesDep(strings.NewReader("a.ko: b.ko\nb.ko: c.ko\nc.ko: a.ko\n"))
	if _, err := cyc.resolve([]string{"a"}); err == nil || !strings.Contains(err.Error(), "cycle") {
		t.Errorf("cycle: err = %v", err)
	}
}

func TestModulesDepRoundTrip(t *testing.T) {
	ix, err := parseModulesDep(strings.NewReader(modulesDep))
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := ix.writeModulesDep(&buf); err != nil {
		t.Fatal(err)
	}
	ix2, err := parseModulesDep(&buf)
	if err != nil {
		t.Fatal(err)
	}
	if len(ix2.path) != len(ix.path) {
		t.Fatalf("round trip: %d modules, want %d", len(ix2.path), len(ix.path))
	}
	for n, p := range ix.path {
		if ix2.path[n] != p || !slices.Equal(ix2.deps[n], ix.deps[n]) {
			t.Errorf("module %s: %s %q, want %s %q", n, ix2.path[n], ix2.deps[n], p, ix.deps[n])
		}
	}
}

func TestParseModulesDepBad(t *testing.T) {
	for _, in := range []string{
		"no colon here\n",
		"/abs/path.ko:\n",
		"../up.ko:\n",
		"a.ko: ../b.ko\n",
		"a.ko:\na.ko:\n",
		"notamodule: x.ko\n",
	} {
		if _, err := parseModulesDep(strings.NewReader(in)); err == nil {
			t.Errorf("parseModulesDep(%q) accepted", in)
		}
	}
}

// moduleELF builds a minimal ELF64 relocatable file with a .modinfo section.
func moduleELF(modinfo []byte) []byte {
	shstr := []byte("\x00.modinfo\x00.shstrtab\x00")
	const ehsize, shentsize = 64, 64
	infoOff := ehsize
	strOff := infoOff + len(modinfo)
	shOff := (strOff + len(shstr) + 7) &^ 7
	out := make([]byte, shOff+3*shentsize)
	copy(out, "\x7fELF")
	out[4], out[5], out[6] = 2, 1, 1 // 64-bit, little-endian, version
	le := binary.LittleEndian
	le.PutUint16(out[16:], 1)  // ET_REL
	le.PutUint16(out[18:], 62) // EM_X86_64
	le.PutUint32(out[20:], 1)
	le.PutUint64(out[40:], uint64(shOff))
	le.PutUint16(out[52:], ehsize)
	le.PutUint16(out[58:], shentsize)
	le.PutUint16(out[60:], 3) // shnum
	le.PutUint16(out[62:], 2) // shstrndx
	copy(out[infoOff:], modinfo)
	copy(out[strOff:], shstr)
	sh := func(i int, name, typ uint32, off, size int) {
		b := out[shOff+i*shentsize:]
		le.PutUint32(b[0:], name)
		le.PutUint32(b[4:], typ)
		le.PutUint64(b[24:], uint64(off))
		le.PutUint64(b[32:], uint64(size))
		le.PutUint64(b[48:], 1)
	}
	sh(1, 1, 1, infoOff, len(modinfo)) // .modinfo, SHT_PROGBITS
	sh(2, 10, 3, strOff, len(shstr))   // .shstrtab, SHT_STRTAB
	return out
}

func TestModinfoDepends(t *testing.T) {
	ko := moduleELF([]byte("license=GPL\x00depends=kvm,ccp\x00name=kvm_amd\x00vermagic=6.1.0 SMP\x00"))
	deps, err := modinfoDepends(bytes.NewReader(ko))
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(deps, []string{"kvm", "ccp"}) {
		t.Errorf("deps = %q", deps)
	}
	none, err := modinfoDepends(bytes.NewReader(moduleELF([]byte("depends=\x00"))))
	if err != nil || len(none) != 0 {
		t.Errorf("empty depends: %q, %v", none, err)
	}
	if _, err := modinfoDepends(bytes.NewReader([]byte("not an elf"))); err == nil {
		t.Error("non-ELF accepted")
	}
}

func TestBuildModuleIndex(t *testing.T) {
	fsys := fstest.MapFS{
		"kernel/arch/x86/kvm/kvm-amd.ko": {Data: moduleELF([]byte("depends=kvm\x00"))},
		"kernel/arch/x86/kvm/kvm.ko":     {Data: moduleELF([]byte("depends=irqbypass\x00"))},
		"kernel/virt/lib/irqbypass.ko":   {Data: moduleELF([]byte("depends=\x00"))},
		"kernel/README":                  {Data: []byte("not a module")},
		"modules.builtin":                {Data: []byte("kernel/drivers/virtio/virtio.ko\n")},
	}
	ix, err := buildModuleIndex(fsys)
	if err != nil {
		t.Fatal(err)
	}
	order, err := ix.resolve([]string{"kvm-amd", "virtio"})
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"kernel/virt/lib/irqbypass.ko", "kernel/arch/x86/kvm/kvm.ko", "kernel/arch/x86/kvm/kvm-amd.ko"}
	if !slices.Equal(order, want) {
		t.Errorf("order = %q, want %q", order, want)
	}
	fsys["kernel/other/kvm.ko"] = &fstest.MapFile{Data: moduleELF(nil)}
	if _, err := buildModuleIndex(fsys); err == nil {
		t.Error("duplicate module name accepted")
	}
}

func TestModulesFromTar(t *testing.T) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	add := func(name string, data string, typ byte) {
		tw.WriteHeader(&tar.Header{Name: name, Size: int64(len(data)), Mode: 0o644, Typeflag: typ})
		tw.Write([]byte(data))
	}
	add("./lib/", "", tar.TypeDir)
	add("./lib/modules/6.1.0-x/kernel/a.ko", "AAA", tar.TypeReg)
	add("./lib/modules/6.1.0-x/kernel/b.ko", "BBB", tar.TypeReg)
	add("./boot/vmlinuz", "K", tar.TypeReg)
	tw.Close()
	raw := buf.Bytes()
	got, err := modulesFromTar(bytes.NewReader(raw), map[string]string{"lib/modules/6.1.0-x/kernel/b.ko": "kernel/b.ko"})
	if err != nil {
		t.Fatal(err)
	}
	if string(got["kernel/b.ko"]) != "BBB" || len(got) != 1 {
		t.Errorf("got %q", got)
	}
	if _, err := modulesFromTar(bytes.NewReader(raw), map[string]string{"lib/modules/6.1.0-x/kernel/c.ko": "kernel/c.ko"}); err == nil {
		t.Error("missing module not reported")
	}
	if _, err := modulesFromTar(bytes.NewReader(raw[:700]), map[string]string{"lib/modules/6.1.0-x/kernel/c.ko": "kernel/c.ko"}); err == nil {
		t.Error("truncated tar not reported")
	}
}

func TestWriteInitramfs(t *testing.T) {
	order := []string{"kernel/virt/lib/irqbypass.ko", "kernel/arch/x86/kvm/kvm.ko"}
	mods := map[string][]byte{order[0]: []byte("IRQ"), order[1]: []byte("KVM")}
	var buf bytes.Buffer
	if err := writeInitramfs(&buf, []byte("BUSYBOX"), order, mods); err != nil {
		t.Fatal(err)
	}
	recs, err := cpio.ReadAllRecords(cpio.Newc.Reader(bytes.NewReader(buf.Bytes())))
	if err != nil {
		t.Fatal(err)
	}
	files := map[string]cpio.Record{}
	var names []string
	for _, r := range recs {
		files[r.Name] = r
		names = append(names, r.Name)
	}
	read := func(name string) string {
		r, ok := files[name]
		if !ok {
			t.Fatalf("%s missing from initramfs: %q", name, names)
		}
		b, err := io.ReadAll(io.NewSectionReader(r.ReaderAt, 0, int64(r.FileSize)))
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	if read("init") != initScript || files["init"].Mode&0o111 == 0 {
		t.Error("init wrong or not executable")
	}
	if read("bin/busybox") != "BUSYBOX" {
		t.Error("busybox content wrong")
	}
	if got := read("modules.order"); got != "000-irqbypass.ko\n001-kvm.ko\n" {
		t.Errorf("modules.order = %q", got)
	}
	if read("lib/modules/001-kvm.ko") != "KVM" {
		t.Error("kvm.ko content wrong")
	}
	con := files["dev/console"]
	if con.Mode&cpio.S_IFMT != cpio.S_IFCHR || con.Rmajor != 5 || con.Rminor != 1 {
		t.Errorf("dev/console = %+v", con.Info)
	}
	// Directories come before what they hold.
	seen := map[string]bool{}
	for _, n := range names {
		if d := filepath.Dir(n); d != "." && !seen[d] {
			t.Errorf("%s precedes its directory %s", n, d)
		}
		seen[n] = true
	}
	if err := writeInitramfs(io.Discard, nil, []string{"x.ko"}, nil); err == nil {
		t.Error("missing module content accepted")
	}
}

func TestParseStatus(t *testing.T) {
	good := map[string]status{
		"exit 0\n":                 {exitCode: 0},
		"exit 3":                   {exitCode: 3},
		"exit 255\n":               {exitCode: 255},
		"setup insmod failed: kvm": {setupErr: "insmod failed: kvm"},
	}
	for in, want := range good {
		got, err := parseStatus([]byte(in))
		if err != nil || got != want {
			t.Errorf("parseStatus(%q) = %+v, %v; want %+v", in, got, err, want)
		}
	}
	for _, in := range []string{"", "exit", "exit -1", "exit 256", "exit 03", "exit 1 2", "exit 1\nexit 2", "setup ", "hello", "exit +1", strings.Repeat("x", 5000)} {
		if st, err := parseStatus([]byte(in)); err == nil {
			t.Errorf("parseStatus(%q) = %+v, want error", in, st)
		}
	}
}

func FuzzParseStatus(f *testing.F) {
	for _, s := range []string{"exit 0\n", "exit 255", "setup x", "exit 9999999999999999999", ""} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		st, err := parseStatus(b)
		if err == nil && st.setupErr == "" && (st.exitCode < 0 || st.exitCode > 255) {
			t.Errorf("exit code %d out of range", st.exitCode)
		}
	})
}

func FuzzParseModulesDep(f *testing.F) {
	f.Add([]byte(modulesDep))
	f.Add([]byte("a.ko: b.ko\nb.ko: a.ko\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		ix, err := parseModulesDep(bytes.NewReader(b))
		if err != nil {
			return
		}
		for n := range ix.path {
			ix.resolve([]string{n}) // must terminate without panicking
		}
		var buf bytes.Buffer
		if err := ix.writeModulesDep(&buf); err != nil {
			t.Fatal(err)
		}
	})
}

func FuzzModinfoDepends(f *testing.F) {
	f.Add(moduleELF([]byte("depends=a,b\x00")))
	f.Add([]byte("\x7fELF"))
	f.Fuzz(func(t *testing.T, b []byte) {
		modinfoDepends(bytes.NewReader(b))
	})
}

func TestParseUptime(t *testing.T) {
	if d, err := parseUptime([]byte("12.34\n")); err != nil || d != 12340*time.Millisecond {
		t.Errorf("parseUptime = %v, %v", d, err)
	}
	for _, in := range []string{"", "x", "-1", "1e20", "NaN"} {
		if _, err := parseUptime([]byte(in)); err == nil {
			t.Errorf("parseUptime(%q) accepted", in)
		}
	}
}

func TestShq(t *testing.T) {
	sh, err := exec.LookPath("sh")
	if err != nil {
		t.Skip("no sh")
	}
	for _, s := range []string{"", "plain", "it's", "'", `a"b$c` + "`d`\\e\n", "--flag=1", "*"} {
		out, err := exec.Command(sh, "-c", "printf %s "+shq(s)).Output()
		if err != nil || string(out) != s {
			t.Errorf("shq(%q) through sh = %q, %v", s, out, err)
		}
	}
}

func TestPlanMounts(t *testing.T) {
	c := validConfig(t)
	c.Program = "/bin/sh"
	c, _ = c.withDefaults()
	c.Dir = "/tmp/go-build1/b001"
	c.Program = "/tmp/go-build1/b001/x.test"
	p := newPlan(&c, "/tmp/kvmhost-run-1", "/bin/busybox", map[string]string{"/root/.cache": "share0", "/tmp/kvmhost-run-1/sub": "share1"})
	var got []string
	for _, m := range p.mounts {
		got = append(got, m.kind+":"+m.path)
	}
	want := []string{"work:/tmp/kvmhost-run-1", "share:/root/.cache", "share:/tmp/kvmhost-run-1/sub", "hostview:/tmp/go-build1/b001"}
	if !slices.Equal(got, want) {
		t.Errorf("mounts = %q\nwant %q", got, want)
	}
	if bb, err := findStaticBusybox(); err == nil {
		for name, script := range map[string]string{"setup": p.setupScript(), "run": p.runScript()} {
			cmd := exec.Command(bb, "sh", "-n")
			cmd.Stdin = strings.NewReader(script)
			if out, err := cmd.CombinedOutput(); err != nil {
				t.Errorf("%s.sh does not parse: %v\n%s\n%s", name, err, out, script)
			}
		}
	}
}

// TestRunScript runs the generated run.sh on this host (no chroot) and
// checks that the program gets exactly its arguments, environment and
// working directory, and that output and exit status land in the work dir.
func TestRunScript(t *testing.T) {
	bb, err := findStaticBusybox()
	if err != nil {
		t.Skipf("no static busybox: %v", err)
	}
	work, dir := t.TempDir(), t.TempDir()
	c := Config{
		Program:  "/bin/sh",
		Args:     []string{"-c", `printf '%s|' "$@"; echo; env | sort; pwd; echo err >&2; exit 7`, "zero", "it's", "", "a b", "$HOME"},
		Env:      []string{"X=y z", "Q='\"", "PATH=/usr/bin:/bin"},
		Dir:      dir,
		CacheDir: dir,
		AssetDir: dir,
	}
	c, err = c.withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	p := newPlan(&c, work, bb, nil)
	out, err := exec.Command(bb, "sh", "-c", p.runScript()).CombinedOutput()
	if err != nil {
		t.Fatalf("run.sh: %v\n%s", err, out)
	}
	read := func(n string) string {
		b, err := os.ReadFile(filepath.Join(work, n))
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	if got := read(fileStatus); got != "exit 7\n" {
		t.Errorf("status = %q", got)
	}
	if got := read(fileStderr); got != "err\n" {
		t.Errorf("stderr = %q", got)
	}
	lines := strings.Split(strings.TrimSpace(read(fileStdout)), "\n")
	if lines[0] != `it's||a b|$HOME|` {
		t.Errorf("args = %q", lines[0])
	}
	var env []string
	for _, l := range lines[1 : len(lines)-1] {
		if !strings.HasPrefix(l, "PWD=") && !strings.HasPrefix(l, "SHLVL=") && !strings.HasPrefix(l, "_=") {
			env = append(env, l)
		}
	}
	want := []string{EnvInside + "=1", "PATH=/usr/bin:/bin", `Q='"`, "TMPDIR=/tmp", "X=y z", "XDG_CACHE_HOME=" + dir}
	if h, err := os.UserHomeDir(); err == nil {
		want = append(want, "HOME="+h)
	}
	slices.Sort(want)
	if !slices.Equal(env, want) {
		t.Errorf("env = %q\nwant  %q", env, want)
	}
	if lines[len(lines)-1] != dir {
		t.Errorf("pwd = %q, want %q", lines[len(lines)-1], dir)
	}

	// A missing working directory is a setup error, not an exit code.
	os.Remove(filepath.Join(work, fileStatus))
	p.dir = filepath.Join(dir, "gone")
	exec.Command(bb, "sh", "-c", p.runScript()).Run()
	st, err := parseStatus([]byte(read(fileStatus)))
	if err != nil || st.setupErr == "" {
		t.Errorf("missing dir: status %+v, %v", st, err)
	}
}

func TestQEMUArgs(t *testing.T) {
	c := Config{CPUs: 3, MemoryMiB: 1234}
	args := qemuArgs(&c, "/k", "/i", "/tmp/a,b", map[string]string{"/c": "share0"})
	joined := strings.Join(args, " ")
	for _, want := range []string{"-smp 3", "-m 1234", "-accel tcg,thread=multi", "-cpu max", "-nodefaults", "-no-reboot",
		"path=/tmp/a,,b,mount_tag=kvmwork", "path=/c,mount_tag=share0", "mount_tag=hostroot,security_model=none,readonly=on", "virtio-rng-pci", "panic=-1", "softlockup_panic=1"} {
		if !strings.Contains(joined, want) {
			t.Errorf("qemu args lack %q: %s", want, joined)
		}
	}
}

func TestNetworkConfig(t *testing.T) {
	c := Config{CPUs: 1, MemoryMiB: 512}
	if strings.Contains(strings.Join(qemuArgs(&c, "/k", "/i", "/w", nil), " "), "netdev") {
		t.Error("network device without Network")
	}
	c.Network = true
	if !strings.Contains(strings.Join(qemuArgs(&c, "/k", "/i", "/w", nil), " "), "-netdev user,id=net0 -device virtio-net-pci,netdev=net0") {
		t.Error("no user network with Network")
	}
	p := &plan{work: "/w", busybox: "/bin/busybox", msize: 1, hostRoot: tagHostRoot, network: true}
	if s := p.setupScript(); !strings.Contains(s, "ip route add default via 10.0.2.2") || !strings.Contains(s, "nameserver 10.0.2.3") {
		t.Errorf("setup script does not configure the network:\n%s", s)
	}
}

func TestConsoleBuf(t *testing.T) {
	var extra bytes.Buffer
	c := &consoleBuf{extra: &extra}
	c.Write([]byte("\x1bc\x1b[?7l\x1b[2JSeaBIOS\r\n"))
	for i := 0; i < 5000; i++ {
		c.Write([]byte("0123456789"))
	}
	c.Write([]byte("\nKernel panic - not syncing\n"))
	tail := c.tail()
	if len(tail) > consoleKeep || !strings.HasSuffix(tail, "Kernel panic - not syncing\n") {
		t.Errorf("tail of %d bytes ends %q", len(tail), tail[len(tail)-40:])
	}
	if extra.Len() != 5000*10+len("\x1bc\x1b[?7l\x1b[2JSeaBIOS\r\n")+len("\nKernel panic - not syncing\n") {
		t.Errorf("extra got %d bytes", extra.Len())
	}
	c2 := &consoleBuf{}
	c2.Write([]byte("\x1bc\x1b[?7l\x1b[2JSeaBIOS\r\n"))
	if got := c2.tail(); got != "SeaBIOS\n" {
		t.Errorf("escapes not stripped: %q", got)
	}
}

func TestVMErrorIs(t *testing.T) {
	err := error(&VMError{Kind: ErrCrashed, Detail: "d", QEMUExit: "signal: killed", ConsoleTail: "panic"})
	if !errors.Is(err, ErrCrashed) || errors.Is(err, ErrTimeout) {
		t.Error("VMError.Is wrong")
	}
	for _, want := range []string{"d", "signal: killed", "panic"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("message lacks %q: %s", want, err)
		}
	}
	long := &VMError{Kind: ErrCrashed, ConsoleTail: strings.Repeat("line\n", 500) + "last"}
	if n := strings.Count(long.Error(), "\n"); n > errorTailLines+3 || !strings.Contains(long.Error(), "last") {
		t.Errorf("long console: %d lines in the message", n)
	}
	u := error(&UnavailableError{Reason: "r", Err: os.ErrNotExist})
	if !errors.Is(u, ErrUnavailable) || !errors.Is(u, os.ErrNotExist) {
		t.Error("UnavailableError.Is wrong")
	}
}

func TestLockFile(t *testing.T) {
	p := filepath.Join(t.TempDir(), "sub", "x.lock")
	l1, err := lockFile(context.Background(), p)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	if _, err := lockFile(ctx, p); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("second lock while held: err = %v", err)
	}
	l1.unlock()
	l1.unlock() // twice is fine
	l2, err := lockFile(context.Background(), p)
	if err != nil {
		t.Fatalf("lock after unlock: %v", err)
	}
	l2.unlock()
}

func TestWriteFileAtomic(t *testing.T) {
	p := filepath.Join(t.TempDir(), "f")
	if err := writeFileAtomic(p, []byte("one"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := writeFileAtomic(p, []byte("two"), 0o644); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(p)
	st, _ := os.Stat(p)
	ents, _ := os.ReadDir(filepath.Dir(p))
	if string(b) != "two" || st.Mode().Perm() != 0o644 || len(ents) != 1 {
		t.Errorf("content %q mode %v entries %d", b, st.Mode(), len(ents))
	}
}

func TestRunPattern(t *testing.T) {
	if got := runPattern("TestA/sub_1/x.y"); got != `^TestA$/^sub_1$/^x\.y$` {
		t.Errorf("runPattern = %q", got)
	}
}

func TestInnerPattern(t *testing.T) {
	tests := []struct{ name, outer, want string }{
		{"TestX", "", "^TestX$"},
		{"TestX", "TestX", "^TestX$"},
		{"TestX", "TestX/case=2", "^TestX$/case=2"},
		{"TestX", "Test[/X]/a/b", "^TestX$/a/b"},
		{"TestX", `Test\/X/a`, "^TestX$/a"},
		{"TestX/sub", "TestX/sub/leaf", "^TestX$/^sub$/leaf"},
		{"TestX/sub", "TestX", "^TestX$/^sub$"},
	}
	for _, tt := range tests {
		if got := innerPattern(tt.name, tt.outer); got != tt.want {
			t.Errorf("innerPattern(%q, %q) = %q, want %q", tt.name, tt.outer, got, tt.want)
		}
	}
}

func TestJudgeInner(t *testing.T) {
	pass := "=== RUN   TestX\n    x_test.go:1: hi\n--- PASS: TestX (1.00s)\nPASS\n"
	tests := []struct {
		name, out string
		code      int
		bench     bool
		failed    bool
		skipped   bool
	}{
		{"pass", pass, 0, false, false, false},
		{"exit code", pass, 1, false, true, false},
		{"fail line", "--- FAIL: TestX (1.00s)\nFAIL\n", 1, false, true, false},
		{"no tests", "testing: warning: no tests to run\nPASS\n", 0, false, true, false},
		{"other test passed", "--- PASS: TestXY (1.00s)\nPASS\n", 0, false, true, false},
		{"subtest pass", "    --- PASS: TestX (0.5s)\n", 0, false, false, false},
		{"bench", "BenchmarkX-2   \t 100\t 10 ns/op\nPASS\n", 0, true, false, false},
		{"bench missing", "PASS\n", 0, true, true, false},
		{"sub-benchmarks", "BenchmarkX\nBenchmarkX/a\nBenchmarkX/a-2 \t 1\t 5 ns/op\nPASS\n", 0, true, false, false},
		{"sub-benchmark without result", "BenchmarkX\nBenchmarkX/a\nPASS\n", 0, true, true, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			name := "TestX"
			if tt.bench {
				name = "BenchmarkX"
			}
			v := judgeInner(name, tt.out, tt.code, tt.bench)
			if v.failed != tt.failed || v.skipped != tt.skipped {
				t.Errorf("verdict %+v, want failed=%v skipped=%v", v, tt.failed, tt.skipped)
			}
		})
	}
	t.Setenv("CI", "")
	if v := judgeInner("TestX", "--- SKIP: TestX (0.00s)\n", 0, false); !v.skipped || v.failed {
		t.Errorf("skip outside CI: %+v", v)
	}
	t.Setenv("CI", "true")
	if v := judgeInner("TestX", "--- SKIP: TestX (0.00s)\n", 0, false); !v.failed {
		t.Errorf("skip under CI must fail: %+v", v)
	}
}

func TestInnerTestArgs(t *testing.T) {
	args := innerTestArgs(t, []string{"-test.count=2"})
	if !strings.HasPrefix(args[0], "-test.run=^TestInnerTestArgs$") || !slices.Contains(args, "-test.v") || args[len(args)-1] != "-test.count=2" {
		t.Errorf("args = %q", args)
	}
}

func TestInnerBenchmarkArgs(t *testing.T) {
	var args []string
	testing.Benchmark(func(b *testing.B) { args = innerTestArgs(b, nil) })
	bt := flag.Lookup("test.benchtime").Value.String()
	if !slices.Contains(args, "-test.run=^$") || !slices.Contains(args, "-test.benchtime="+bt) || !slices.Contains(args, "-test.benchmem") {
		t.Errorf("benchmark args = %q, want -test.run=^$, -test.benchmem and -test.benchtime=%s", args, bt)
	}
}

func TestBzPayload(t *testing.T) {
	bz := make([]byte, 0x1000)
	copy(bz[0x202:], "HdrS")
	binary.LittleEndian.PutUint16(bz[0x206:], 0x20f)
	bz[0x1f1] = 1 // protected-mode code at 1024
	binary.LittleEndian.PutUint32(bz[0x248:], 16)
	binary.LittleEndian.PutUint32(bz[0x24c:], 4)
	copy(bz[1024+16:], "PAYL")
	p, err := bzPayload(bz)
	if err != nil || string(p) != "PAYL" {
		t.Fatalf("payload %q, %v", p, err)
	}
	binary.LittleEndian.PutUint32(bz[0x24c:], 0xffffffff)
	if _, err := bzPayload(bz); !errors.Is(err, errNoVmlinux) {
		t.Errorf("oversized payload: %v", err)
	}
	if _, err := bzPayload(bz[:0x100]); !errors.Is(err, errNoVmlinux) {
		t.Errorf("short file: %v", err)
	}
	if _, err := extractVmlinux(moduleELF(nil)); !errors.Is(err, errNoVmlinux) {
		t.Errorf("ELF as bzImage: %v", err)
	}
}

func TestHasNote(t *testing.T) {
	note := func(owner string, typ uint32, desc int) []byte {
		b := make([]byte, 12)
		binary.LittleEndian.PutUint32(b, uint32(len(owner)+1))
		binary.LittleEndian.PutUint32(b[4:], uint32(desc))
		binary.LittleEndian.PutUint32(b[8:], typ)
		name := make([]byte, (len(owner)+1+3)&^3)
		copy(name, owner)
		return append(append(b, name...), make([]byte, (desc+3)&^3)...)
	}
	data := append(note("GNU", 3, 20), note("Xen", 18, 4)...)
	if !hasNote(data, "Xen", 18) {
		t.Error("PVH note not found")
	}
	if hasNote(note("Xen", 17, 4), "Xen", 18) || hasNote(data[:len(data)-2], "Xen", 18) {
		t.Error("wrong or truncated note accepted")
	}
}

func FuzzBzPayload(f *testing.F) {
	f.Add(make([]byte, 0x300))
	f.Fuzz(func(t *testing.T, b []byte) {
		if p, err := bzPayload(b); err == nil && len(p) > len(b) {
			t.Fatal("payload longer than file")
		}
		hasNote(b, "Xen", 18)
	})
}

func TestAcquireSlot(t *testing.T) {
	dir := t.TempDir()
	a, err := acquireSlot(context.Background(), dir, 2, nil)
	if err != nil {
		t.Fatal(err)
	}
	b, err := acquireSlot(context.Background(), dir, 2, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	waited := false
	if _, err := acquireSlot(ctx, dir, 2, func() { waited = true }); !errors.Is(err, context.DeadlineExceeded) || !waited {
		t.Errorf("third slot of two: err = %v, waiting called: %v", err, waited)
	}
	a.unlock()
	c, err := acquireSlot(context.Background(), dir, 2, nil)
	if err != nil {
		t.Fatalf("slot after release: %v", err)
	}
	b.unlock()
	c.unlock()
}

func TestGuestEmulatorFault(t *testing.T) {
	doubleFault := "[  121.036449] traps: PANIC: double fault, error_code: 0x0\n" +
		"[  121.036449] Oops: double fault: 0000 [#1] SMP NOPTI\n" +
		"[  121.043082] RIP: 0010:entry_SYSCALL_64+0x0/0x2b\n" +
		"[  121.057463] Kernel panic - not syncing: Fatal exception in interrupt\n"
	for _, c := range []struct {
		name, console string
		want          bool
	}{
		{"stale int3", "[ 3.1] Oops: int3: 0000 [#1] SMP NOPTI\n", true},
		{"double fault at syscall entry", doubleFault, true},
		{"double fault elsewhere (kernel stack overflow)", "traps: PANIC: double fault, error_code: 0x0\nRIP: 0010:memcpy+0x12/0x30\n", false},
		{"sysrq panic", "Kernel panic - not syncing: sysrq triggered crash\n", false},
		{"clean boot", "[ 0.1] Linux version 7.1.2\n", false},
	} {
		why, got := GuestEmulatorFault(c.console)
		if got != c.want || got != (why != "") {
			t.Errorf("%s: GuestEmulatorFault = %q, %v; want %v", c.name, why, got, c.want)
		}
	}
}

// TestRunQEMUStall runs a stand-in for QEMU that starts the program and
// then goes silent: with StallTimeout set, the run is ended and reported as
// a crash, unless the program's exit status was written before the
// silence (a VM that hangs while powering off).
func TestRunQEMUStall(t *testing.T) {
	for _, tc := range []struct {
		name   string
		status string
		crash  bool
	}{
		{"program wedged", "", true},
		{"power-off wedged", "exit 3", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			work := t.TempDir()
			script := `echo 1.0 >"$W/started"; echo line >"$W/stdout"`
			if tc.status != "" {
				script += `; echo "` + tc.status + `" >"$W/status"`
			}
			script += `; exec sleep 600`
			var out bytes.Buffer
			c := &Config{StallTimeout: 300 * time.Millisecond, Stdout: &out, Stderr: io.Discard}
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			res, err := runQEMU(ctx, c, "/bin/sh", []string{"-c", "W=" + shq(work) + "; " + script}, work)
			if tc.crash {
				if !errors.Is(err, ErrCrashed) || !strings.Contains(err.Error(), "no output from the program") {
					t.Fatalf("err = %v, want ErrCrashed saying the program went silent", err)
				}
			} else if err != nil || res.ExitCode != 3 {
				t.Fatalf("res = %+v, err = %v; want the written exit status 3", res, err)
			}
			if out.String() != "line\n" {
				t.Errorf("streamed stdout = %q", out.String())
			}
			if ctx.Err() != nil {
				t.Error("the stall was not detected before the test's own deadline")
			}
		})
	}
}

func TestBootEmulatorFault(t *testing.T) {
	if _, ok := BootEmulatorFault("[ 1.0] ok\n", false); ok {
		t.Error("a clean console and no triple fault counted as an emulator fault")
	}
	if why, ok := BootEmulatorFault("[ 1.0] ok\n", true); !ok || !strings.Contains(why, "triple-faulted") {
		t.Errorf("a triple fault: %q, %v", why, ok)
	}
	if why, ok := BootEmulatorFault("Oops: int3\n", false); !ok || !strings.Contains(why, "int3") {
		t.Errorf("a stale int3: %q, %v", why, ok)
	}
}
