package main

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gosandbox/sandbox/guest/agentclient"
	"github.com/gosandbox/sandbox/guest/internal/guesttest"
	"github.com/gosandbox/sandbox/guest/internal/userland"
)

func TestMain(m *testing.M) {
	code := m.Run()
	guesttest.Cleanup()
	os.Exit(code)
}

func TestParseCmdline(t *testing.T) {
	p := parseCmdline("console=hvc0 rdinit=/init gosandbox.agent=myport gosandbox.agent_wait=5s gosandbox.debug=1 quiet")
	if p.port != "myport" || p.portWait != 5*time.Second || !p.debug {
		t.Errorf("parseCmdline = %+v", p)
	}
	p = parseCmdline("quiet gosandbox.agent_wait=bogus")
	if p.port != "gosandbox.agent" || p.portWait != 60*time.Second || p.debug {
		t.Errorf("parseCmdline(defaults) = %+v", p)
	}
}

// TestPID1InNamespaces runs the real init as PID 1 of new PID, mount, UTS,
// IPC and network namespaces, chrooted into a root like the initramfs, with
// the agent on a socketpair instead of the virtio port (no VM needed). It
// checks the mounts, the hostname from the host's config, lo, running as
// another user, orphan reaping, and that a shutdown request powers off
// (reboot(2) in a child PID namespace kills its init with SIGINT).
func TestPID1InNamespaces(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root for namespaces and mounts")
	}
	bin := guesttest.Userland(t)
	root := t.TempDir()
	initBin, err := os.ReadFile(filepath.Join(bin, "init"))
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{"bin", "dev", "etc", "proc", "sys", "tmp", "run", "root"} {
		os.MkdirAll(filepath.Join(root, d), 0o755)
	}
	os.WriteFile(filepath.Join(root, "init"), initBin, 0o755)
	for _, c := range userland.Names() {
		os.Symlink("/init", filepath.Join(root, "bin", c))
	}
	host, guest := guesttest.SocketPair(t)
	cmd := exec.Command("/init")
	cmd.Env = []string{"GOSANDBOX_AGENT_FD=3"}
	cmd.ExtraFiles = []*os.File{guest}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Chroot:       root,
		Cloneflags:   syscall.CLONE_NEWPID,
		Unshareflags: syscall.CLONE_NEWNS | syscall.CLONE_NEWUTS | syscall.CLONE_NEWIPC | syscall.CLONE_NEWNET,
		Pdeathsig:    syscall.SIGKILL,
	}
	if err := cmd.Start(); err != nil {
		t.Skipf("cannot start init in new namespaces here: %v", err)
	}
	guest.Close()
	waited := make(chan error, 1)
	go func() { waited <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-waited
	})

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	// Now returns the zero time: the test must not set this machine's clock.
	c, err := agentclient.Dial(ctx, host, agentclient.Options{Hostname: "pid1-test", Now: func() time.Time { return time.Time{} }})
	if err != nil {
		t.Fatalf("Dial = %v (init stderr: %s)", err, stderr.String())
	}
	defer c.Close()
	run := func(args ...string) string {
		t.Helper()
		var out, errb bytes.Buffer
		uid := uint32(0)
		st, err := c.Run(ctx, agentclient.Cmd{Args: args, Stdout: &out, Stderr: &errb, UID: &uid})
		if err != nil || !st.Success() {
			t.Fatalf("Run(%q) = %v, %v; stderr %q", args, st, err, errb.String())
		}
		return out.String()
	}
	// Signals to PID 1 that would end a Go program are shrugged off.
	run("kill", "-s", "TERM", "1")
	run("kill", "-s", "USR1", "1")
	run("kill", "-s", "HUP", "1")
	if err := c.Ping(ctx); err != nil {
		t.Fatalf("Ping after signalling PID 1 = %v (init stderr: %s)", err, stderr.String())
	}
	// ... and processes it starts still die of them.
	var killed bytes.Buffer
	if st, err := c.Run(ctx, agentclient.Cmd{Args: []string{"sh", "-c", "kill -s TERM $$; echo survived"}, Stdout: &killed}); err != nil || st.Signal != syscall.SIGTERM {
		t.Errorf("sh killing itself with SIGTERM = %v, %v, %q", st, err, killed.String())
	}
	if got := run("uname", "-n"); got != "pid1-test\n" {
		t.Errorf("hostname = %q, want pid1-test", got)
	}
	if got := run("cat", "/proc/1/cmdline"); !strings.HasPrefix(got, "/init") {
		t.Errorf("PID 1 is %q, want /init", got)
	}
	mounts := run("cat", "/proc/mounts")
	for _, m := range []string{" /proc proc ", " /sys sysfs ", " /dev devtmpfs ", " /dev/pts devpts ", " /dev/shm tmpfs ", " /tmp tmpfs ", " /run tmpfs "} {
		if !strings.Contains(mounts, m) {
			t.Errorf("no mount %q in /proc/mounts:\n%s", m, mounts)
		}
	}
	if got := run("cat", "/sys/class/net/lo/operstate", "/sys/class/net/lo/flags"); !strings.Contains(got, "0x9") {
		t.Errorf("lo state/flags = %q, want IFF_UP set", got)
	}
	nobody := uint32(65534)
	var out bytes.Buffer
	if st, err := c.Run(ctx, agentclient.Cmd{Args: []string{"id"}, UID: &nobody, Stdout: &out}); err != nil || !st.Success() || out.String() != "uid=65534 gid=65534\n" {
		t.Errorf("id as nobody = %v, %v, %q", st, err, out.String())
	}
	// An orphan (the backgrounded sleep) is re-parented to init and reaped.
	run("sh", "-c", "sleep 0.2 &")
	for {
		stats := run("sh", "-c", "cat /proc/[0-9]*/stat")
		zombie := false
		for _, line := range strings.Split(stats, "\n") {
			if f := strings.Fields(line); len(f) > 2 && (f[2] == "Z" || strings.Contains(line, "(sleep)")) {
				zombie = true
			}
		}
		if !zombie {
			break
		}
		select {
		case <-ctx.Done():
			t.Fatalf("the orphaned sleep was never reaped:\n%s", stats)
		case <-time.After(50 * time.Millisecond):
		}
	}
	if err := c.Shutdown(ctx); err != nil {
		t.Fatalf("Shutdown = %v", err)
	}
	select {
	case err := <-waited:
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGINT {
			t.Errorf("init ended with %v, want killed by SIGINT (power off in a PID namespace); stderr %s", err, stderr.String())
		}
		waited <- err
	case <-ctx.Done():
		t.Fatalf("init did not power off after Shutdown")
	}
}

func TestFindPort(t *testing.T) {
	root := t.TempDir()
	mk := func(vport, name string) {
		d := filepath.Join(root, "sys/class/virtio-ports", vport)
		os.MkdirAll(d, 0o755)
		os.WriteFile(filepath.Join(d, "name"), []byte(name+"\n"), 0o644)
		os.MkdirAll(filepath.Join(root, "dev"), 0o755)
		os.WriteFile(filepath.Join(root, "dev", vport), nil, 0o644)
	}
	mk("vport1p1", "other")
	if _, err := findPort(root, "gosandbox.agent", 20*time.Millisecond); err == nil {
		t.Errorf("findPort found a port that does not exist")
	}
	// The port appears while findPort waits.
	go func() {
		time.Sleep(30 * time.Millisecond)
		mk("vport1p2", "gosandbox.agent")
	}()
	dev, err := findPort(root, "gosandbox.agent", 30*time.Second)
	if err != nil || dev != filepath.Join(root, "dev/vport1p2") {
		t.Errorf("findPort = %q, %v; want %s/dev/vport1p2", dev, err, root)
	}
}
