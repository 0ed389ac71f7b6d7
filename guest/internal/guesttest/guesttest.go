// Package guesttest helps tests run the guest userland and agent on the
// build machine, with no VM: it builds guest/cmd/init from source once per
// test binary and links every userland command to it in a bin directory,
// the way the initramfs does.
package guesttest

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"golang.org/x/sys/unix"
)

var (
	once   sync.Once
	binDir string
	binErr error
)

// Userland returns a directory holding the guest binary as "init" and a
// link per command (sh, cat, ...). The directory lives until the test
// binary ends (Cleanup removes it from TestMain).
func Userland(tb testing.TB) string {
	tb.Helper()
	once.Do(func() {
		dir, err := os.MkdirTemp("", "gosandbox-userland-")
		if err != nil {
			binErr = err
			return
		}
		binDir = dir
		initPath := filepath.Join(dir, "init")
		cmd := exec.Command("go", "build", "-trimpath", "-o", initPath, "github.com/gosandbox/sandbox/guest/cmd/init")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			binErr = &buildError{string(out), err}
			return
		}
		out, _ := exec.Command(initPath).CombinedOutput()
		line := string(out)
		_, list, ok := strings.Cut(line, "commands: [")
		if !ok {
			binErr = &buildError{line, os.ErrInvalid}
			return
		}
		list, _, _ = strings.Cut(list, "]")
		for _, c := range strings.Fields(list) {
			if err := os.Symlink("init", filepath.Join(dir, c)); err != nil {
				binErr = err
				return
			}
		}
	})
	if binErr != nil {
		tb.Fatalf("building the guest userland: %v", binErr)
	}
	return binDir
}

// Cleanup removes the userland directory; call it from TestMain.
func Cleanup() {
	if binDir != "" {
		os.RemoveAll(binDir)
	}
}

type buildError struct {
	out string
	err error
}

func (e *buildError) Error() string { return e.err.Error() + ": " + e.out }

// SocketPair returns the two ends of a connected, non-blocking Unix stream
// socket pair as files whose Close interrupts a pending Read.
func SocketPair(tb testing.TB) (*os.File, *os.File) {
	tb.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		tb.Fatalf("socketpair: %v", err)
	}
	return os.NewFile(uintptr(fds[0]), "host"), os.NewFile(uintptr(fds[1]), "guest")
}
