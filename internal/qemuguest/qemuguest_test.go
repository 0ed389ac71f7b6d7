package qemuguest

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gosandbox/sandbox/guest"
	"github.com/gosandbox/sandbox/guest/agentclient"
	"github.com/gosandbox/sandbox/kernel"
)

// fixture returns a kernel and an initramfs, or skips (fails under CI=true)
// when QEMU or the kernel is missing.
func fixture(t *testing.T) (kernelPath, initrd string) {
	t.Helper()
	missing := func(format string, args ...any) {
		t.Helper()
		if os.Getenv("CI") == "true" {
			t.Fatalf(format, args...)
		}
		t.Skipf(format, args...)
	}
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		missing("no qemu-system-x86_64 (apt-get install qemu-system-x86): %v", err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()
	k, err := kernel.Default(ctx)
	if err != nil {
		missing("no default kernel: %v", err)
	}
	initrd = filepath.Join(t.TempDir(), "initramfs.cpio")
	f, err := os.Create(initrd)
	if err != nil {
		t.Fatal(err)
	}
	if err := guest.WriteInitramfs(f); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	return k.Path, initrd
}

// TestStart boots the guest under QEMU in software emulation (TCG: no KVM
// needed, about a minute of CPU), runs commands through the agent, checks
// that the init configured the user-mode network and that tcpblast moves
// bytes to a host listener through it, and that Close leaves no QEMU
// behind. -short or GOSANDBOX_QEMU=0 skips it.
func TestStart(t *testing.T) {
	if testing.Short() || os.Getenv("GOSANDBOX_QEMU") == "0" {
		t.Skip("-short or GOSANDBOX_QEMU=0")
	}
	k, initrd := fixture(t)
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()
	g, err := Start(ctx, Config{Kernel: k, Initramfs: initrd, UserNet: true, Accel: "tcg", Hostname: "qemu-guest", Env: []string{"GREETING=hi"}})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	ph := g.Phases()
	t.Logf("agent connected after %v (init marker after %v)", ph.ToAgentConnected(), ph.ToInit())
	if ph.Init.IsZero() || ph.AgentReady.IsZero() || ph.AgentReady.Before(ph.Init) || ph.AgentConnected.Before(ph.AgentReady) {
		t.Errorf("boot markers out of order or missing: %+v", ph)
	}
	run := func(args ...string) string {
		t.Helper()
		var out, errb bytes.Buffer
		st, err := g.Agent().Run(ctx, agentclient.Cmd{Args: args, Stdout: &out, Stderr: &errb})
		if err != nil || !st.Success() {
			t.Fatalf("%q = %v, %v; stderr %q", args, st, err, errb.String())
		}
		return out.String()
	}
	if out := run("sh", "-c", "echo $GREETING; hostname"); out != "hi\nqemu-guest\n" {
		t.Errorf("echo/hostname = %q", out)
	}
	// The NIC found on virtio-mmio, configured by the init.
	if out := run("sh", "-c", "cat /sys/class/net/*/address /sys/class/net/*/mtu"); !strings.Contains(out, UserNetMAC+"\n") || !strings.Contains(out, strconv.Itoa(UserNetMTU)+"\n") {
		t.Errorf("interfaces: %q, want MAC %s and MTU %d", out, UserNetMAC, UserNetMTU)
	}
	// The entropy device, as in a sandbox.
	if out := run("cat", "/sys/class/misc/hw_random/rng_current"); !strings.HasPrefix(out, "virtio_rng") {
		t.Errorf("hw_random rng_current = %q, want virtio_rng.*", out)
	}
	if out := run("cat", "/etc/hosts"); !strings.Contains(out, "host.gosandbox.internal") {
		t.Errorf("/etc/hosts = %q", out)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	got := make(chan int64, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			got <- -1
			return
		}
		n, _ := io.Copy(io.Discard, c)
		c.Close()
		got <- n
	}()
	port := ln.Addr().(*net.TCPAddr).Port
	out := run("tcpblast", "send", "host.gosandbox.internal:"+strconv.Itoa(port), "1M")
	if n := <-got; n != 1<<20 || !strings.HasPrefix(out, "1048576 ") {
		t.Errorf("tcpblast send 1M: host got %d bytes, guest printed %q", n, out)
	}

	pid := g.cmd.Process.Pid
	if err := g.Close(); err != nil {
		t.Fatal(err)
	}
	g.Close()
	if err := syscall.Kill(pid, 0); err == nil {
		t.Errorf("QEMU (pid %d) still exists after Close", pid)
	}
	if _, err := os.Stat(g.dir); !os.IsNotExist(err) {
		t.Errorf("temporary directory %s still exists after Close: %v", g.dir, err)
	}
	if _, err := g.Agent().Run(ctx, agentclient.Cmd{Args: []string{"true"}}); err == nil {
		t.Error("the agent still answers after Close")
	}
}

// TestStartErrors checks the typed errors for configurations QEMU cannot
// start or cannot boot.
func TestStartErrors(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "f")
	os.WriteFile(file, []byte("not a kernel"), 0o644)
	ctx := t.Context()
	for _, cfg := range []Config{
		{},
		{Kernel: file},
		{Kernel: filepath.Join(dir, "missing"), Initramfs: file},
		{Kernel: file, Initramfs: file, Memory: 1 << 20},
		{Kernel: file, Initramfs: file, CPUs: -1},
		{Kernel: file, Initramfs: file, Accel: "hax"},
		{Kernel: file, Initramfs: file, Cmdline: "a\nb"},
	} {
		if _, err := Start(ctx, cfg); !errors.Is(err, ErrInvalidConfig) {
			t.Errorf("Start(%+v) = %v, want ErrInvalidConfig", cfg, err)
		}
	}
	var ee *ExitError
	if qemu, err := exec.LookPath("qemu-system-x86_64"); err == nil {
		// QEMU itself refuses a kernel that is not one.
		_, err := Start(ctx, Config{QEMU: qemu, Kernel: file, Initramfs: file, Accel: "tcg"})
		if !errors.As(err, &ee) || ee.Output == "" {
			t.Errorf("Start with a junk kernel = %v, want an *ExitError with QEMU's output", err)
		}
	}
	t.Setenv("PATH", dir)
	if _, err := Start(ctx, Config{Kernel: file, Initramfs: file}); !errors.Is(err, ErrNoQEMU) {
		t.Errorf("Start without QEMU in PATH = %v, want ErrNoQEMU", err)
	}
	if _, err := Start(ctx, Config{QEMU: filepath.Join(dir, "missing"), Kernel: file, Initramfs: file}); !errors.Is(err, ErrExited) || !errors.As(err, &ee) {
		t.Errorf("Start with a missing QEMU binary = %v, want an *ExitError", err)
	}
}
