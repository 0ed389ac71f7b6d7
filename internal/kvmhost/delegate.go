package kvmhost

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"
)

// Option adjusts how Delegate runs the test in the outer VM.
type Option func(*delegateOptions)

type delegateOptions struct {
	flags   []string
	cfg     []func(*Config)
	timeout time.Duration
}

// WithTestFlags adds flags for the inner test binary, e.g.
// "-test.bench=.", "-test.benchmem", "-test.count=3".
func WithTestFlags(flags ...string) Option {
	return func(o *delegateOptions) { o.flags = append(o.flags, flags...) }
}

// WithMemory sets the outer VM's memory in MiB.
func WithMemory(mib int) Option {
	return WithConfig(func(c *Config) { c.MemoryMiB = mib })
}

// WithCPUs sets the outer VM's vCPU count.
func WithCPUs(n int) Option {
	return WithConfig(func(c *Config) { c.CPUs = n })
}

// WithTimeout bounds the outer VM run (QEMU start to exit). Without it
// only the test's deadline (go test -timeout, less 30 s) bounds the run,
// which also covers waiting for a free outer VM slot. The inner test binary
// gets a -test.timeout a minute shorter, so that it times out first, with
// its goroutine dump.
func WithTimeout(d time.Duration) Option {
	return func(o *delegateOptions) { o.timeout = d }
}

// WithModules loads extra kernel modules in the outer VM.
func WithModules(names ...string) Option {
	return WithConfig(func(c *Config) { c.Modules = append(c.Modules, names...) })
}

// WithNetwork gives the outer VM outbound network (Config.Network).
func WithNetwork() Option {
	return WithConfig(func(c *Config) { c.Network = true })
}

// WithConfig edits the Config Delegate passes to Run (after Delegate filled
// in Program, Args, Stdout and Stderr).
func WithConfig(f func(*Config)) Option {
	return func(o *delegateOptions) { o.cfg = append(o.cfg, f) }
}

// crashRetries is how many times Delegate runs a test again after the
// outer VM crashed, or after the test failed and said the fault was the
// emulator's (EmulatorFaultMarker); never after any other failure.
const crashRetries = 2

// EmulatorFaultMarker starts a line an inner test logs when it fails
// because of a fault only the emulated host produces: QEMU's emulated SVM
// has made guests triple-fault under heavy load, which no guest or VMM
// code can cause on hardware. Inside the emulated host a test that sees
// such a fault logs this marker; Delegate then runs the test again (at
// most crashRetries times). Under hardware KVM nothing logs it.
const EmulatorFaultMarker = "kvmhost: emulator fault:"

// GuestEmulatorFault reports whether a guest console log shows a fault
// that, inside the emulated host, comes from the emulator and not from
// the code under test, and what it was: a kernel Oops on an int3 (a CPU
// executing a breakpoint byte after live code patching completed, which
// the patching protocol rules out on hardware; QEMU's emulated nested
// paging has shown stale code under it), or a double fault at the first
// instruction of the 64-bit syscall entry (an event delivered there, with
// the user stack still loaded, which SYSCALL's flag mask rules out on
// hardware; QEMU's nested SVM has delivered one under heavy interrupt
// load). Tests call it only in mode Inside and log EmulatorFaultMarker
// with the reason.
func GuestEmulatorFault(console string) (string, bool) {
	if strings.Contains(console, "Oops: int3") {
		return "the guest kernel hit a stale int3 (live code patching seen incoherently by another vCPU)", true
	}
	if strings.Contains(console, "PANIC: double fault") && strings.Contains(console, "RIP: 0010:entry_SYSCALL_64+0x0/") {
		return "the guest kernel double-faulted at the first instruction of its syscall entry (an event delivered on the user stack)", true
	}
	return "", false
}

// BootEmulatorFault reports whether a guest boot that failed inside the
// emulated host failed on the emulator, and why: a console showing a fault
// GuestEmulatorFault knows, or a triple fault (tripleFault, which the
// caller reads from the VMM's exit) that only QEMU's emulated SVM causes
// while a stock kernel boots. Tests log EmulatorFaultMarker with the reason.
func BootEmulatorFault(console string, tripleFault bool) (string, bool) {
	if why, ok := GuestEmulatorFault(console); ok {
		return why, true
	}
	if tripleFault {
		return "the guest triple-faulted inside the emulated KVM host while booting", true
	}
	return "", false
}

