package vmm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"
)

// testKernel returns the vmlinux the Linux tests boot.
func testKernel(t testing.TB) string {
	t.Helper()
	if k := os.Getenv("GOSANDBOX_KERNEL"); k != "" {
		return k
	}
	t.Skip("GOSANDBOX_KERNEL is not set (temporary until the kernel package and the emulated host are wired in)")
	return ""
}

// bootTestGuest boots the default kernel with this test binary as init and
// waits for the VM to end.
func bootTestGuest(t *testing.T, vcpus int, cmdline string) (*VM, *Exit, string) {
	t.Helper()
	var con bytes.Buffer
	vm, err := New(Config{Memory: 512 << 20, VCPUs: vcpus, Console: &con})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { vm.Close() })
	// GOSANDBOX_TEST_CMDLINE adds kernel parameters, e.g. "loglevel=7" to
	// debug a boot.
	cmdline = strings.TrimSpace(cmdline + " " + os.Getenv("GOSANDBOX_TEST_CMDLINE"))
	if _, err := vm.LoadLinux(LinuxConfig{Kernel: testKernel(t), Initrd: testInitramfs(t), Cmdline: cmdline}); err != nil {
		t.Fatalf("LoadLinux: %v", err)
	}
	if err := vm.Start(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	ex, err := vm.Wait(ctx)
	if err != nil {
		vm.Stop(context.Background())
		t.Fatalf("Wait: %v\nconsole:\n%s", err, vm.ConsoleLog())
	}
	return vm, ex, string(vm.ConsoleLog())
}

// TestLinux boots the default guest kernel. It needs hardware KVM; on other
// hosts it runs inside the emulated KVM host.
func TestLinux(t *testing.T) {
	for _, n := range []int{1, 2} {
		t.Run(fmt.Sprintf("vcpus=%d", n), func(t *testing.T) {
			vm, ex, con := bootTestGuest(t, n, "")
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
			t.Logf("vcpus=%d: New→first KVM_RUN %v, New→init %v, exits %v", n, ph.ToFirstRun(), ph.ToInit(), vm.Exits())
		})
	}
	t.Run("panic", func(t *testing.T) {
		_, ex, con := bootTestGuest(t, 1, "GOSANDBOX_TEST_PANIC=1")
		if ex.Reason != ExitPanic || !errors.Is(ex.AsError(), ErrGuestPanic) {
			t.Fatalf("exit = %v (%v), want guest panic\nconsole:\n%s", ex, ex.AsError(), con)
		}
	})
}
