package sandbox

import (
	"errors"
	"testing"

	"github.com/gosandbox/sandbox/guest"
	"github.com/gosandbox/sandbox/vmm"
)

// The guest init and the VMM agree on the boot-marker port and values
// (they are separate constants so the guest binary does not link the VMM).
func TestBootMarkersAgree(t *testing.T) {
	if guest.BootMarkerPort != vmm.BootPort ||
		guest.BootMarkerInitStarted != vmm.PhaseInitStarted ||
		guest.BootMarkerAgentReady != vmm.PhaseAgentReady ||
		guest.BootMarkerPoweroff != vmm.PhasePoweroff {
		t.Fatal("guest and vmm disagree on the boot markers")
	}
}

func TestOptionsAreValidated(t *testing.T) {
	long := make([]byte, MaxNameBytes+1)
	for i := range long {
		long[i] = 'a'
	}
	for _, o := range []Option{
		Memory(1 << 20), Memory(64<<20 + 1), CPUs(0), CPUs(33), Name(string(long)), Name("\xff"),
		Env("NOEQUALS"), Env("=x"), WorkDir("relative"), Logger(nil), Kernel(""), KernelArgs("a\nb"),
		Image(""), FromImage(nil), ImageStore(nil), LazyImage(""), DiskSize(1 << 20), TmpfsSize(4096),
		NetworkRules("bogus@rule"), PublishPort("not-an-addr", 80), PublishPort("127.0.0.1:0", 0),
	} {
		cfg := defaultConfig()
		err := o(&cfg)
		var oe *OptionError
		if !errors.Is(err, ErrInvalidOption) || !errors.As(err, &oe) {
			t.Errorf("option accepted or untyped error: %v", err)
		}
	}
	cfg := defaultConfig()
	for _, o := range []Option{Memory(128 << 20), CPUs(4), Name("ok name ✓"), Env("A=b"), WorkDir("/tmp"),
		Image("python:3.12-slim"), DiskSize(64 << 20), TmpfsSize(64 << 20), NetworkRules("allow@host:tcp:8080"),
		PublishPort("127.0.0.1:0", 8080)} {
		if err := o(&cfg); err != nil {
			t.Errorf("valid option rejected: %v", err)
		}
	}
}

func TestConflictingOptions(t *testing.T) {
	for name, opts := range map[string][]Option{
		"two images":           {Image("a"), Image("b")},
		"image and lazy image": {Image("a"), LazyImage("b")},
		"rules, then none":     {NetworkRules("allow@public"), NoNetwork()},
		"none, then a port":    {NoNetwork(), PublishPort("127.0.0.1:0", 80)},
	} {
		cfg := defaultConfig()
		var err error
		for _, o := range opts {
			if err = o(&cfg); err != nil {
				break
			}
		}
		if !errors.Is(err, ErrInvalidOption) {
			t.Errorf("%s: %v, want ErrInvalidOption", name, err)
		}
	}
}