// Delegate makes a test that needs real KVM run where real KVM is.
//
// With hardware KVM, or inside the outer VM already, it logs the mode and
// returns false: the caller goes on and runs its body here. Otherwise it
// runs this test binary (os.Executable) inside the outer VM with
// -test.run matching exactly this test (-test.bench for a benchmark),
// -test.v, and -test.short when this run is short; streams the inner output
// through t.Log; fails t if the inner run failed, reported no PASS line for
// this test, or could not be had; and returns true: the caller returns at
// once.
//
//	func TestBootLinux(t *testing.T) {
//		if kvmhost.Delegate(t) {
//			return
//		}
//		// ... needs real KVM ...
//	}
//
// If neither hardware KVM nor the outer VM can be had, Delegate calls
// t.Fatal under CI=true (a Linux-booting test never silently skips in CI)
// and t.Skip otherwise; it also skips, outside CI, when testing.Short() is
// set, since an outer VM costs seconds to boot.
//
// Each call boots one outer VM: put the cases in one parent test and call
// Delegate once at its top, with subtests below it.
func Delegate(t testing.TB, opts ...Option) bool {
	t.Helper()
	var o delegateOptions
	for _, f := range opts {
		f(&o)
	}
	mode, derr := Detect()
	if mode == Inside {
		if err := HoldStaticKeys(); err != nil {
			t.Logf("kvmhost: %v", err)
		}
	}
	if mode.Direct() {
		t.Logf("kvmhost: mode=%s: running %s here", mode, t.Name())
		return false
	}
	ci := os.Getenv("CI") == "true"
	unavailable := func(reason string) bool {
		t.Helper()
		if ci {
			t.Fatalf("kvmhost: mode=%s: %s needs real KVM and CI=true forbids skipping: %s", mode, t.Name(), reason)
		} else {
			t.Skipf("kvmhost: mode=%s: skipping %s, which needs real KVM: %s", mode, t.Name(), reason)
		}
		return true
	}
	if mode == Unavailable {
		return unavailable(derr.Error())
	}
	if testing.Short() && !ci {
		return unavailable("-short is set and booting the emulated KVM host takes seconds")
	}
	if b, ok := t.(*testing.B); ok && b.N > 1 {
		// testing calls a benchmark first with b.N=1 and then, for
		// -benchtime=Nx, with b.N=N: the first call's outer VM run
		// already did the N iterations inside (the flag is passed on).
		// Each -count round starts again at b.N=1.
		t.Logf("kvmhost: %s ran in the outer VM at b.N=1 already", t.Name())
		return true
	}
	exe, err := os.Executable()
	if err != nil {
		return unavailable(fmt.Sprintf("cannot find the test binary: %v", err))
	}

	args := innerTestArgs(t, o.flags)
	lw := &lineLogger{t: t, prefix: "inner: "}
	logw := &lineLogger{t: t, prefix: ""}
	cfg := Config{
		Program: exe,
		Args:    args,
		Logger:  slog.New(slog.NewTextHandler(logw, &slog.HandlerOptions{Level: slog.LevelInfo})),
	}
	// The test's deadline bounds everything (waiting for a slot included);
	// WithTimeout bounds the outer VM run itself.
	ctx := context.Background()
	innerTimeout := time.Duration(0)
	if tt, ok := t.(interface{ Deadline() (time.Time, bool) }); ok {
		if dl, ok := tt.Deadline(); ok {
			var cancel context.CancelFunc
			ctx, cancel = context.WithDeadline(ctx, dl.Add(-30*time.Second))
			defer cancel()
			innerTimeout = time.Until(dl) - 90*time.Second
		}
	}
	if o.timeout > 0 {
		cfg.Timeout = o.timeout
		if innerTimeout == 0 || o.timeout-time.Minute < innerTimeout {
			innerTimeout = o.timeout - time.Minute
		}
	}
	if !isBenchmark(t) {
		// A test under -test.v writes as it goes, and its own timeouts
		// are shorter than this; silence this long means the outer VM is
		// wedged, which is run again like a crash. (A benchmark's logs
		// appear only when it ends, so benchmarks are not watched.)
		cfg.StallTimeout = testStallTimeout
	}
	for _, f := range o.cfg {
		f(&cfg)
	}
	if innerTimeout >= time.Minute && !slicesHasPrefix(cfg.Args, "-test.timeout") {
		// Let the inner test binary time out first, with its goroutine
		// dump, before the outer VM is killed.
		cfg.Args = append(cfg.Args, "-test.timeout="+innerTimeout.Round(time.Second).String())
	}
	t.Logf("kvmhost: mode=%s: running %s in the outer VM: %s %s", mode, t.Name(), exe, strings.Join(cfg.Args, " "))
	var res Result
	for attempt := 1; ; attempt++ {
		lw = &lineLogger{t: t, prefix: "inner: "}
		cfg.Stdout, cfg.Stderr = lw, lw
		res, err = RunResult(ctx, cfg)
		lw.flush()
		logw.flush()
		// The outer kernel itself crashing (a kernel panic in KVM
		// under QEMU's emulated SVM, seen under heavy guest load) is
		// the emulator failing, not the test: run the test again, at
		// most twice, and say so. A failing test reports an exit
		// status and is never retried.
		emulatorFault := err == nil && res.ExitCode != 0 && strings.Contains(lw.text(), EmulatorFaultMarker)
		if !(errors.Is(err, ErrCrashed) || emulatorFault) || attempt == crashRetries+1 || ctx.Err() != nil {
			break
		}
		if emulatorFault {
			t.Logf("kvmhost: mode=%s: %s failed on a fault it attributes to the emulator (attempt %d of %d); running it again", mode, t.Name(), attempt, crashRetries+1)
			continue
		}
		t.Logf("kvmhost: mode=%s: the outer VM crashed during %s (attempt %d of %d); running it again: %v", mode, t.Name(), attempt, crashRetries+1, err)
	}
	if err != nil {
		if errors.Is(err, ErrUnavailable) {
			return unavailable(err.Error())
		}
		t.Fatalf("kvmhost: mode=%s: outer VM run of %s failed: %v", mode, t.Name(), err)
		return true
	}
	t.Logf("kvmhost: mode=%s, outer VM boot took %v (outer kernel uptime %v), whole run %v, inner exit code %d",
		mode, res.Boot.Round(time.Millisecond), res.GuestUptime.Round(10*time.Millisecond), res.Total.Round(time.Millisecond), res.ExitCode)
	v := judgeInner(t.Name(), lw.text(), res.ExitCode, isBenchmark(t))
	switch {
	case v.skipped && !ci:
		t.Skipf("kvmhost: the inner run skipped %s: %s", t.Name(), v.reason)
	case v.failed:
		t.Errorf("kvmhost: inner run of %s failed: %s", t.Name(), v.reason)
	}
	return true
}

