package kvmhost

import (
	"bufio"
	"bytes"
	"context"
	"debug/elf"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"time"
)

// Packages and binaries the outer VM needs on the host.
const (
	qemuBinary     = "qemu-system-x86_64"
	qemuPackage    = "qemu-system-x86"
	busyboxPackage = "busybox-static"
	xzPackage      = "xz-utils"
	// DefaultKernelPackage is the Debian package whose dependency names the
	// outer VM's kernel. It is the generic flavour, not "-cloud": Debian's
	// cloud kernel is built without 9p (CONFIG_NET_9P is not set), and the
	// outer VM sees the host's files over virtio-9p.
	DefaultKernelPackage = "linux-image-amd64"
)

// tools are the host binaries the outer VM needs.
type tools struct {
	qemu    string // absolute path of qemu-system-x86_64
	busybox string // absolute path of a statically linked busybox
}

// aptEnv is the environment for apt-get and dpkg calls.
func aptEnv() []string {
	return append(os.Environ(), "DEBIAN_FRONTEND=noninteractive", "LC_ALL=C")
}

// runLogged runs a command, returning its combined output in the error.
func runLogged(ctx context.Context, log *slog.Logger, dir string, name string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	cmd.Env = aptEnv()
	start := time.Now()
	out, err := cmd.CombinedOutput()
	log.Debug("kvmhost: ran", "cmd", name+" "+strings.Join(args, " "), "took", time.Since(start), "err", err)
	if err != nil {
		tail := out
		if len(tail) > 2000 {
			tail = tail[len(tail)-2000:]
		}
		return out, fmt.Errorf("%s %s: %w\n%s", name, strings.Join(args, " "), err, bytes.TrimSpace(tail))
	}
	return out, nil
}

// aptInstall installs Debian packages with apt-get, running apt-get update
// and retrying once if the first attempt fails. Calls from concurrent
// processes are serialized by a lock file in the cache.
func aptInstall(ctx context.Context, log *slog.Logger, cacheRoot string, pkgs ...string) error {
	if _, err := exec.LookPath("apt-get"); err != nil {
		return &UnavailableError{Reason: fmt.Sprintf("%s missing and apt-get not found; install them with your package manager", strings.Join(pkgs, ", "))}
	}
	if os.Geteuid() != 0 {
		return &UnavailableError{Reason: fmt.Sprintf("%s missing; run: sudo apt-get install --no-install-recommends %s", strings.Join(pkgs, ", "), strings.Join(pkgs, " "))}
	}
	l, err := lockFile(ctx, filepath.Join(cacheRoot, "apt.lock"))
	if err != nil {
		return err
	}
	defer l.unlock()
	log.Info("kvmhost: installing packages", "packages", pkgs)
	args := append([]string{"-o", "DPkg::Lock::Timeout=300", "install", "-y", "--no-install-recommends"}, pkgs...)
	if _, err := runLogged(ctx, log, "", "apt-get", args...); err != nil {
		if _, uerr := runLogged(ctx, log, "", "apt-get", "-o", "DPkg::Lock::Timeout=300", "update"); uerr != nil {
			return &UnavailableError{Reason: "apt-get update failed", Err: uerr}
		}
		if _, err := runLogged(ctx, log, "", "apt-get", args...); err != nil {
			return &UnavailableError{Reason: "apt-get install failed", Err: err}
		}
	}
	return nil
}

