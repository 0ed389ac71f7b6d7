package kernel

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"

	"github.com/gosandbox/sandbox/vmm/guestmem"
	"github.com/gosandbox/sandbox/vmm/linuxboot"
)

// The pinned default kernel.
const (
	// Module is the Go module that holds the default kernel.
	Module = "github.com/gokrazy/kernel.amd64"
	// Version is the pinned version of Module (Linux 7.1).
	Version = "v0.0.0-20260705070735-de680abf072b"
	// Sum is the go.sum h1: hash of Module at Version.
	Sum = "h1:H9m4mwDqTyQG0AKVviBQp09T3OrY1X3tHNyrJCbqJfY="
	// KernelFile is the bzImage's path inside the module.
	KernelFile = "vmlinuz"
)

// Source says where a kernel came from.
type Source string

// Kernel sources.
const (
	SourceCache       Source = "cache"        // this package's cache, from an earlier call
	SourceModCache    Source = "modcache"     // the extracted module in the Go module cache
	SourceModCacheZip Source = "modcache-zip" // the module zip in the Go module cache
	SourceProxy       Source = "proxy"        // downloaded from a Go module proxy
	SourceFile        Source = "file"         // a caller's file (FromFile)
)

// Kernel is a kernel ready to load: its files and hashes.
type Kernel struct {
	// Path is the kernel file (bzImage or ELF vmlinux). For Default it is
	// the verified copy in the cache.
	Path string
	// SHA256 is the hex SHA-256 of Path's contents.
	SHA256 string
	// Vmlinux is the uncompressed vmlinux ELF to load with
	// linuxboot.LoadELF: the cached extraction for a bzImage, Path itself
	// for an ELF kernel.
	Vmlinux string
	// VmlinuxSize is Vmlinux's size in bytes.
	VmlinuxSize int64
	// SetupHeader is the bzImage's setup header for
	// linuxboot.Config.SetupHeader, nil for an ELF kernel.
	SetupHeader []byte
	// Module is module@version for Default, empty for FromFile.
	Module string
	// Source says where the kernel was found.
	Source Source
}

// Mappable reports whether Vmlinux is a read-only cache file that is never
// modified in place, so that it may be mapped into guest memory
// (linuxboot.Config.Mapper). A caller's own ELF file (FromFile) is not: it
// could be truncated while a guest runs.
func (k *Kernel) Mappable() bool { return k.Vmlinux != k.Path }

