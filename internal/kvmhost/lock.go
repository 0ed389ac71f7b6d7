package kvmhost

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"
)

// fileLock is an exclusive flock(2) on a lock file. Concurrent test
// processes (go test runs packages in parallel) serialize cache fills and
// apt-get calls through it.
// It keeps a raw descriptor, not an *os.File, so that no finalizer can
// close it (and drop the lock) while the holder still relies on it.
type fileLock struct{ fd int }

// tryLock opens (creating) path and tries to take an exclusive flock.
// ok is false when another open file holds it.
func tryLock(path string) (l *fileLock, ok bool, err error) {
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_CREAT|unix.O_CLOEXEC, 0o644)
	if err != nil {
		return nil, false, &os.PathError{Op: "open", Path: path, Err: err}
	}
	for {
		err = unix.Flock(fd, unix.LOCK_EX|unix.LOCK_NB)
		if err != unix.EINTR {
			break
		}
	}
	if err == nil {
		return &fileLock{fd: fd}, true, nil
	}
	unix.Close(fd)
	if errors.Is(err, unix.EWOULDBLOCK) {
		return nil, false, nil
	}
	return nil, false, fmt.Errorf("flock %s: %w", path, err)
}

// lockFile takes an exclusive lock on path, creating it and its directory.
// It polls so that ctx can end the wait.
func lockFile(ctx context.Context, path string) (*fileLock, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, err
	}
	for {
		l, ok, err := tryLock(path)
		if err != nil {
			return nil, err
		}
		if ok {
			return l, nil
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("waiting for lock %s: %w", path, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// unlock releases the lock; safe to call twice.
func (l *fileLock) unlock() {
	if l == nil || l.fd < 0 {
		return
	}
	unix.Flock(l.fd, unix.LOCK_UN)
	unix.Close(l.fd)
	l.fd = -1
}

// writeFileAtomic writes data to path through a temporary file in the same
// directory and a rename, so readers see the old file or the whole new one.
func writeFileAtomic(path string, data []byte, perm os.FileMode) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Chmod(perm); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}

// EnvSlots overrides how many outer VMs may run at once on this machine
// (across processes); the default is one per CPU.
const EnvSlots = "GOSANDBOX_KVMHOST_SLOTS"

// acquireSlot takes one of n machine-wide outer VM slots (lock files under
// dir), waiting until one is free or ctx ends. TCG VMs are CPU-bound:
// many more of them than cores only slow each other down, and inner tests
// with timeouts then fail for no reason of their own.
func acquireSlot(ctx context.Context, dir string, n int, waiting func()) (*fileLock, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	warned := false
	for {
		for i := 0; i < n; i++ {
			p := filepath.Join(dir, fmt.Sprintf("slot%d.lock", i))
			l, ok, err := tryLock(p)
			if err != nil {
				return nil, err
			}
			if ok {
				return l, nil
			}
		}
		if !warned && waiting != nil {
			waiting()
			warned = true
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("waiting for a free outer VM slot: %w", ctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
}