// testStallTimeout is Config.StallTimeout for delegated tests: longer than
// any single step of the project's tests under emulation (a guest boot is
// bounded by 15 minutes).
const testStallTimeout = 20 * time.Minute

func isBenchmark(t testing.TB) bool {
	_, ok := t.(*testing.B)
	return ok
}

// innerTestArgs are the test binary flags selecting exactly t, and those
// of its subtests the outer -test.run (or -test.bench) selects; -test.skip
// and -test.benchtime are passed on as they are.
func innerTestArgs(t testing.TB, extra []string) []string {
	var args []string
	if isBenchmark(t) {
		args = []string{"-test.run=^$", "-test.bench=" + innerPattern(t.Name(), flagValue("test.bench")), "-test.benchmem"}
		if bt := flagValue("test.benchtime"); bt != "" {
			args = append(args, "-test.benchtime="+bt)
		}
	} else {
		args = []string{"-test.run=" + innerPattern(t.Name(), flagValue("test.run"))}
	}
	if skip := flagValue("test.skip"); skip != "" {
		args = append(args, "-test.skip="+skip)
	}
	args = append(args, "-test.v", "-test.count=1")
	if testing.Short() {
		args = append(args, "-test.short")
	}
	return append(args, extra...)
}

// flagValue returns the value of a registered flag, or "".
func flagValue(name string) string {
	if f := flag.Lookup(name); f != nil {
		return f.Value.String()
	}
	return ""
}

