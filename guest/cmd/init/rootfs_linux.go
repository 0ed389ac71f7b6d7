package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/gosandbox/sandbox/guest/agentproto"
	"golang.org/x/sys/unix"
)

// ErrNoDevice means a block device the host announced did not appear.
var ErrNoDevice = errors.New("no virtio-blk device with that serial")

// blockBySerial waits (at most wait) until every serial in want names a
// virtio-blk disk in sysfs and returns serial → device node. root is "/"
// except in tests.
func blockBySerial(root string, want []string, wait time.Duration) (map[string]string, error) {
	deadline := time.Now().Add(wait)
	for {
		found := make(map[string]string)
		dirs, _ := filepath.Glob(filepath.Join(root, "sys/block/vd*"))
		for _, d := range dirs {
			b, err := os.ReadFile(filepath.Join(d, "serial"))
			if err != nil {
				continue
			}
			s := strings.TrimRight(string(b), "\x00\n ")
			dev := filepath.Join(root, "dev", filepath.Base(d))
			if _, err := os.Stat(dev); err == nil {
				found[s] = dev
			}
		}
		var missing []string
		for _, s := range want {
			if _, ok := found[s]; !ok {
				missing = append(missing, s)
			}
		}
		if len(missing) == 0 {
			return found, nil
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("%w: %q not among the %d disks after %v", ErrNoDevice, missing, len(dirs), wait)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// setupRoot mounts the image the host attached and makes it the root of
// PID 1 (and so of every command the agent starts): each layer's SquashFS
// read-only under /l/<i>, the writable layer (ext4 disk or tmpfs) under
// /u, overlayfs stacking them on /newroot; then the API file systems move
// into it and /newroot moves onto / (what switch_root does; pivot_root
// does not work from the initramfs). The initramfs stays underneath,
// unreachable.
func setupRoot(rc *agentproto.RootConfig) error {
	want := append([]string(nil), rc.Layers...)
	if rc.Upper != "" {
		want = append(want, rc.Upper)
	}
	devs, err := blockBySerial("/", want, 10*time.Second)
	if err != nil {
		return err
	}
	var lower []string
	for _, tag := range rc.Shares {
		dir := "/l/" + strconv.Itoa(len(lower))
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return err
		}
		if err := unix.Mount(tag, dir, "9p", unix.MS_RDONLY|unix.MS_NODEV|unix.MS_NOSUID, "trans=virtio,version=9p2000.L,cache=loose,msize=1048576"); err != nil {
			return fmt.Errorf("mount the 9p share %s: %w", tag, err)
		}
		lower = append(lower, dir)
	}
	for i, s := range rc.Layers {
		dir := "/l/" + strconv.Itoa(len(lower))
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return err
		}
		if err := unix.Mount(devs[s], dir, "squashfs", unix.MS_RDONLY|unix.MS_NODEV|unix.MS_NOSUID, ""); err != nil {
			return fmt.Errorf("mount layer %d (%s, serial %s) as squashfs: %w", i, devs[s], s, err)
		}
		lower = append(lower, dir)
	}
	if err := os.MkdirAll("/u", 0o755); err != nil {
		return err
	}
	if rc.Upper != "" {
		if err := unix.Mount(devs[rc.Upper], "/u", "ext4", 0, ""); err != nil {
			return fmt.Errorf("mount the writable layer (%s) as ext4: %w", devs[rc.Upper], err)
		}
	} else {
		opts := "mode=0755"
		if rc.UpperSize > 0 {
			opts += ",size=" + strconv.FormatUint(rc.UpperSize, 10)
		}
		if err := unix.Mount("tmpfs", "/u", "tmpfs", 0, opts); err != nil {
			return fmt.Errorf("mount the writable layer as tmpfs: %w", err)
		}
	}
	for _, d := range []string{"/u/upper", "/u/work", "/newroot"} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	data := "lowerdir=" + strings.Join(lower, ":") + ",upperdir=/u/upper,workdir=/u/work,redirect_dir=off,index=off,metacopy=off"
	if len(data) >= 4096 {
		return fmt.Errorf("overlayfs options are %d bytes, more than a page", len(data))
	}
	if err := unix.Mount("overlay", "/newroot", "overlay", 0, data); err != nil {
		return fmt.Errorf("mount overlayfs over %d layers: %w", len(lower), err)
	}
	// Move the API file systems along; their submounts (/dev/pts,
	// /dev/shm) move with them.
	for _, m := range []struct {
		dir  string
		mode os.FileMode
	}{{"/dev", 0o755}, {"/proc", 0o555}, {"/sys", 0o555}, {"/run", 0o755}, {"/tmp", 0o1777}} {
		target := "/newroot" + m.dir
		if err := mkdirNoFollow(target, m.mode); err != nil {
			return fmt.Errorf("create %s in the image: %w", m.dir, err)
		}
		if err := unix.Mount(m.dir, target, "", unix.MS_MOVE, ""); err != nil {
			return fmt.Errorf("move %s into the image: %w", m.dir, err)
		}
	}
	if err := unix.Chdir("/newroot"); err != nil {
		return err
	}
	if err := unix.Mount(".", "/", "", unix.MS_MOVE, ""); err != nil {
		return fmt.Errorf("move the image onto /: %w", err)
	}
	if err := unix.Chroot("."); err != nil {
		return fmt.Errorf("chroot into the image: %w", err)
	}
	return unix.Chdir("/")
}

// mkdirNoFollow makes dir unless it is a directory already. An image that
// has a symlink or a file there gets it replaced: /proc, /dev and friends
// must be real directories (and a symlink must not redirect a mount).
func mkdirNoFollow(dir string, mode os.FileMode) error {
	fi, err := os.Lstat(dir)
	if err == nil && fi.IsDir() {
		return nil
	}
	if err == nil {
		if err := os.Remove(dir); err != nil {
			return err
		}
	}
	if err := os.Mkdir(dir, mode); err != nil && !os.IsExist(err) {
		return err
	}
	return os.Chmod(dir, mode)
}
