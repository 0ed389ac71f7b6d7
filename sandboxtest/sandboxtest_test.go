package sandboxtest_test

import (
	"context"
	"testing"
	"time"

	"github.com/gosandbox/sandbox"
	"github.com/gosandbox/sandbox/internal/kvmhost"
	"github.com/gosandbox/sandbox/sandboxtest"
)

func TestNewRunsAndCleansUp(t *testing.T) {
	if kvmhost.Delegate(t, kvmhost.WithTimeout(20*time.Minute)) {
		return
	}
	var sb *sandbox.Sandbox
	t.Run("inner", func(t *testing.T) {
		sb = sandboxtest.New(t)
		res, err := sb.Run(context.Background(), "echo", "ok")
		if err != nil || string(res.Stdout) != "ok\n" {
			t.Fatalf("%+v, %v", res, err)
		}
	})
	if sb == nil {
		return // the subtest failed to boot it and said why
	}
	// The subtest's cleanup closed it.
	if _, err := sb.Run(context.Background(), "true"); err == nil {
		t.Fatal("the sandbox still runs commands after its test ended")
	}
}
