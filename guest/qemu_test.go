package guest

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/gosandbox/sandbox/guest/agentclient"
)

// TestBootInQEMU boots the default kernel with Initramfs() in QEMU (TCG,
// no KVM needed) with a virtio-serial device like the VMM's: hvc0 plus a
// port named PortName on a Unix socket, and drives the agent through it.
// The boot markers are read back through QEMU's isa-debugcon on port
// 0x440. It costs about ten seconds of CPU; -short or GOSANDBOX_QEMU=0
// skips it, and so does a machine without QEMU or the kernel, except under
// CI=true, where that is a failure.
func TestBootInQEMU(t *testing.T) {
	if testing.Short() || os.Getenv("GOSANDBOX_QEMU") == "0" {
		t.Skip("-short or GOSANDBOX_QEMU=0")
	}
	missing := func(format string, args ...any) {
		t.Helper()
		if os.Getenv("CI") == "true" {
			t.Fatalf(format, args...)
		}
		t.Skipf(format, args...)
	}
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		missing("no qemu-system-x86_64 (apt-get install qemu-system-x86): %v", err)
	}
	gomodcache, _ := exec.Command("go", "env", "GOMODCACHE").Output()
	kernels, _ := filepath.Glob(filepath.Join(strings.TrimSpace(string(gomodcache)), "github.com/gokrazy/kernel.amd64@*/vmlinuz"))
	if k := os.Getenv("GOSANDBOX_KERNEL"); k != "" {
		kernels = []string{k}
	}
	if len(kernels) == 0 {
		missing("no kernel: set GOSANDBOX_KERNEL or `go mod download github.com/gokrazy/kernel.amd64`")
	}
	dir := t.TempDir()
	initrd, err := Initramfs()
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(dir, "initrd"), initrd, 0o644)
	sock := filepath.Join(dir, "agent.sock")
	conLog := filepath.Join(dir, "console.log")
	markers := filepath.Join(dir, "markers")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, qemu,
		"-M", "pc", "-accel", "tcg", "-cpu", "qemu64", "-m", "512", "-smp", "1",
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		"-kernel", kernels[0], "-initrd", filepath.Join(dir, "initrd"),
		"-append", KernelCmdline("")+" initcall_blacklist=cmos_init,early_resume_init panic=-1 gosandbox.debug=1",
		"-chardev", "file,id=mk,path="+markers, "-device", fmt.Sprintf("isa-debugcon,iobase=%#x,chardev=mk", BootMarkerPort),
		"-device", "virtio-serial-pci,id=vs",
		"-chardev", "file,id=con,path="+conLog, "-device", "virtconsole,chardev=con,bus=vs.0",
		"-chardev", "socket,id=ag,path="+sock+",server=on,wait=off", "-device", "virtserialport,chardev=ag,name="+PortName+",bus=vs.0",
	)
	var qout bytes.Buffer
	cmd.Stdout, cmd.Stderr = &qout, &qout
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	defer func() {
		cmd.Process.Kill()
		<-exited
		con, _ := os.ReadFile(conLog)
		t.Logf("guest console:\n%s\nqemu: %s", con, qout.String())
	}()
	var conn net.Conn
	for conn == nil {
		conn, err = net.Dial("unix", sock)
		if err != nil {
			conn = nil
			select {
			case <-ctx.Done():
				t.Fatal("no agent socket")
			case <-time.After(20 * time.Millisecond):
			}
		}
	}
	start := time.Now()
	c, err := agentclient.Dial(ctx, conn.(*net.UnixConn), agentclient.Options{Hostname: "qemu-guest", Env: []string{"GREETING=hi"}})
	if err != nil {
		t.Fatalf("Dial = %v", err)
	}
	defer c.Close()
	t.Logf("agent ready after %v: %+v", time.Since(start), c.Ready())
	if mk, _ := os.ReadFile(markers); !bytes.Equal(mk, []byte{BootMarkerInitStarted, BootMarkerAgentReady}) {
		t.Errorf("boot markers on port %#x = %v, want [%d %d]", BootMarkerPort, mk, BootMarkerInitStarted, BootMarkerAgentReady)
	}
	run := func(args ...string) (agentclient.ExitStatus, string) {
		var out bytes.Buffer
		st, err := c.Run(ctx, agentclient.Cmd{Args: args, Stdout: &out, Stderr: &out})
		if err != nil {
			t.Fatalf("Run(%q) = %v", args, err)
		}
		return st, out.String()
	}
	if st, out := run("sh", "-c", "echo $GREETING; uname -n; date +%s"); !st.Success() || !strings.HasPrefix(out, "hi\nqemu-guest\n") {
		t.Errorf("sh = %v, %q", st, out)
	} else if f := strings.Fields(out); len(f) == 3 {
		t.Logf("guest clock %s, host %d", f[2], time.Now().Unix())
	}
	want := sha256.Sum256(bytes.Repeat([]byte("y\n"), 1<<19))
	if st, out := run("sh", "-c", "yes | head -c 1M | sha256sum"); !st.Success() || !strings.HasPrefix(out, hex.EncodeToString(want[:])) {
		t.Errorf("yes | head -c 1M | sha256sum = %v, %q; want %x", st, out, want)
	}
	in := bytes.Repeat([]byte("0123456789abcdef"), 1<<14)
	var catOut bytes.Buffer
	if st, err := c.Run(ctx, agentclient.Cmd{Args: []string{"cat"}, Stdin: bytes.NewReader(in), Stdout: &catOut}); err != nil || !st.Success() || !bytes.Equal(catOut.Bytes(), in) {
		t.Errorf("cat of %d bytes = %v, %v, %d bytes", len(in), st, err, catOut.Len())
	}
	p, err := c.Exec(ctx, agentclient.Cmd{Args: []string{"sleep", "100"}})
	if err != nil {
		t.Fatal(err)
	}
	p.Signal(syscall.SIGTERM)
	if st, err := p.Wait(ctx); err != nil || st.Signal != syscall.SIGTERM {
		t.Errorf("sleep after SIGTERM = %v, %v", st, err)
	}
	var wg sync.WaitGroup
	for i := range 20 {
		wg.Go(func() {
			var out bytes.Buffer
			st, err := c.Run(ctx, agentclient.Cmd{Args: []string{"echo", fmt.Sprint(i)}, Stdout: &out})
			if err != nil || !st.Success() || out.String() != fmt.Sprintf("%d\n", i) {
				t.Errorf("concurrent echo %d = %v, %v, %q", i, st, err, out.String())
			}
		})
	}
	wg.Wait()
	if st, _ := run("sh", "-c", "nosuch"); st.Code != 127 {
		t.Errorf("missing command: %v, want exit 127", st)
	}
	if _, err := c.Exec(ctx, agentclient.Cmd{Args: []string{"nosuch"}}); err == nil {
		t.Errorf("Exec(nosuch) succeeded")
	}
	var tty bytes.Buffer
	if st, err := c.Run(ctx, agentclient.Cmd{Args: []string{"stty", "size"}, TTY: true, Rows: 33, Cols: 99, Stdout: &tty}); err != nil || !st.Success() || strings.TrimSpace(tty.String()) != "33 99" {
		t.Errorf("stty size on a TTY = %v, %v, %q", st, err, tty.String())
	}
	if st, out := run("cat", "/proc/mounts"); !st.Success() || !strings.Contains(out, " /dev/pts devpts ") {
		t.Errorf("mounts: %v %q", st, out)
	}
	if err := c.Shutdown(ctx); err != nil {
		t.Fatalf("Shutdown = %v", err)
	}
	select {
	case err := <-exited:
		exited <- err
		if err != nil {
			t.Errorf("QEMU ended with %v after a power-off", err)
		}
	case <-ctx.Done():
		t.Fatal("the guest did not power off")
	}
}
