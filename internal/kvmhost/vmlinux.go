package kvmhost

import (
	"bytes"
	"context"
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"time"
)

// Booting the outer kernel from the bzImage makes the emulated CPU run its
// xz decompressor at every start: measured 10+ s of wall time under TCG on
// two busy cores. The uncompressed vmlinux, cut out of the bzImage once and
// cached, boots through PVH (QEMU loads the ELF itself) and skips that.
// Only xz payloads are handled (Debian's kernels), with the xz command; anything else falls back
// to booting the bzImage.

const maxVmlinux = 512 << 20

// errNoVmlinux means the bzImage cannot be turned into a PVH-bootable ELF;
// the caller boots the bzImage instead.
var errNoVmlinux = errors.New("no PVH-bootable vmlinux")

// bzPayload returns the compressed payload of a bzImage.
func bzPayload(b []byte) ([]byte, error) {
	if len(b) < 0x250 || string(b[0x202:0x206]) != "HdrS" {
		return nil, fmt.Errorf("%w: not a bzImage", errNoVmlinux)
	}
	if binary.LittleEndian.Uint16(b[0x206:]) < 0x208 {
		return nil, fmt.Errorf("%w: boot protocol too old for payload fields", errNoVmlinux)
	}
	setup := int(b[0x1f1])
	if setup == 0 {
		setup = 4
	}
	start := uint64(setup+1) * 512
	off := uint64(binary.LittleEndian.Uint32(b[0x248:]))
	n := uint64(binary.LittleEndian.Uint32(b[0x24c:]))
	if start+off+n > uint64(len(b)) || n == 0 {
		return nil, fmt.Errorf("%w: payload [%d+%d, +%d) outside the %d-byte file", errNoVmlinux, start, off, n, len(b))
	}
	return b[start+off : start+off+n], nil
}

// extractVmlinux decompresses an xz bzImage payload into an ELF vmlinux
// with a PVH entry note.
func extractVmlinux(bz []byte) ([]byte, error) {
	p, err := bzPayload(bz)
	if err != nil {
		return nil, err
	}
	if !bytes.HasPrefix(p, []byte("\xfd7zXZ\x00")) {
		return nil, fmt.Errorf("%w: payload is not xz", errNoVmlinux)
	}
	// Kernel payloads use xz's x86 BCJ filter, which Go xz packages lack;
	// xz-utils (Debian priority "standard") decodes it.
	xzPath, err := exec.LookPath("xz")
	if err != nil {
		return nil, fmt.Errorf("%w: xz not installed: %v", errNoVmlinux, err)
	}
	cmd := exec.Command(xzPath, "--decompress", "--stdout", "--single-stream")
	cmd.Stdin = bytes.NewReader(p)
	var out, stderr bytes.Buffer
	cmd.Stdout = &limitedWriter{w: &out, n: maxVmlinux + 1}
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("%w: xz: %v: %s", errNoVmlinux, err, bytes.TrimSpace(stderr.Bytes()))
	}
	if out.Len() > maxVmlinux {
		return nil, fmt.Errorf("%w: vmlinux larger than %d bytes", errNoVmlinux, maxVmlinux)
	}
	if err := checkPVH(out.Bytes()); err != nil {
		return nil, err
	}
	return out.Bytes(), nil
}

// checkPVH requires an ELF with a Xen PHYS32_ENTRY note (what QEMU needs
// to boot an uncompressed kernel).
func checkPVH(b []byte) error {
	f, err := elf.NewFile(bytes.NewReader(b))
	if err != nil {
		return fmt.Errorf("%w: payload is not ELF: %v", errNoVmlinux, err)
	}
	defer f.Close()
	for _, prog := range f.Progs {
		if prog.Type != elf.PT_NOTE || prog.Filesz > 1<<20 {
			continue
		}
		data := make([]byte, prog.Filesz)
		if _, err := prog.ReadAt(data, 0); err != nil {
			continue
		}
		if hasNote(data, "Xen", 18) {
			return nil
		}
	}
	return fmt.Errorf("%w: ELF has no PVH (Xen PHYS32_ENTRY) note", errNoVmlinux)
}

// hasNote walks ELF notes looking for one with the given owner and type.
func hasNote(data []byte, owner string, typ uint32) bool {
	le := binary.LittleEndian
	for len(data) >= 12 {
		nsz, dsz, t := le.Uint32(data), le.Uint32(data[4:]), le.Uint32(data[8:])
		name := (uint64(nsz) + 3) &^ 3
		desc := (uint64(dsz) + 3) &^ 3
		if 12+name+desc > uint64(len(data)) {
			return false
		}
		if t == typ && nsz == uint32(len(owner)+1) && string(data[12:12+len(owner)]) == owner {
			return true
		}
		data = data[12+name+desc:]
	}
	return false
}

// bootImage returns the kernel file to boot: the cached vmlinux when one
// can be had, else the bzImage. The extraction runs once per kernel, under
// the kernel's lock.
func bootImage(ctx context.Context, log *slog.Logger, k *kernel) string {
	vm := filepath.Join(k.dir, "vmlinux")
	none := vm + ".none"
	if _, err := os.Stat(vm); err == nil {
		return vm
	}
	if _, err := os.Stat(none); err == nil {
		return k.image
	}
	l, err := lockFile(ctx, k.dir+".lock")
	if err != nil {
		return k.image
	}
	defer l.unlock()
	if _, err := os.Stat(vm); err == nil {
		return vm
	}
	start := time.Now()
	bz, err := os.ReadFile(k.image)
	if err != nil {
		return k.image
	}
	data, err := extractVmlinux(bz)
	if err != nil {
		log.Info("kvmhost: booting the bzImage", "reason", err)
		writeFileAtomic(none, []byte(err.Error()+"\n"), 0o644)
		return k.image
	}
	if err := writeFileAtomic(vm, data, 0o644); err != nil {
		return k.image
	}
	log.Info("kvmhost: cut the vmlinux out of the bzImage", "bytes", len(data), "took", time.Since(start))
	return vm
}

// limitedWriter fails once more than n bytes were written.
type limitedWriter struct {
	w io.Writer
	n int64
}

func (l *limitedWriter) Write(p []byte) (int, error) {
	if int64(len(p)) > l.n {
		return 0, errors.New("output too large")
	}
	l.n -= int64(len(p))
	return l.w.Write(p)
}