// Load loads the kernel's vmlinux into guest memory with linuxboot.LoadELF,
// using the kernel's own setup header unless cfg sets one. cfg.Mapper is
// ignored unless Mappable.
func (k *Kernel) Load(mem *guestmem.Memory, cfg linuxboot.Config) (*linuxboot.Loaded, error) {
	if !k.Mappable() {
		cfg.Mapper = nil
	}
	f, err := os.Open(k.Vmlinux)
	if err != nil {
		return nil, fmt.Errorf("kernel: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("kernel: %w", err)
	}
	if cfg.SetupHeader == nil {
		cfg.SetupHeader = k.SetupHeader
	}
	return linuxboot.LoadELF(mem, f, st.Size(), cfg)
}

// Option configures Default and FromFile.
type Option func(*options)

type options struct {
	log      *slog.Logger
	cacheDir string
	modCache *string
	goproxy  *string
	client   *http.Client
	version  string
	sum      string
	getenv   func(string) string
}

// WithLogger sends progress messages to l (silent by default).
func WithLogger(l *slog.Logger) Option { return func(o *options) { o.log = l } }

// WithCacheDir sets the cache directory (default
// os.UserCacheDir()/gosandbox/kernel).
func WithCacheDir(dir string) Option { return func(o *options) { o.cacheDir = dir } }

// WithModCache sets the Go module cache to look in instead of the one the
// environment names; "" disables the module cache lookup.
func WithModCache(dir string) Option { return func(o *options) { o.modCache = &dir } }

// WithGOPROXY sets the proxy list instead of the environment's GOPROXY
// (same syntax: comma- or pipe-separated URLs, "off", "direct").
func WithGOPROXY(list string) Option { return func(o *options) { o.goproxy = &list } }

// WithHTTPClient sets the client for proxy downloads (default: a client
// honouring HTTP_PROXY/HTTPS_PROXY, like http.DefaultClient).
func WithHTTPClient(c *http.Client) Option { return func(o *options) { o.client = c } }

// WithModuleVersion makes Default use another version of Module, verified
// against sum (its go.sum h1: hash).
func WithModuleVersion(version, sum string) Option {
	return func(o *options) { o.version, o.sum = version, sum }
}

// WithGetenv sets how environment variables are read (default os.Getenv).
func WithGetenv(getenv func(string) string) Option { return func(o *options) { o.getenv = getenv } }

func makeOptions(opts []Option) (*options, error) {
	o := &options{version: Version, sum: Sum, getenv: os.Getenv}
	for _, opt := range opts {
		opt(o)
	}
	if o.log == nil {
		o.log = slog.New(slog.DiscardHandler)
	}
	if o.client == nil {
		o.client = http.DefaultClient
	}
	if o.cacheDir == "" {
		dir, err := os.UserCacheDir()
		if err != nil {
			return nil, fmt.Errorf("kernel: no cache directory (%v): set XDG_CACHE_HOME or HOME, or use kernel.WithCacheDir", err)
		}
		o.cacheDir = filepath.Join(dir, "gosandbox", "kernel")
	}
	env := newGoEnv(o.getenv)
	if o.modCache == nil {
		mc := env.modCache()
		o.modCache = &mc
	}
	if o.goproxy == nil {
		p := env.proxy()
		o.goproxy = &p
	}
	return o, nil
}

// Default returns the default guest kernel (Module at Version), from the
// cache, the Go module cache or a Go module proxy, verified against Sum,
// with its vmlinux extracted.
func Default(ctx context.Context, opts ...Option) (*Kernel, error) {
	o, err := makeOptions(opts)
	if err != nil {
		return nil, err
	}
	if k, ok := o.cachedModule(); ok {
		o.log.Debug("kernel: using cached default kernel", "module", k.Module, "vmlinux", k.Vmlinux)
		return k, nil
	}
	unlock, err := o.lock(ctx)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if k, ok := o.cachedModule(); ok {
		return k, nil
	}
	path, sum, src, err := o.fetchModule(ctx)
	if err != nil {
		return nil, err
	}
	data, err := readCapped(path)
	if err != nil {
		return nil, err
	}
	k, err := o.vmlinuxLocked(path, sum, data)
	if err != nil {
		return nil, err
	}
	k.Module, k.Source = Module+"@"+o.version, src
	if err := o.writeModuleRecord(k, int64(len(data))); err != nil {
		return nil, err
	}
	return k, nil
}

// FromFile prepares a caller's kernel file: a bzImage (its vmlinux is
// extracted once and cached by the file's SHA-256) or an uncompressed ELF
// vmlinux (used in place).
func FromFile(ctx context.Context, path string, opts ...Option) (*Kernel, error) {
	o, err := makeOptions(opts)
	if err != nil {
		return nil, err
	}
	data, err := readCapped(path)
	if err != nil {
		return nil, err
	}
	sum := sha256.Sum256(data)
	hexsum := hex.EncodeToString(sum[:])
	switch {
	case linuxboot.IsELF(data):
		if _, err := linuxboot.ParseELF(bytes.NewReader(data), int64(len(data))); err != nil {
			return nil, fmt.Errorf("kernel: %s: %w", path, err)
		}
		return &Kernel{Path: path, SHA256: hexsum, Vmlinux: path, VmlinuxSize: int64(len(data)), Source: SourceFile}, nil
	case linuxboot.IsBzImage(data):
	default:
		return nil, &linuxboot.FormatError{Kind: "kernel file " + path, Off: 0, Reason: "neither an ELF vmlinux nor a bzImage"}
	}
	if k, ok := o.cachedVmlinux(path, hexsum); ok {
		k.Source = SourceFile
		return k, nil
	}
	unlock, err := o.lock(ctx)
	if err != nil {
		return nil, err
	}
	defer unlock()
	k, err := o.vmlinuxLocked(path, hexsum, data)
	if err != nil {
		return nil, err
	}
	k.Source = SourceFile
	return k, nil
}

// readCapped reads a kernel file of at most linuxboot.MaxVmlinuxSize bytes.
func readCapped(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("kernel: %w", err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, linuxboot.MaxVmlinuxSize+1))
	if err != nil {
		return nil, fmt.Errorf("kernel: read %s: %w", path, err)
	}
	if len(data) > linuxboot.MaxVmlinuxSize {
		return nil, fmt.Errorf("kernel: %s: %w", path, linuxboot.ErrTooLarge)
	}
	return data, nil
}
