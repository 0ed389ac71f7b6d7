package kvmhost

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"strings"

	"github.com/u-root/u-root/pkg/cpio"
)

// defaultModules are the kernel modules every outer VM loads (dependencies
// are added by resolution): KVM for AMD-V (TCG's "-cpu max" exposes SVM),
// virtio-pci, the entropy device and 9p over virtio for the host shares.
var defaultModules = []string{"kvm_amd", "virtio_pci", "virtio_rng", "9pnet_virtio", "9p"}

// initramfsFormat changes whenever the initramfs layout or init script
// changes, so cached images of an older layout are not reused.
const initramfsFormat = "kvmhost-initramfs-v1"

// Tags of the 9p shares the outer VM mounts.
const (
	tagHostRoot = "hostroot"
	tagWork     = "kvmwork"
)

// initScript is /init of the outer VM: a busybox shell as PID 1. It mounts
// the kernel file systems, loads the modules listed in /modules.order,
// brings up loopback, mounts the per-run work share and sources its
// setup.sh, which Run writes for each program. Failures before the work
// share exists can only be reported on the console; later ones go to the
// status file.
const initScript = `#!/bin/busybox sh
B=/bin/busybox
$B mount -t proc proc /proc
$B mount -t sysfs sysfs /sys
$B mount -t devtmpfs devtmpfs /dev
say() { $B echo "kvmhost-init: $*" >/dev/console; }
failed=""
for m in $($B cat /modules.order); do
	$B insmod "/lib/modules/$m" || failed="$failed $m"
done
$B ip link set lo up || say "cannot bring up lo"
if ! $B mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 ` + tagWork + ` /mnt/work; then
	say "cannot mount the work share (9p); modules failed:$failed"
	$B poweroff -f
fi
if [ -n "$failed" ]; then
	$B echo "setup insmod failed:$failed" >/mnt/work/status
	say "insmod failed:$failed"
	$B poweroff -f
fi
if [ ! -f /mnt/work/setup.sh ]; then
	$B echo "setup no setup.sh in the work share" >/mnt/work/status
	$B poweroff -f
fi
. /mnt/work/setup.sh
$B poweroff -f
`

// ensureInitramfs returns the path of the cached initramfs for kernel k,
// busybox bb and the wanted modules, building it when absent.
func ensureInitramfs(ctx context.Context, log *slog.Logger, cacheRoot string, k *kernel, bb string, modules []string) (string, error) {
	want := append(append([]string(nil), defaultModules...), modules...)
	order, err := k.index.resolve(want)
	if err != nil {
		return "", fmt.Errorf("%w: kernel %s: %v", ErrInvalidConfig, k.key, err)
	}
	bbData, err := os.ReadFile(bb)
	if err != nil {
		return "", &UnavailableError{Reason: "reading busybox", Err: err}
	}
	h := sha256.New()
	fmt.Fprintf(h, "%s\n%s\n%s\n", initramfsFormat, k.key, initScript)
	h.Write(bbData)
	fmt.Fprintf(h, "\n%s\n", strings.Join(order, "\n"))
	name := hex.EncodeToString(h.Sum(nil))[:24] + ".cpio"
	dir := filepath.Join(cacheRoot, "initramfs")
	p := filepath.Join(dir, name)
	if _, err := os.Stat(p); err == nil {
		return p, nil
	}
	l, err := lockFile(ctx, p+".lock")
	if err != nil {
		return "", err
	}
	defer l.unlock()
	if _, err := os.Stat(p); err == nil {
		return p, nil
	}
	mods, err := extractModules(ctx, k, order)
	if err != nil {
		return "", err
	}
	var buf bytes.Buffer
	if err := writeInitramfs(&buf, bbData, order, mods); err != nil {
		return "", err
	}
	if err := writeFileAtomic(p, buf.Bytes(), 0o644); err != nil {
		return "", err
	}
	log.Info("kvmhost: built the outer VM initramfs", "path", p, "modules", len(order), "bytes", buf.Len())
	return p, nil
}

