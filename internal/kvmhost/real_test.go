package kvmhost

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// needOuterVM is the rule for tests that boot the outer VM: under CI=true
// they must run (a setup failure fails them); otherwise -short skips them.
func needOuterVM(t *testing.T) {
	t.Helper()
	if testing.Short() && os.Getenv("CI") != "true" {
		t.Skip("boots the emulated KVM host (seconds); skipped with -short outside CI")
	}
	if m, err := Detect(); m == Unavailable {
		if os.Getenv("CI") == "true" {
			t.Fatalf("CI=true and the emulated KVM host is unavailable: %v", err)
		}
		t.Skipf("emulated KVM host unavailable: %v", err)
	}
}

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(&lineLogger{t: t}, nil))
}

// TestRunEcho boots the outer VM and runs a shell that writes to both
// streams, checks for a real /dev/kvm and exits 3.
func TestRunEcho(t *testing.T) {
	needOuterVM(t)
	var stdout, stderr bytes.Buffer
	res, err := RunResult(context.Background(), Config{
		Program: "/bin/sh",
		Args:    []string{"-c", `echo hi; echo oops >&2; test -c /dev/kvm || exit 9; test "$GOSANDBOX_IN_KVMHOST" = 1 || exit 8; touch /tmp/w || exit 7; test "$(cat /proc/sys/kernel/softlockup_panic)" = 1 || exit 6; exit 3`},
		Stdout:  &stdout,
		Stderr:  &stderr,
		Timeout: 10 * time.Minute,
		Logger:  testLogger(t),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("kvmhost: outer VM boot took %v (outer kernel uptime %v), whole run %v, kernel %s", res.Boot, res.GuestUptime, res.Total, res.Kernel)
	if res.ExitCode != 3 {
		t.Errorf("exit code = %d, want 3 (9: no /dev/kvm, 8: env not set, 7: /tmp not writable, 6: a soft lockup does not panic the outer kernel)", res.ExitCode)
	}
	if stdout.String() != "hi\n" || stderr.String() != "oops\n" {
		t.Errorf("stdout %q, stderr %q; want \"hi\\n\", \"oops\\n\"", stdout.String(), stderr.String())
	}
	if res.Boot <= 0 || res.Total < res.Boot {
		t.Errorf("timings not recorded: %+v", res)
	}
}

// TestDelegateKVM runs in the outer VM through Delegate (or directly on
// hardware KVM) and proves a real KVM: the API version is 12, a VM can be
// created, and the module behind /dev/kvm is not PVM.
func TestDelegateKVM(t *testing.T) {
	if Delegate(t) {
		return
	}
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	const (
		kvmGetAPIVersion = 0xAE00
		kvmCreateVM      = 0xAE01
	)
	v, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), kvmGetAPIVersion, 0)
	if errno != 0 || v != 12 {
		t.Fatalf("KVM_GET_API_VERSION = %d, %v; want 12", v, errno)
	}
	vm, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), kvmCreateVM, 0)
	if errno != 0 {
		t.Fatalf("KVM_CREATE_VM: %v", errno)
	}
	unix.Close(int(vm))
	if _, err := os.Stat("/sys/module/kvm_pvm"); err == nil {
		t.Error("/dev/kvm is PVM here")
	}
	if os.Getenv(EnvInside) == "1" {
		// Delegate holds a VM for the process (HoldStaticKeys).
		fds, _ := os.ReadDir("/proc/self/fd")
		vms := 0
		for _, e := range fds {
			if l, _ := os.Readlink("/proc/self/fd/" + e.Name()); l == "anon_inode:kvm-vm" {
				vms++
			}
		}
		if vms != 1 {
			t.Errorf("%d KVM VM fds open inside the outer VM, want the 1 HoldStaticKeys keeps", vms)
		}
		if _, err := os.Stat("/sys/module/kvm_amd"); err != nil {
			t.Errorf("inside the outer VM but kvm_amd is not loaded: %v", err)
		}
		// The outer VM hands the test its working directory (the package
		// source) and a writable temp dir.
		if _, err := os.Stat("real_test.go"); err != nil {
			t.Errorf("package directory not visible inside: %v", err)
		}
		if err := os.WriteFile(filepath.Join(t.TempDir(), "x"), []byte("x"), 0o644); err != nil {
			t.Errorf("temp dir not writable inside: %v", err)
		}
	}
	t.Logf("KVM API version %d, KVM_CREATE_VM ok", v)
}

