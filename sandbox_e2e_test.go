package sandbox

import (
	"bytes"
	"context"
	"errors"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/gosandbox/sandbox/internal/kvmhost"
	"github.com/gosandbox/sandbox/kernel"
)

// TestSandbox boots sandboxes and runs commands in them. It needs hardware
// KVM; elsewhere it runs inside the emulated KVM host, all cases in one
// outer VM, as few guest boots as the cases allow.
func TestSandbox(t *testing.T) {
	ctx0, cancel0 := context.WithTimeout(context.Background(), 5*time.Minute)
	if _, err := kernel.Default(ctx0); err != nil { // warm the cache before going inside
		t.Fatal(err)
	}
	cancel0()
	if kvmhost.Delegate(t, kvmhost.WithTimeout(40*time.Minute)) {
		return
	}
	boots := 0
	defer func() { t.Logf("booted %d sandboxes", boots) }()
	var con bytes.Buffer
	opts := []Option{Name("e2e Test_Sandbox"), CPUs(2)}
	if os.Getenv("GOSANDBOX_TEST_CONSOLE") != "" {
		opts = append(opts, Console(os.Stdout))
	} else {
		opts = append(opts, Console(&con))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	sb, err := New(ctx, opts...)
	boots++
	if err != nil {
		t.Fatalf("New: %v\nconsole:\n%s", err, con.String())
	}
	defer sb.Close()
	t.Logf("%s: %s", sb, sb.Phases())

	t.Run("echo", func(t *testing.T) {
		res, err := sb.Run(ctx, "sh", "-c", "echo hi; echo oops >&2; exit 3")
		if err != nil {
			t.Fatal(err)
		}
		if string(res.Stdout) != "hi\n" || string(res.Stderr) != "oops\n" || res.ExitCode != 3 {
			t.Fatalf("got %+v", res)
		}
	})
	t.Run("exit codes", func(t *testing.T) {
		for cmd, want := range map[string]int{"true": 0, "false": 1, "exit 127": 127} {
			res, err := sb.Run(ctx, "sh", "-c", cmd)
			if err != nil || res.ExitCode != want {
				t.Errorf("%s: %+v, %v; want exit %d", cmd, res, err, want)
			}
		}
	})
	t.Run("not found", func(t *testing.T) {
		_, err := sb.Run(ctx, "/no/such/command")
		if !errors.Is(err, ErrExecNotFound) {
			t.Fatalf("err = %v, want ErrExecNotFound", err)
		}
	})
	t.Run("hostname and cpus", func(t *testing.T) {
		res, err := sb.Run(ctx, "sh", "-c", "cat /proc/sys/kernel/hostname; cat /sys/devices/system/cpu/online")
		if err != nil {
			t.Fatal(err)
		}
		if got := strings.Fields(string(res.Stdout)); len(got) != 2 || got[0] != "e2e-test-sandbox" || got[1] != "0-1" {
			t.Fatalf("hostname/cpus = %q", res.Stdout)
		}
	})
}