// extractModules reads the module files at paths (relative to
// lib/modules/<release>) out of the kernel .deb.
func extractModules(ctx context.Context, k *kernel, paths []string) (map[string][]byte, error) {
	want := map[string]string{}
	for _, p := range paths {
		want["lib/modules/"+k.release+"/"+p] = p
	}
	cmd := exec.CommandContext(ctx, "dpkg-deb", "--fsys-tarfile", k.deb)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		return nil, &UnavailableError{Reason: "running dpkg-deb", Err: err}
	}
	got, terr := modulesFromTar(stdout, want)
	io.Copy(io.Discard, stdout)
	werr := cmd.Wait()
	if terr != nil {
		return nil, terr
	}
	if werr != nil {
		return nil, fmt.Errorf("dpkg-deb --fsys-tarfile %s: %w: %s", k.deb, werr, stderr.Bytes())
	}
	return got, nil
}

// modulesFromTar picks the files named in want (tar path -> result key)
// out of a tar stream; every wanted file must be present.
func modulesFromTar(r io.Reader, want map[string]string) (map[string][]byte, error) {
	got := map[string][]byte{}
	tr := tar.NewReader(r)
	for len(got) < len(want) {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("reading kernel package: %w", err)
		}
		key, ok := want[strings.TrimPrefix(path.Clean("/"+hdr.Name), "/")]
		if !ok || hdr.Typeflag != tar.TypeReg {
			continue
		}
		if hdr.Size > 64<<20 {
			return nil, fmt.Errorf("kernel module %s: %d bytes is implausibly large", hdr.Name, hdr.Size)
		}
		data, err := io.ReadAll(tr)
		if err != nil {
			return nil, fmt.Errorf("reading %s from kernel package: %w", hdr.Name, err)
		}
		got[key] = data
	}
	for _, key := range want {
		if _, ok := got[key]; !ok {
			return nil, fmt.Errorf("kernel package lacks module file %s", key)
		}
	}
	return got, nil
}

// writeInitramfs writes the outer VM's initramfs as an uncompressed newc
// cpio archive (the kernel unpacks it without spending emulated cycles on
// decompression): /init, /bin/busybox, the modules in load order under
// /lib/modules with their order in /modules.order, and the directories and
// device nodes init needs before devtmpfs is mounted.
func writeInitramfs(w io.Writer, busybox []byte, order []string, mods map[string][]byte) error {
	recs := []cpio.Record{
		cpio.Directory("bin", 0o755),
		cpio.Directory("dev", 0o755),
		cpio.CharDev("dev/console", 0o600, 5, 1),
		cpio.CharDev("dev/null", 0o666, 1, 3),
		cpio.Directory("lib", 0o755),
		cpio.Directory("lib/modules", 0o755),
		cpio.Directory("mnt", 0o755),
		cpio.Directory("mnt/host", 0o755),
		cpio.Directory("mnt/ro", 0o755),
		cpio.Directory("mnt/work", 0o755),
		cpio.Directory("proc", 0o555),
		cpio.Directory("sys", 0o555),
		cpio.Directory("tmp", 0o1777),
		cpio.StaticRecord(busybox, cpio.Info{Name: "bin/busybox", Mode: cpio.S_IFREG | 0o755}),
		cpio.Symlink("bin/sh", "busybox"),
		cpio.StaticFile("init", initScript, 0o755),
	}
	var list strings.Builder
	for i, p := range order {
		data, ok := mods[p]
		if !ok {
			return fmt.Errorf("module %s missing", p)
		}
		name := fmt.Sprintf("%03d-%s", i, path.Base(p))
		list.WriteString(name + "\n")
		recs = append(recs, cpio.StaticRecord(data, cpio.Info{Name: "lib/modules/" + name, Mode: cpio.S_IFREG | 0o644}))
	}
	recs = append(recs, cpio.StaticFile("modules.order", list.String(), 0o644))
	for i := range recs {
		recs[i] = cpio.MakeReproducible(recs[i])
		recs[i].Ino = uint64(i + 1)
		recs[i].NLink = 1
	}
	rw := cpio.Newc.Writer(w)
	if err := cpio.WriteRecords(rw, recs); err != nil {
		return err
	}
	return cpio.WriteTrailer(rw)
}
