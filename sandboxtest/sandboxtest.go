// Package sandboxtest starts sandboxes for Go tests: New boots one, fails
// the test with the guest console's tail if it cannot, and closes it when
// the test ends.
//
//	func TestScript(t *testing.T) {
//		sb := sandboxtest.New(t, sandbox.Memory(256<<20))
//		res, err := sb.Run(context.Background(), "sh", "-c", "echo ok")
//		...
//	}
//
// On a host whose KVM cannot boot Linux, New skips the test with the reason,
// except under CI=true, where it fails it: a CI run must not pass without
// having run its sandboxes.
package sandboxtest

import (
	"bytes"
	"context"
	"errors"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/gosandbox/sandbox"
	"github.com/gosandbox/sandbox/internal/kvmhost"
	"github.com/gosandbox/sandbox/vmm"
)

// BootTimeout bounds New's boot.
const BootTimeout = 15 * time.Minute

// New boots a sandbox with opts and registers its Close with t.Cleanup.
func New(t testing.TB, opts ...sandbox.Option) *sandbox.Sandbox {
	t.Helper()
	con := &syncBuffer{}
	opts = append([]sandbox.Option{sandbox.Console(con), sandbox.Name(t.Name())}, opts...)
	ctx, cancel := context.WithTimeout(context.Background(), BootTimeout)
	defer cancel()
	sb, err := sandbox.New(ctx, opts...)
	switch {
	case err == nil:
	case errors.Is(err, sandbox.ErrKVMUnusable) || errors.Is(err, sandbox.ErrNoKVM) || errors.Is(err, sandbox.ErrKVMPermission):
		if os.Getenv("CI") == "true" {
			t.Fatalf("sandboxtest: this host cannot run sandboxes, and CI must: %v", err)
		}
		t.Skipf("sandboxtest: this host cannot run sandboxes: %v", err)
	default:
		markEmulatorFault(t, err, con.tail(1<<20))
		t.Fatalf("sandboxtest: %v\nguest console:\n%s", err, con.tail(4096))
	}
	t.Cleanup(func() {
		if err := sb.Close(); err != nil {
			t.Errorf("sandboxtest: Close: %v", err)
		}
	})
	return sb
}

// markEmulatorFault logs kvmhost.EmulatorFaultMarker when this test runs
// inside the project's emulated KVM host (never on a user's host) and the
// boot failed the way only QEMU's emulated SVM makes guests fail, so that
// the project's CI runs the test again rather than failing on the
// emulator.
func markEmulatorFault(t testing.TB, err error, console string) {
	if mode, _ := kvmhost.Detect(); mode != kvmhost.Inside {
		return
	}
	var ge *vmm.GuestError
	tripleFault := errors.As(err, &ge) && ge.Exit.Reason == vmm.ExitTripleFault
	if why, ok := kvmhost.BootEmulatorFault(console, tripleFault); ok {
		t.Logf("%s %s", kvmhost.EmulatorFaultMarker, why)
	}
}

// syncBuffer is a bytes.Buffer safe for the console's writer goroutine.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.b.Len() > 1<<20 {
		s.b.Next(s.b.Len() - 512<<10)
	}
	return s.b.Write(p)
}

func (s *syncBuffer) tail(n int) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	b := s.b.Bytes()
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(b)
}