// ensureTools finds QEMU and a static busybox, installing them when missing.
func ensureTools(ctx context.Context, log *slog.Logger, cacheRoot string) (tools, error) {
	var t tools
	var missing []string
	q, qerr := exec.LookPath(qemuBinary)
	if qerr != nil {
		missing = append(missing, qemuPackage)
	}
	b, berr := findStaticBusybox()
	if berr != nil {
		missing = append(missing, busyboxPackage)
	}
	if len(missing) == 0 {
		marker := filepath.Join(cacheRoot, "xz-install-failed")
		if _, err := exec.LookPath("xz"); err != nil {
			if _, merr := os.Stat(marker); merr != nil {
				// Optional: without it the outer VM boots the slower
				// bzImage. One failed attempt is remembered.
				if err := aptInstall(ctx, log, cacheRoot, xzPackage); err != nil {
					log.Info("kvmhost: xz unavailable; booting the compressed kernel", "err", err)
					os.WriteFile(marker, []byte(err.Error()+"\n"), 0o644)
				}
			}
		}
	}
	if len(missing) > 0 {
		if _, err := exec.LookPath("xz"); err != nil {
			missing = append(missing, xzPackage)
		}
		if err := aptInstall(ctx, log, cacheRoot, missing...); err != nil {
			return t, err
		}
		if q, qerr = exec.LookPath(qemuBinary); qerr != nil {
			return t, &UnavailableError{Reason: qemuBinary + " still not found after installing " + qemuPackage, Err: qerr}
		}
		if b, berr = findStaticBusybox(); berr != nil {
			return t, &UnavailableError{Reason: "no statically linked busybox after installing " + busyboxPackage, Err: berr}
		}
	}
	t.qemu, _ = filepath.Abs(q)
	t.busybox = b
	return t, nil
}

// findStaticBusybox returns the path of a statically linked busybox: the
// outer VM runs it from the initramfs, where no shared libraries exist.
func findStaticBusybox() (string, error) {
	var lastErr error = errors.New("busybox not found")
	for _, p := range []string{"/bin/busybox", "/usr/bin/busybox"} {
		if err := checkStaticELF(p); err != nil {
			lastErr = err
			continue
		}
		real, err := filepath.EvalSymlinks(p)
		if err != nil {
			return "", err
		}
		return real, nil
	}
	return "", lastErr
}

func checkStaticELF(p string) error {
	f, err := elf.Open(p)
	if err != nil {
		return err
	}
	defer f.Close()
	for _, prog := range f.Progs {
		if prog.Type == elf.PT_INTERP {
			return fmt.Errorf("%s is dynamically linked; install busybox-static", p)
		}
	}
	return nil
}

// kernel is an unpacked outer-VM kernel in the cache.
type kernel struct {
	dir     string // cache directory of this kernel
	key     string // package_version, names dir
	release string // uname -r, e.g. 6.1.0-56-amd64
	image   string // path of vmlinuz
	deb     string // path of the .deb (module files are extracted from it)
	index   *moduleIndex
}

const kernelComplete = "complete"

var debSafe = regexp.MustCompile(`[^A-Za-z0-9._+-]`)

// resolveKernelPackage maps a (meta)package name to the concrete
// linux-image package and its candidate version, using the local apt
// lists only.
func resolveKernelPackage(ctx context.Context, log *slog.Logger, pkg string) (name, version string, err error) {
	name = pkg
	out, err := runLogged(ctx, log, "", "apt-cache", "depends", "--important", pkg)
	if err != nil {
		return "", "", err
	}
	// A metapackage depends on exactly one versioned image package.
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 2 && f[0] == "Depends:" && strings.HasPrefix(f[1], "linux-image-") {
			name = f[1]
			break
		}
	}
	out, err = runLogged(ctx, log, "", "apt-cache", "show", "--no-all-versions", name)
	if err != nil {
		return "", "", err
	}
	sc = bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "Version: "); ok {
			return name, strings.TrimSpace(v), nil
		}
	}
	return "", "", fmt.Errorf("apt-cache show %s printed no Version", name)
}

// aptListsDir is where apt keeps its package lists; its modification
// time changes with every apt-get update.
const aptListsDir = "/var/lib/apt/lists"

// resolveKernelPackageCached is resolveKernelPackage memoized in the cache
// for as long as the apt lists do not change: apt-cache takes seconds when
// apt keeps no binary package cache.
func resolveKernelPackageCached(ctx context.Context, log *slog.Logger, root, pkg string) (name, version string, err error) {
	st, err := os.Stat(aptListsDir)
	if err != nil {
		return resolveKernelPackage(ctx, log, pkg)
	}
	stamp := fmt.Sprintf("%d", st.ModTime().UnixNano())
	memo := filepath.Join(root, "resolved-"+debSafe.ReplaceAllString(pkg, "_"))
	if b, err := os.ReadFile(memo); err == nil {
		if f := strings.Fields(string(b)); len(f) == 3 && f[0] == stamp {
			return f[1], f[2], nil
		}
	}
	name, version, err = resolveKernelPackage(ctx, log, pkg)
	if err != nil {
		return "", "", err
	}
	if err := os.MkdirAll(root, 0o755); err == nil {
		writeFileAtomic(memo, []byte(stamp+" "+name+" "+version+"\n"), 0o644)
	}
	return name, version, nil
}

