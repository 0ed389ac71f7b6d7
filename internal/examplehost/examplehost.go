// Package examplehost lets the programs in examples/ run on a host whose
// KVM cannot boot Linux (no hardware virtualization, or a PVM host like the
// project's build machines): they run themselves again inside the emulated
// KVM host (internal/kvmhost), which is slow but real.
package examplehost

import (
	"context"
	"errors"
	"fmt"
	"os"

	"github.com/gosandbox/sandbox"
	"github.com/gosandbox/sandbox/internal/kvmhost"
)

// Rerun handles an error from sandbox.New: when it says this host's KVM
// cannot boot Linux and the program is not already inside the emulated
// host, it says so on stdout, runs the program again there with the same
// arguments and exits with its exit code. Otherwise it returns err.
func Rerun(ctx context.Context, err error) error {
	if !errors.Is(err, sandbox.ErrKVMUnusable) || os.Getenv(kvmhost.EnvInside) != "" {
		return err
	}
	fmt.Printf("This host's KVM cannot boot Linux:\n  %v\n", err)
	fmt.Println("Running inside the emulated KVM host instead (QEMU software emulation with real KVM inside; slow).")
	self, xerr := os.Executable()
	if xerr != nil {
		return xerr
	}
	code, rerr := kvmhost.Run(ctx, kvmhost.Config{Program: self, Args: os.Args[1:], Stdout: os.Stdout, Stderr: os.Stderr})
	if rerr != nil {
		return rerr
	}
	os.Exit(code)
	return nil
}

// bootRetries is how many more boots New tries inside the emulated host
// after a guest that crashed while booting.
const bootRetries = 2

// New is sandbox.New for the examples. On a host whose KVM cannot boot
// Linux it reruns the program inside the emulated KVM host (Rerun). Inside
// the emulated host, a guest that crashes while booting is booted again, at
// most twice and saying so on stdout: QEMU's software emulation of nested
// SVM sometimes faults guests (a triple fault, or a kernel panic on an
// exception no hardware raises there; see kvmhost.EmulatorFaultMarker),
// which is not what the example is about. Elsewhere a crash is returned
// like any other error.
func New(ctx context.Context, opts ...sandbox.Option) (*sandbox.Sandbox, error) {
	inside := os.Getenv(kvmhost.EnvInside) != ""
	for attempt := 0; ; attempt++ {
		sb, err := sandbox.New(ctx, opts...)
		if err == nil {
			return sb, nil
		}
		if !inside {
			return nil, Rerun(ctx, err)
		}
		if attempt == bootRetries || !errors.Is(err, sandbox.ErrGuestExited) || ctx.Err() != nil {
			return nil, err
		}
		fmt.Printf("The guest crashed while booting inside the emulated KVM host (%v); booting it again.\n", err)
	}
}
