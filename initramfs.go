package sandbox

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/gosandbox/sandbox/guest"
)

// guestInitramfs returns the path of the guest initramfs, written once per
// guest binary into the user's cache directory (named by the binary's
// hash, written to a temporary name and renamed into place, so concurrent
// processes agree). Every sandbox maps it into guest memory copy-on-write
// rather than building and copying 4.5 MB.
func guestInitramfs(cacheDir string) (string, error) {
	m, err := guest.ReadManifest()
	if err != nil {
		return "", err
	}
	dir := filepath.Join(cacheDir, "gosandbox", "guest")
	path := filepath.Join(dir, "initramfs-"+m.BinarySHA256+".cpio")
	if st, err := os.Stat(path); err == nil && st.Mode().IsRegular() && st.Size() > 0 {
		return path, nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("sandbox: guest initramfs cache: %w", err)
	}
	tmp, err := os.CreateTemp(dir, ".initramfs-*")
	if err != nil {
		return "", fmt.Errorf("sandbox: guest initramfs cache: %w", err)
	}
	defer os.Remove(tmp.Name())
	if err := guest.WriteInitramfs(tmp); err != nil {
		tmp.Close()
		return "", fmt.Errorf("sandbox: write guest initramfs: %w", err)
	}
	if err := tmp.Chmod(0o444); err != nil {
		tmp.Close()
		return "", err
	}
	if err := tmp.Close(); err != nil {
		return "", err
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return "", fmt.Errorf("sandbox: guest initramfs cache: %w", err)
	}
	return path, nil
}
