package kvmhost

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"strings"
)

// Mode says where code that needs a real KVM (one that boots stock Linux)
// will run.
type Mode int

// Modes, as Detect reports them.
const (
	// Unavailable: neither hardware KVM nor the emulated host can be used;
	// Detect's error says why.
	Unavailable Mode = iota
	// HardwareKVM: the CPU has vmx or svm, /dev/kvm opens and is not PVM.
	// KVM-needing code runs right here.
	HardwareKVM
	// Inside: this process already runs inside the outer VM
	// (GOSANDBOX_IN_KVMHOST=1) and /dev/kvm opens. Code runs right here.
	Inside
	// NeedsEmulation: no usable hardware KVM (a PVM host, or no vmx/svm);
	// KVM-needing code must go through Run or Delegate.
	NeedsEmulation
)

// EnvInside is the environment variable Run sets to "1" for the program it
// starts inside the outer VM.
const EnvInside = "GOSANDBOX_IN_KVMHOST"

// String returns the mode's name as logs show it.
func (m Mode) String() string {
	switch m {
	case HardwareKVM:
		return "hardware-kvm"
	case Inside:
		return "inside-emulated-host"
	case NeedsEmulation:
		return "needs-emulation"
	case Unavailable:
		return "unavailable"
	}
	return fmt.Sprintf("Mode(%d)", int(m))
}

// Direct reports whether KVM-needing code runs in this process in mode m.
func (m Mode) Direct() bool { return m == HardwareKVM || m == Inside }

// probe is what Detect looks at; tests replace its parts.
type probe struct {
	goos, goarch string
	getenv       func(string) string
	cpuinfo      func() (io.ReadCloser, error)
	pvmLoaded    func() bool
	openKVM      func() error
}

func hostProbe() probe {
	return probe{
		goos:    runtime.GOOS,
		goarch:  runtime.GOARCH,
		getenv:  os.Getenv,
		cpuinfo: func() (io.ReadCloser, error) { return os.Open("/proc/cpuinfo") },
		pvmLoaded: func() bool {
			_, err := os.Stat("/sys/module/kvm_pvm")
			return err == nil
		},
		openKVM: func() error {
			f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
			if err != nil {
				return err
			}
			return f.Close()
		},
	}
}

// Detect says where KVM-needing code will run. For Unavailable the error
// (matching ErrUnavailable) gives the reason; for the other modes it is nil.
// Detect has no side effects: it installs nothing and starts nothing.
func Detect() (Mode, error) { return hostProbe().detect() }

func (p probe) detect() (Mode, error) {
	if p.goos != "linux" || p.goarch != "amd64" {
		return Unavailable, &UnavailableError{Reason: fmt.Sprintf("the emulated KVM host needs linux/amd64, this is %s/%s", p.goos, p.goarch)}
	}
	if p.getenv(EnvInside) == "1" {
		if err := p.openKVM(); err != nil {
			return Unavailable, &UnavailableError{Reason: "running inside the outer VM but /dev/kvm does not open (kvm-amd failed to load?)", Err: err}
		}
		return Inside, nil
	}
	virt, err := p.hasVirtFlags()
	if err != nil {
		// Without cpuinfo we cannot know; emulation works regardless.
		return NeedsEmulation, nil
	}
	if !virt || p.pvmLoaded() {
		return NeedsEmulation, nil
	}
	if err := p.openKVM(); err != nil {
		// The CPU could do it but this process cannot open /dev/kvm (module
		// not loaded, no permission); the emulated host still works.
		return NeedsEmulation, nil
	}
	return HardwareKVM, nil
}

// hasVirtFlags reports whether the first "flags" line of cpuinfo lists vmx
// or svm.
func (p probe) hasVirtFlags() (bool, error) {
	rc, err := p.cpuinfo()
	if err != nil {
		return false, err
	}
	defer rc.Close()
	return cpuinfoHasVirt(rc)
}

func cpuinfoHasVirt(r io.Reader) (bool, error) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		key, val, ok := strings.Cut(sc.Text(), ":")
		if !ok || strings.TrimSpace(key) != "flags" {
			continue
		}
		for _, f := range strings.Fields(val) {
			if f == "vmx" || f == "svm" {
				return true, nil
			}
		}
		return false, nil
	}
	if err := sc.Err(); err != nil {
		return false, err
	}
	return false, errors.New("no flags line in /proc/cpuinfo")
}
