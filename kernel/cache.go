package kernel

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/mod/module"
	"golang.org/x/sys/unix"

	"github.com/gosandbox/sandbox/vmm/linuxboot"
)

// Cache layout under the cache directory:
//
//	lock                               flock(2) held while filling the cache
//	tmp/                               files being written, renamed into place
//	modules/MODULE@VERSION/vmlinuz     verified copy of the module's kernel
//	modules/MODULE@VERSION.json        moduleRecord: which kernel it is
//	vmlinux/SHA256.elf                 vmlinux extracted from the bzImage SHA256
//	vmlinux/SHA256.json                vmlinuxRecord: its size and setup header

type moduleRecord struct {
	Sum    string // h1: hash the module was verified against
	SHA256 string // of the bzImage
	Size   int64  // of the bzImage
}

type vmlinuxRecord struct {
	VmlinuxSize int64
	SetupHeader []byte
}

func (o *options) moduleBase() (string, error) {
	p, err := module.EscapePath(Module)
	if err != nil {
		return "", err
	}
	v, err := module.EscapeVersion(o.version)
	if err != nil {
		return "", fmt.Errorf("kernel: bad module version %q: %w", o.version, err)
	}
	return filepath.Join(o.cacheDir, "modules", filepath.FromSlash(p)+"@"+v), nil
}

func readJSON(path string, v any) bool {
	b, err := os.ReadFile(path)
	return err == nil && json.Unmarshal(b, v) == nil
}

func sizeIs(path string, n int64) bool {
	st, err := os.Stat(path)
	return err == nil && st.Mode().IsRegular() && st.Size() == n
}

// cachedModule returns the default kernel from the cache, if a complete
// entry for the configured version and sum is there.
func (o *options) cachedModule() (*Kernel, bool) {
	base, err := o.moduleBase()
	if err != nil {
		return nil, false
	}
	var rec moduleRecord
	if !readJSON(base+".json", &rec) || rec.Sum != o.sum {
		return nil, false
	}
	path := filepath.Join(base, KernelFile)
	if !sizeIs(path, rec.Size) {
		return nil, false
	}
	k, ok := o.cachedVmlinux(path, rec.SHA256)
	if !ok {
		return nil, false
	}
	k.Module, k.Source = Module+"@"+o.version, SourceCache
	return k, true
}

func validSHA256(s string) bool {
	if len(s) != 64 {
		return false
	}
	for _, c := range s {
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return false
		}
	}
	return true
}

// cachedVmlinux returns the cached extraction of the bzImage at path whose
// hex SHA-256 is sum.
func (o *options) cachedVmlinux(path, sum string) (*Kernel, bool) {
	if !validSHA256(sum) {
		return nil, false
	}
	base := filepath.Join(o.cacheDir, "vmlinux", sum)
	var rec vmlinuxRecord
	if !readJSON(base+".json", &rec) || !sizeIs(base+".elf", rec.VmlinuxSize) {
		return nil, false
	}
	return &Kernel{Path: path, SHA256: sum, Vmlinux: base + ".elf", VmlinuxSize: rec.VmlinuxSize, SetupHeader: rec.SetupHeader}, true
}