// innerPattern selects test name exactly, followed by the elements of the
// outer pattern below name's depth (go test -run 'TestX/case=2' delegating
// from TestX runs only that case inside).
func innerPattern(name, outer string) string {
	pat := runPattern(name)
	depth := strings.Count(name, "/") + 1
	if parts := splitPattern(outer); len(parts) > depth {
		pat += "/" + strings.Join(parts[depth:], "/")
	}
	return pat
}

// splitPattern splits a -test.run pattern at the slashes that separate
// levels, as the testing package does: not inside brackets or parentheses,
// and not escaped.
func splitPattern(p string) []string {
	if p == "" {
		return nil
	}
	var parts []string
	depth, start := 0, 0
	for i := 0; i < len(p); i++ {
		switch p[i] {
		case '\\':
			i++
		case '[', '(':
			depth++
		case ']', ')':
			if depth > 0 {
				depth--
			}
		case '/':
			if depth == 0 {
				parts = append(parts, p[start:i])
				start = i + 1
			}
		}
	}
	return append(parts, p[start:])
}

// runPattern anchors each element of a (sub)test name.
func runPattern(name string) string {
	parts := strings.Split(name, "/")
	for i, p := range parts {
		parts[i] = "^" + regexp.QuoteMeta(p) + "$"
	}
	return strings.Join(parts, "/")
}

// verdict is what the inner test output says.
type verdict struct {
	failed, skipped bool
	reason          string
}

// judgeInner decides from the inner test binary's output and exit code
// whether test name passed. A pass needs exit code 0 and a "--- PASS: name"
// line (for a benchmark, a result line for it and a final PASS).
func judgeInner(name, out string, exitCode int, bench bool) verdict {
	lines := strings.Split(out, "\n")
	has := func(prefix string) bool {
		for _, l := range lines {
			if strings.HasPrefix(strings.TrimSpace(l), prefix) {
				return true
			}
		}
		return false
	}
	if exitCode != 0 {
		return verdict{failed: true, reason: fmt.Sprintf("test binary exited with code %d", exitCode)}
	}
	if !bench {
		if has("--- SKIP: " + name + " ") {
			return verdict{skipped: true, failed: os.Getenv("CI") == "true", reason: "the inner test skipped itself (see inner: lines)"}
		}
		if !has("--- PASS: " + name + " ") {
			return verdict{failed: true, reason: "no \"--- PASS: " + name + "\" line in the inner output (did the test run at all?)"}
		}
		return verdict{}
	}
	subResult := false // a benchmark with sub-benchmarks reports only theirs
	for _, l := range lines {
		l = strings.TrimSpace(l)
		if strings.HasPrefix(l, name+"/") && strings.Contains(l, "ns/op") {
			subResult = true
		}
	}
	if !has(name+"-") && !has(name+" ") && !has(name+"\t") && !subResult {
		return verdict{failed: true, reason: "no result line for " + name + " in the inner output"}
	}
	if !has("PASS") {
		return verdict{failed: true, reason: "no PASS in the inner output"}
	}
	return verdict{}
}

// lineLogger sends whole lines to t.Log (which go test -v shows as they
// come) and keeps all text for judging the inner run.
type lineLogger struct {
	t      testing.TB
	prefix string
	mu     sync.Mutex
	part   []byte
	all    bytes.Buffer
}

func (l *lineLogger) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.all.Write(p)
	l.part = append(l.part, p...)
	for {
		i := bytes.IndexByte(l.part, '\n')
		if i < 0 {
			break
		}
		l.t.Log(l.prefix + string(l.part[:i]))
		l.part = l.part[i+1:]
	}
	return len(p), nil
}

func (l *lineLogger) flush() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.part) > 0 {
		l.t.Log(l.prefix + string(l.part))
		l.part = nil
	}
}

func (l *lineLogger) text() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.all.String()
}

func slicesHasPrefix(args []string, prefix string) bool {
	for _, a := range args {
		if strings.HasPrefix(a, prefix) {
			return true
		}
	}
	return false
}