// ensureKernel returns the cached kernel for pkg, downloading and unpacking
// it when absent. When apt cannot resolve the package (not Debian, no
// lists), the newest complete kernel already in the cache is used.
func ensureKernel(ctx context.Context, log *slog.Logger, cacheRoot, pkg string) (*kernel, error) {
	root := filepath.Join(cacheRoot, "kernel")
	name, version, rerr := resolveKernelPackageCached(ctx, log, root, pkg)
	if rerr != nil {
		if k, err := newestCachedKernel(root); err == nil {
			log.Info("kvmhost: apt cannot resolve the kernel package; using the cached kernel", "kernel", k.key, "err", rerr)
			return k, nil
		}
		return nil, &UnavailableError{Reason: fmt.Sprintf("cannot resolve the outer VM kernel package %s with apt-cache (Debian or Ubuntu with apt lists needed)", pkg), Err: rerr}
	}
	key := debSafe.ReplaceAllString(name+"_"+version, "_")
	dir := filepath.Join(root, key)
	if k, err := loadKernel(dir); err == nil {
		return k, nil
	}
	l, err := lockFile(ctx, dir+".lock")
	if err != nil {
		return nil, err
	}
	defer l.unlock()
	if k, err := loadKernel(dir); err == nil {
		return k, nil // another process filled it while we waited
	}
	log.Info("kvmhost: fetching the outer VM kernel", "package", name, "version", version)
	if err := fetchKernel(ctx, log, cacheRoot, root, dir, name, version); err != nil {
		return nil, err
	}
	return loadKernel(dir)
}

func newestCachedKernel(root string) (*kernel, error) {
	ents, err := os.ReadDir(root)
	if err != nil {
		return nil, err
	}
	var best *kernel
	var bestTime time.Time
	for _, e := range ents {
		if !e.IsDir() {
			continue
		}
		dir := filepath.Join(root, e.Name())
		st, err := os.Stat(filepath.Join(dir, kernelComplete))
		if err != nil {
			continue
		}
		if k, err := loadKernel(dir); err == nil && st.ModTime().After(bestTime) {
			best, bestTime = k, st.ModTime()
		}
	}
	if best == nil {
		return nil, errors.New("no cached kernel")
	}
	return best, nil
}

// loadKernel opens a complete cache entry.
func loadKernel(dir string) (*kernel, error) {
	if _, err := os.Stat(filepath.Join(dir, kernelComplete)); err != nil {
		return nil, err
	}
	rel, err := os.ReadFile(filepath.Join(dir, "release"))
	if err != nil {
		return nil, err
	}
	k := &kernel{
		dir:     dir,
		key:     filepath.Base(dir),
		release: strings.TrimSpace(string(rel)),
		image:   filepath.Join(dir, "vmlinuz"),
		deb:     filepath.Join(dir, "kernel.deb"),
	}
	f, err := os.Open(filepath.Join(dir, "modules.dep"))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if k.index, err = parseModulesDep(f); err != nil {
		return nil, err
	}
	if b, err := os.Open(filepath.Join(dir, "modules.builtin")); err == nil {
		defer b.Close()
		if err := k.index.parseBuiltin(b); err != nil {
			return nil, err
		}
	}
	for _, p := range []string{k.image, k.deb} {
		if _, err := os.Stat(p); err != nil {
			return nil, err
		}
	}
	return k, nil
}