// TestRunFailures checks that a run which cannot report an exit status
// gives the right typed error, with QEMU reaped and the work dir removed.
func TestRunFailures(t *testing.T) {
	needOuterVM(t)
	tmp := t.TempDir()
	t.Setenv("TMPDIR", tmp) // Run's work dirs land here, so leftovers show

	t.Run("timeout", func(t *testing.T) {
		start := time.Now()
		_, err := Run(context.Background(), Config{Program: "/bin/sleep", Args: []string{"600"}, Timeout: 3 * time.Second, Logger: testLogger(t)})
		if !errors.Is(err, ErrTimeout) {
			t.Fatalf("err = %v, want ErrTimeout", err)
		}
		var ve *VMError
		if !errors.As(err, &ve) || !strings.Contains(ve.QEMUExit, "killed") {
			t.Errorf("QEMU not reported killed: %v", err)
		}
		t.Logf("timed out after %v: %v", time.Since(start), err)
	})
	t.Run("ctx cancel", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		if _, err := Run(ctx, Config{Program: "/bin/sleep", Args: []string{"600"}}); !errors.Is(err, ErrTimeout) {
			t.Fatalf("err = %v, want ErrTimeout", err)
		}
	})
	t.Run("setup", func(t *testing.T) {
		// /dev/shm is a fresh tmpfs inside, so this directory is missing there.
		dir, err := os.MkdirTemp("/dev/shm", "kvmhost-test-*")
		if err != nil {
			t.Skipf("no /dev/shm: %v", err)
		}
		defer os.RemoveAll(dir)
		_, err = Run(context.Background(), Config{Program: "/bin/true", Dir: dir, Timeout: 10 * time.Minute})
		if !errors.Is(err, ErrSetup) || !strings.Contains(err.Error(), dir) {
			t.Fatalf("err = %v, want ErrSetup naming %s", err, dir)
		}
	})
	t.Run("panic", func(t *testing.T) {
		_, err := Run(context.Background(), Config{Program: "/bin/sh", Args: []string{"-c", "echo c >/proc/sysrq-trigger; sleep 600"}, Timeout: 10 * time.Minute})
		if !errors.Is(err, ErrCrashed) {
			t.Fatalf("err = %v, want ErrCrashed", err)
		}
		if !strings.Contains(err.Error(), "sysrq") && !strings.Contains(err.Error(), "panic") {
			t.Errorf("console tail does not show the panic: %v", err)
		}
	})
	ents, _ := os.ReadDir(tmp)
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), "kvmhost-run-") {
			t.Errorf("work dir %s left behind", e.Name())
		}
	}
}

// BenchmarkRunTrue measures one outer VM run of /bin/true: boot-s is QEMU
// start to the program running, uptime-s the outer kernel's uptime then,
// total-s QEMU start to exit.
func BenchmarkRunTrue(b *testing.B) {
	if m, err := Detect(); m == Unavailable {
		b.Skipf("emulated KVM host unavailable: %v", err)
	}
	var boot, up, total time.Duration
	for b.Loop() {
		res, err := RunResult(context.Background(), Config{Program: "/bin/true", Timeout: 10 * time.Minute})
		if err != nil || res.ExitCode != 0 {
			b.Fatalf("exit %d, %v", res.ExitCode, err)
		}
		boot += res.Boot
		up += res.GuestUptime
		total += res.Total
	}
	n := float64(b.N)
	b.ReportMetric(boot.Seconds()/n, "boot-s")
	b.ReportMetric(up.Seconds()/n, "uptime-s")
	b.ReportMetric(total.Seconds()/n, "total-s")
}

// BenchmarkDelegateCreateVM shows a benchmark delegated to the outer VM:
// it measures KVM_CREATE_VM plus close on the real KVM there.
func BenchmarkDelegateCreateVM(b *testing.B) {
	if Delegate(b) {
		return
	}
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	for b.Loop() {
		vm, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), 0xAE01, 0)
		if errno != 0 {
			b.Fatal(errno)
		}
		unix.Close(int(vm))
	}
}

// TestRunNetwork checks Config.Network: the program reaches an HTTP server
// on this host's loopback through QEMU's user networking (10.0.2.2 is the
// host there), and extra modules load.
func TestRunNetwork(t *testing.T) {
	needOuterVM(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "hello from the host\n")
	})}
	go srv.Serve(ln)
	defer srv.Close()
	bb, err := findStaticBusybox()
	if err != nil {
		t.Skip(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	var stdout, stderr bytes.Buffer
	res, err := RunResult(context.Background(), Config{
		Program: bb,
		Args:    []string{"sh", "-c", fmt.Sprintf("wget -q -O - http://10.0.2.2:%d/ && grep -q 10.0.2.3 /etc/resolv.conf && test -d /sys/module/veth", port)},
		Network: true,
		Modules: []string{"veth"},
		Stdout:  &stdout,
		Stderr:  &stderr,
		Timeout: 10 * time.Minute,
	})
	if err != nil {
		t.Fatal(err)
	}
	if res.ExitCode != 0 || stdout.String() != "hello from the host\n" {
		t.Errorf("exit %d, stdout %q, stderr %q", res.ExitCode, stdout.String(), stderr.String())
	}
}
