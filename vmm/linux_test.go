package vmm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/gosandbox/sandbox/internal/kvmhost"
	"github.com/gosandbox/sandbox/kernel"
)

// linuxFixture is what every Linux boot in the tests needs.
type linuxFixture struct {
	kernel *kernel.Kernel
	initrd []byte
}

// prepareLinux resolves the default kernel (downloading and extracting it
// into the cache if needed) and builds the test init. It runs on the host
// before Delegate, so that the run inside the emulated host finds both in
// the shared cache directory.
func prepareLinux(t testing.TB) *linuxFixture {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	k, err := kernel.Default(ctx)
	if err != nil {
		t.Fatalf("default kernel: %v", err)
	}
	initPath := os.Getenv("GOSANDBOX_TEST_INIT")
	if initPath == "" {
		cache, err := os.UserCacheDir()
		if err != nil {
			t.Fatal(err)
		}
		dir := filepath.Join(cache, "gosandbox", "test", fmt.Sprintf("vmm-%d", os.Getpid()))
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(dir) })
		initPath = buildTestInit(t, dir)
		// Seen by the delegated run (t.Setenv is not there for benchmarks).
		os.Setenv("GOSANDBOX_TEST_INIT", initPath)
		t.Cleanup(func() { os.Unsetenv("GOSANDBOX_TEST_INIT") })
	}
	return &linuxFixture{kernel: k, initrd: testInitramfs(t, initPath)}
}

// boot boots the kernel with the test init and waits for the VM to end.
func (f *linuxFixture) boot(t *testing.T, vcpus int, cmdline string) (*VM, *Exit, string) {
	t.Helper()
	var con bytes.Buffer
	var out io.Writer = &con
	if os.Getenv("GOSANDBOX_TEST_CONSOLE") != "" {
		out = io.MultiWriter(&con, os.Stdout) // watch a boot live
	}
	vm, err := New(Config{Memory: 512 << 20, VCPUs: vcpus, Console: out})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { vm.Close() })
	// GOSANDBOX_TEST_CMDLINE adds kernel parameters, e.g. "loglevel=7" to
	// debug a boot.
	cmdline = strings.TrimSpace(cmdline + " " + os.Getenv("GOSANDBOX_TEST_CMDLINE"))
	lc := LinuxConfig{Kernel: f.kernel.Vmlinux, SetupHeader: f.kernel.SetupHeader, Initrd: f.initrd, Cmdline: cmdline}
	if _, err := vm.LoadLinux(lc); err != nil {
		t.Fatalf("LoadLinux: %v", err)
	}
	if err := vm.Start(); err != nil {
		t.Fatal(err)
	}
	// Generous: under emulation on a loaded 2-core machine boots have taken
	// minutes.
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	ex, err := vm.Wait(ctx)
	if err != nil {
		vm.Stop(context.Background())
		t.Fatalf("Wait: %v\nconsole:\n%s", err, vm.ConsoleLog())
	}
	return vm, ex, string(vm.ConsoleLog())
}

// TestLinux boots the default guest kernel with a tiny init on 1 and 2
// vCPUs, and checks that a kernel panic ends the VM with a typed error. It
// needs hardware KVM; elsewhere it runs inside the emulated KVM host (one
// outer VM for all cases).
func TestLinux(t *testing.T) {
	f := prepareLinux(t)
	if kvmhost.Delegate(t, kvmhost.WithTimeout(20*time.Minute)) {
		return
	}
	boots := 0
	t.Cleanup(func() { t.Logf("booted Linux %d times", boots) })
	for _, n := range []int{1, 2} {
		t.Run(fmt.Sprintf("vcpus=%d", n), func(t *testing.T) {
			boots++
			vm, ex, con := f.boot(t, n, "")
			if why, ok := kvmhost.GuestEmulatorFault(con); ok && ex.Reason != ExitPoweroff {
				if mode, _ := kvmhost.Detect(); mode == kvmhost.Inside {
					t.Logf("%s %s", kvmhost.EmulatorFaultMarker, why)
				}
			}
			if ex.Reason != ExitPoweroff {
				t.Fatalf("exit = %v, want poweroff\nconsole:\n%s", ex, con)
			}
			wantCPUs := "0"
			if n > 1 {
				wantCPUs = fmt.Sprintf("0-%d", n-1)
			}
			want := initMarker + " cpus=" + wantCPUs + " "
			if !strings.Contains(con, want) {
				t.Fatalf("console lacks %q:\n%s", want, con)
			}
			ph := vm.Phases()
			if ph.ToFirstRun() <= 0 || ph.ToInit() <= ph.ToFirstRun() {
				t.Fatalf("phases not recorded in order: %+v", ph)
			}
			t.Logf("vcpus=%d: New→first KVM_RUN %v, New→init %v, VM exits %v", n, ph.ToFirstRun(), ph.ToInit(), vm.Exits())
		})
	}
	t.Run("panic", func(t *testing.T) {
		boots++
		_, ex, con := f.boot(t, 1, "GOSANDBOX_TEST_PANIC=1")
		if ex.Reason != ExitPanic || !errors.Is(ex.AsError(), ErrGuestPanic) {
			t.Fatalf("exit = %v (%v), want guest panic\nconsole:\n%s", ex, ex.AsError(), con)
		}
		if !strings.Contains(ex.Detail, "Kernel panic") {
			t.Errorf("exit detail %q does not quote the panic", ex.Detail)
		}
	})
}
