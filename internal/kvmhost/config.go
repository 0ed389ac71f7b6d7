package kvmhost

import (
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Defaults for Config.
const (
	DefaultMemoryMiB = 4096
	DefaultCPUs      = 2
)

// Config says what Run runs in the outer VM and how.
type Config struct {
	// Program is the absolute path of an executable on this host. The outer
	// VM sees the host's root file system read-only at the same paths, so it
	// runs the very same file.
	Program string
	// Args are the program's arguments (argv[1:]).
	Args []string
	// Env is the program's environment as "KEY=value" entries. Nil means
	// os.Environ(). Run always sets GOSANDBOX_IN_KVMHOST=1, TMPDIR=/tmp,
	// XDG_CACHE_HOME (to CacheDir) and HOME (when unset), and drops
	// GOTMPDIR.
	Env []string
	// Dir is the working directory inside, an absolute host path. Empty
	// means the current directory of this process.
	Dir string

	// Stdout and Stderr receive the program's output while it runs. Nil
	// discards it.
	Stdout, Stderr io.Writer
	// Console, if set, receives the outer VM's serial console (kernel
	// messages, init diagnostics). The last part of it is kept for errors
	// regardless.
	Console io.Writer

	// MemoryMiB is the outer VM's memory. Zero means DefaultMemoryMiB.
	MemoryMiB int
	// CPUs is the outer VM's vCPU count. Zero means DefaultCPUs.
	CPUs int
	// Timeout bounds the outer VM's run (boot, program, power-off: QEMU
	// start to exit) in addition to ctx. Zero means no bound other than
	// ctx. Waiting for a free slot (see Slots) is bounded by ctx only.
	Timeout time.Duration
	// StallTimeout, if positive, ends the run when the program has written
	// nothing to stdout or stderr for that long: the outer VM is taken to
	// have stopped making progress (QEMU's emulation of nested SVM has
	// wedged the outer kernel, leaving the program's own timeouts unable to
	// fire). QEMU is killed; if the program's exit status was written by
	// then, the run reports it, otherwise the error is ErrCrashed.
	StallTimeout time.Duration

	// CacheDir is a host directory shared read-write into the outer VM at
	// the same path and given to the program as XDG_CACHE_HOME, so caches
	// (Go's build cache, the guest kernel cache) carry over between runs.
	// Empty means os.UserCacheDir().
	CacheDir string
	// Shares are further host directories shared read-write at the same
	// paths. Everything else of the host is visible read-only; /tmp,
	// /var/tmp, /run and /dev/shm are fresh tmpfs mounts inside.
	Shares []string
	// Network gives the outer VM outbound network through QEMU's user-mode
	// networking (NAT through this host's sockets; 10.0.2.15/24, gateway
	// 10.0.2.2, DNS 10.0.2.3 written to /etc/resolv.conf inside). Off by
	// default: the outer VM then has loopback only.
	Network bool
	// Modules are extra kernel modules (names such as "tun" or "loop") to
	// load in the outer VM besides KVM, virtio and 9p; their dependencies
	// are resolved and loaded first.
	Modules []string
	// KernelPackage is the Debian package naming the outer kernel. Empty
	// means DefaultKernelPackage.
	KernelPackage string
	// AssetDir holds the cached kernel and initramfs. Empty means
	// os.UserCacheDir()/gosandbox/kvmhost.
	AssetDir string
	// Slots is how many outer VMs may run at once on this machine, counted
	// across processes through lock files; Run waits for a free one. Zero
	// means $GOSANDBOX_KVMHOST_SLOTS, else one per CPU: as many as go test
	// runs test binaries at once by default (-p), so that no test waits
	// behind another package's long one.
	Slots int
	// Logger receives progress (what was installed, boot time). Nil means
	// silent.
	Logger *slog.Logger
}

// withDefaults validates c and returns a copy with defaults filled in.
func (c Config) withDefaults() (Config, error) {
	if c.Program == "" {
		return c, invalidf("Program is empty")
	}
	if !filepath.IsAbs(c.Program) {
		return c, invalidf("Program %q is not an absolute path", c.Program)
	}
	if strings.ContainsAny(c.Program, "=\x00\n") {
		return c, invalidf("Program %q contains '=', NUL or newline", c.Program)
	}
	st, err := os.Stat(c.Program)
	if err != nil {
		return c, invalidf("Program: %v", err)
	}
	if !st.Mode().IsRegular() || st.Mode().Perm()&0o111 == 0 {
		return c, invalidf("Program %s is not an executable file", c.Program)
	}
	for _, a := range c.Args {
		if strings.ContainsRune(a, 0) {
			return c, invalidf("argument %q contains NUL", a)
		}
	}
	if c.Env == nil {
		c.Env = os.Environ()
	}
	for _, kv := range c.Env {
		k, _, ok := strings.Cut(kv, "=")
		if !ok || k == "" || strings.ContainsRune(kv, 0) {
			return c, invalidf("environment entry %q is not KEY=value", kv)
		}
	}
	if c.Dir == "" {
		if c.Dir, err = os.Getwd(); err != nil {
			return c, invalidf("no Dir and no current directory: %v", err)
		}
	}
	if err := checkDir("Dir", c.Dir); err != nil {
		return c, err
	}
	if c.MemoryMiB == 0 {
		c.MemoryMiB = DefaultMemoryMiB
	}
	if c.MemoryMiB < 512 || c.MemoryMiB > 1<<20 {
		return c, invalidf("MemoryMiB %d out of range [512, 1048576]", c.MemoryMiB)
	}
	if c.CPUs == 0 {
		c.CPUs = DefaultCPUs
	}
	if c.CPUs < 1 || c.CPUs > 64 {
		return c, invalidf("CPUs %d out of range [1, 64]", c.CPUs)
	}
	if c.Timeout < 0 {
		return c, invalidf("Timeout %v is negative", c.Timeout)
	}
	if c.CacheDir == "" {
		if c.CacheDir, err = os.UserCacheDir(); err != nil {
			return c, invalidf("no CacheDir and no user cache directory: %v", err)
		}
		if err := os.MkdirAll(c.CacheDir, 0o755); err != nil {
			return c, invalidf("CacheDir: %v", err)
		}
	}
	if err := checkDir("CacheDir", c.CacheDir); err != nil {
		return c, err
	}
	c.Shares = slices.Clone(c.Shares)
	for i, s := range c.Shares {
		if err := checkDir("share", s); err != nil {
			return c, err
		}
		c.Shares[i] = filepath.Clean(s)
		if c.Shares[i] == "/" {
			return c, invalidf("cannot share / read-write")
		}
	}
	for _, m := range c.Modules {
		if m == "" || strings.ContainsAny(m, "/ \t\n\x00") {
			return c, invalidf("module name %q is not valid", m)
		}
	}
	if c.KernelPackage == "" {
		c.KernelPackage = DefaultKernelPackage
	}
	if strings.ContainsAny(c.KernelPackage, " \t\n=/\x00") || strings.HasPrefix(c.KernelPackage, "-") {
		return c, invalidf("KernelPackage %q is not a package name", c.KernelPackage)
	}
	if c.AssetDir == "" {
		ucd, err := os.UserCacheDir()
		if err != nil {
			return c, invalidf("no AssetDir and no user cache directory: %v", err)
		}
		c.AssetDir = filepath.Join(ucd, "gosandbox", "kvmhost")
	}
	if !filepath.IsAbs(c.AssetDir) {
		return c, invalidf("AssetDir %q is not absolute", c.AssetDir)
	}
	if c.Slots == 0 {
		if v, err := strconv.Atoi(os.Getenv(EnvSlots)); err == nil && v > 0 {
			c.Slots = v
		} else {
			c.Slots = max(1, runtime.NumCPU())
		}
	}
	if c.Slots < 0 {
		return c, invalidf("Slots %d is negative", c.Slots)
	}
	if c.Stdout == nil {
		c.Stdout = io.Discard
	}
	if c.Stderr == nil {
		c.Stderr = io.Discard
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return c, nil
}

// checkDir requires an absolute path of an existing directory that the
// shell scripts and QEMU's option syntax can carry.
func checkDir(what, p string) error {
	if !filepath.IsAbs(p) {
		return invalidf("%s %q is not an absolute path", what, p)
	}
	if strings.ContainsAny(p, "\x00\n") {
		return invalidf("%s %q contains NUL or newline", what, p)
	}
	st, err := os.Stat(p)
	if err != nil {
		return invalidf("%s: %v", what, err)
	}
	if !st.IsDir() {
		return invalidf("%s %s is not a directory", what, p)
	}
	return nil
}

// programEnv is the program's environment inside the outer VM.
func (c *Config) programEnv() []string {
	set := map[string]string{
		EnvInside:        "1",
		"TMPDIR":         "/tmp",
		"XDG_CACHE_HOME": c.CacheDir,
	}
	drop := map[string]bool{"GOTMPDIR": true}
	var env []string
	at := map[string]int{} // key -> index in env; later entries win, as with os/exec
	for _, kv := range c.Env {
		k, _, _ := strings.Cut(kv, "=")
		if drop[k] {
			continue
		}
		if v, ok := set[k]; ok {
			kv = k + "=" + v
		}
		if i, dup := at[k]; dup {
			env[i] = kv
			continue
		}
		at[k] = len(env)
		env = append(env, kv)
	}
	for _, k := range sortedKeys(set) {
		if _, ok := at[k]; !ok {
			env = append(env, k+"="+set[k])
		}
	}
	if _, ok := at["HOME"]; !ok {
		if h, err := os.UserHomeDir(); err == nil {
			env = append(env, "HOME="+h)
		}
	}
	return env
}