// fetchKernel downloads the kernel .deb, unpacks it in a scratch directory
// and fills dir (atomically, by renaming a staged directory) with vmlinuz,
// modules.dep, modules.builtin, release and the .deb itself.
func fetchKernel(ctx context.Context, log *slog.Logger, cacheRoot, root, dir, name, version string) error {
	if _, err := exec.LookPath("dpkg-deb"); err != nil {
		return &UnavailableError{Reason: "dpkg-deb not found (needed to unpack the outer VM kernel)", Err: err}
	}
	scratch, err := os.MkdirTemp(root, ".fetch-*")
	if err != nil {
		return err
	}
	defer os.RemoveAll(scratch)
	spec := name + "=" + version
	if _, err := runLogged(ctx, log, scratch, "apt-get", "download", spec); err != nil {
		// Stale lists name a version the mirror dropped: update and retry.
		if err := aptUpdate(ctx, log, cacheRoot); err != nil {
			return err
		}
		if _, err := runLogged(ctx, log, scratch, "apt-get", "download", name); err != nil {
			return &UnavailableError{Reason: "apt-get download " + name + " failed", Err: err}
		}
	}
	debs, _ := filepath.Glob(filepath.Join(scratch, "*.deb"))
	if len(debs) != 1 {
		return &UnavailableError{Reason: fmt.Sprintf("apt-get download %s left %d .deb files", name, len(debs))}
	}
	x := filepath.Join(scratch, "x")
	if _, err := runLogged(ctx, log, "", "dpkg-deb", "-x", debs[0], x); err != nil {
		return &UnavailableError{Reason: "unpacking the kernel package failed", Err: err}
	}
	images, _ := filepath.Glob(filepath.Join(x, "boot", "vmlinuz-*"))
	mods, _ := filepath.Glob(filepath.Join(x, "lib", "modules", "*"))
	if len(images) != 1 || len(mods) != 1 {
		return &UnavailableError{Reason: fmt.Sprintf("kernel package %s: want one boot/vmlinuz-* and one lib/modules/*, found %d and %d", name, len(images), len(mods))}
	}
	release := filepath.Base(mods[0])
	ix, err := buildModuleIndex(os.DirFS(mods[0]))
	if err != nil {
		return fmt.Errorf("indexing kernel modules of %s: %w", name, err)
	}
	if _, err := ix.resolve(defaultModules); err != nil {
		return &UnavailableError{Reason: "kernel package " + name + " lacks modules the outer VM needs", Err: err}
	}
	stage := filepath.Join(scratch, "stage")
	if err := os.Mkdir(stage, 0o755); err != nil {
		return err
	}
	var dep bytes.Buffer
	if err := ix.writeModulesDep(&dep); err != nil {
		return err
	}
	builtin, _ := os.ReadFile(filepath.Join(mods[0], "modules.builtin"))
	for _, f := range []struct {
		name string
		data []byte
	}{{"modules.dep", dep.Bytes()}, {"modules.builtin", builtin}, {"release", []byte(release + "\n")}} {
		if err := os.WriteFile(filepath.Join(stage, f.name), f.data, 0o644); err != nil {
			return err
		}
	}
	if err := os.Rename(images[0], filepath.Join(stage, "vmlinuz")); err != nil {
		return err
	}
	if err := os.Rename(debs[0], filepath.Join(stage, "kernel.deb")); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(stage, kernelComplete), []byte(time.Now().UTC().Format(time.RFC3339)+"\n"), 0o644); err != nil {
		return err
	}
	os.RemoveAll(dir) // an incomplete leftover
	return os.Rename(stage, dir)
}

func aptUpdate(ctx context.Context, log *slog.Logger, cacheRoot string) error {
	if os.Geteuid() != 0 {
		return &UnavailableError{Reason: "apt lists are stale and updating them needs root; run: sudo apt-get update"}
	}
	l, err := lockFile(ctx, filepath.Join(cacheRoot, "apt.lock"))
	if err != nil {
		return err
	}
	defer l.unlock()
	if _, err := runLogged(ctx, log, "", "apt-get", "-o", "DPkg::Lock::Timeout=300", "update"); err != nil {
		return &UnavailableError{Reason: "apt-get update failed", Err: err}
	}
	return nil
}

// sortedKeys returns m's keys in order.
func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