// vmlinuxLocked returns the extraction of the bzImage data (read from path,
// hex SHA-256 sum), extracting and caching it if needed. The caller holds
// the cache lock.
func (o *options) vmlinuxLocked(path, sum string, data []byte) (*Kernel, error) {
	if k, ok := o.cachedVmlinux(path, sum); ok {
		return k, nil
	}
	z, err := linuxboot.ParseBzImage(data)
	if err != nil {
		return nil, fmt.Errorf("kernel: %s: %w", path, err)
	}
	start := time.Now()
	o.log.Info("kernel: extracting vmlinux", "kernel", path, "sha256", sum, "compression", z.Compression())
	elf, err := z.Vmlinux()
	if err != nil {
		return nil, fmt.Errorf("kernel: %s: %w", path, err)
	}
	base := filepath.Join(o.cacheDir, "vmlinux", sum)
	if err := o.writeAtomic(base+".elf", elf); err != nil {
		return nil, err
	}
	rec := vmlinuxRecord{VmlinuxSize: int64(len(elf)), SetupHeader: z.Header.Raw}
	b, _ := json.Marshal(rec)
	if err := o.writeAtomic(base+".json", b); err != nil {
		return nil, err
	}
	o.log.Info("kernel: extracted vmlinux", "vmlinux", base+".elf", "bytes", len(elf), "took", time.Since(start))
	return &Kernel{Path: path, SHA256: sum, Vmlinux: base + ".elf", VmlinuxSize: rec.VmlinuxSize, SetupHeader: rec.SetupHeader}, nil
}

func (o *options) writeModuleRecord(k *Kernel, size int64) error {
	base, err := o.moduleBase()
	if err != nil {
		return err
	}
	b, _ := json.Marshal(moduleRecord{Sum: o.sum, SHA256: k.SHA256, Size: size})
	return o.writeAtomic(base+".json", b)
}

// tempFile creates a file in the cache's tmp directory, on the same file
// system as its final place.
func (o *options) tempFile() (*os.File, error) {
	dir := filepath.Join(o.cacheDir, "tmp")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("kernel: cache: %w", err)
	}
	f, err := os.CreateTemp(dir, "part-*")
	if err != nil {
		return nil, fmt.Errorf("kernel: cache: %w", err)
	}
	return f, nil
}

// install makes the finished temporary file tmp read-only and renames it to
// dst.
func install(tmp, dst string) error {
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return fmt.Errorf("kernel: cache: %w", err)
	}
	if err := os.Chmod(tmp, 0o444); err != nil {
		return fmt.Errorf("kernel: cache: %w", err)
	}
	if err := os.Rename(tmp, dst); err != nil {
		return fmt.Errorf("kernel: cache: %w", err)
	}
	return nil
}

// writeAtomic writes data to dst through a temporary file and a rename.
func (o *options) writeAtomic(dst string, data []byte) error {
	f, err := o.tempFile()
	if err != nil {
		return err
	}
	_, err = f.Write(data)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = install(f.Name(), dst)
	}
	if err != nil {
		os.Remove(f.Name())
		return fmt.Errorf("kernel: cache: write %s: %w", dst, err)
	}
	return nil
}

// lock takes the cache's file lock, waiting until ctx ends. flock locks
// belong to the open file, so goroutines of one process exclude each other
// as separate processes do.
func (o *options) lock(ctx context.Context) (unlock func(), err error) {
	if err := os.MkdirAll(o.cacheDir, 0o755); err != nil {
		return nil, fmt.Errorf("kernel: cache: %w", err)
	}
	f, err := os.OpenFile(filepath.Join(o.cacheDir, "lock"), os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("kernel: cache: %w", err)
	}
	fd := int(f.Fd())
	t := time.NewTimer(0)
	defer t.Stop()
	<-t.C
	for delay := time.Millisecond; ; delay = min(2*delay, 100*time.Millisecond) {
		err := unix.Flock(fd, unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			// Every writer holds the lock, so what is left in tmp
			// belongs to a process that died while writing.
			if ents, err := os.ReadDir(filepath.Join(o.cacheDir, "tmp")); err == nil {
				for _, e := range ents {
					os.Remove(filepath.Join(o.cacheDir, "tmp", e.Name()))
				}
			}
			return func() {
				unix.Flock(fd, unix.LOCK_UN)
				f.Close()
			}, nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) && !errors.Is(err, unix.EINTR) {
			f.Close()
			return nil, fmt.Errorf("kernel: cache lock: %w", err)
		}
		t.Reset(delay)
		select {
		case <-ctx.Done():
			f.Close()
			return nil, ctx.Err()
		case <-t.C:
		}
	}
}
