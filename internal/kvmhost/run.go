package kvmhost

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Result describes a finished run.
type Result struct {
	// ExitCode is the program's exit status as the shell saw it: 0-255,
	// 128+N when signal N killed it.
	ExitCode int
	// Boot is the wall time from starting QEMU until the program started
	// (as seen by polling the work dir, so up to pollInterval late).
	Boot time.Duration
	// GuestUptime is the outer kernel's uptime when the program started.
	GuestUptime time.Duration
	// Total is the wall time of the whole run, QEMU start to exit.
	Total time.Duration
	// Kernel names the outer kernel (Debian package and version).
	Kernel string
}

const (
	pollInterval = 50 * time.Millisecond
	consoleKeep  = 16 << 10 // bytes of console kept for errors
)

// Run runs cfg.Program inside the outer VM and returns its exit code. The
// program's stdout and stderr stream to cfg.Stdout and cfg.Stderr; the outer
// VM's console is kept apart (cfg.Console). A nil error means the program
// ran and its exit status came back through the work dir; errors match
// ErrInvalidConfig, ErrUnavailable, ErrTimeout, ErrCrashed or ErrSetup.
func Run(ctx context.Context, cfg Config) (exitCode int, err error) {
	res, err := RunResult(ctx, cfg)
	return res.ExitCode, err
}

// RunResult is Run that also reports timings.
func RunResult(ctx context.Context, cfg Config) (Result, error) {
	c, err := cfg.withDefaults()
	if err != nil {
		return Result{}, err
	}
	log := c.Logger
	if err := os.MkdirAll(c.AssetDir, 0o755); err != nil {
		return Result{}, &UnavailableError{Reason: "creating the asset cache " + c.AssetDir, Err: err}
	}
	prepStart := time.Now()
	tl, err := ensureTools(ctx, log, c.AssetDir)
	if err != nil {
		return Result{}, err
	}
	k, err := ensureKernel(ctx, log, c.AssetDir, c.KernelPackage)
	if err != nil {
		return Result{}, err
	}
	modules := c.Modules
	if c.Network {
		modules = append(slices.Clone(modules), "virtio_net")
	}
	initrd, err := ensureInitramfs(ctx, log, c.AssetDir, k, tl.busybox, modules)
	if err != nil {
		return Result{}, err
	}
	log.Debug("kvmhost: assets ready", "qemu", tl.qemu, "kernel", k.key, "initramfs", initrd, "took", time.Since(prepStart))

	work, err := os.MkdirTemp("", "kvmhost-run-*")
	if err != nil {
		return Result{}, fmt.Errorf("kvmhost: creating the work dir: %w", err)
	}
	defer os.RemoveAll(work)
	if work, err = filepath.EvalSymlinks(work); err != nil {
		return Result{}, err
	}
	if err := os.Chmod(work, 0o755); err != nil {
		return Result{}, err
	}

	shareTags := map[string]string{}
	rw := append([]string{c.CacheDir}, c.Shares...)
	for _, s := range rw {
		if _, dup := shareTags[s]; !dup {
			shareTags[s] = fmt.Sprintf("share%d", len(shareTags))
		}
	}
	p := newPlan(&c, work, tl.busybox, shareTags)
	if err := os.WriteFile(filepath.Join(work, fileSetup), []byte(p.setupScript()), 0o644); err != nil {
		return Result{}, err
	}
	if err := os.WriteFile(filepath.Join(work, fileRun), []byte(p.runScript()), 0o644); err != nil {
		return Result{}, err
	}

	image := bootImage(ctx, log, k)
	args := qemuArgs(&c, image, initrd, work, shareTags)
	waitStart := time.Now()
	slot, err := acquireSlot(ctx, filepath.Join(c.AssetDir, "slots"), c.Slots, func() {
		log.Info("kvmhost: waiting for a free outer VM slot", "slots", c.Slots, "env", EnvSlots)
	})
	if err != nil {
		return Result{}, &VMError{Kind: ErrTimeout, Detail: err.Error()}
	}
	defer slot.unlock()
	if w := time.Since(waitStart); w > time.Second {
		log.Info("kvmhost: got an outer VM slot", "waited", w.Round(time.Millisecond))
	}
	res, err := runQEMU(ctx, &c, tl.qemu, args, work)
	res.Kernel = k.key
	if err == nil {
		log.Info("kvmhost: outer VM run done", "program", c.Program, "exit", res.ExitCode,
			"boot", res.Boot.Round(time.Millisecond), "guest_uptime_at_start", res.GuestUptime,
			"total", res.Total.Round(time.Millisecond), "kernel", k.key)
	}
	return res, err
}

// qemuEscape escapes a value for QEMU's comma-separated option syntax.
func qemuEscape(s string) string { return strings.ReplaceAll(s, ",", ",,") }

// outerCmdline is the outer kernel's command line. A soft lockup (a CPU
// that has not scheduled for 20 s) panics the outer kernel, which with
// panic=-1 and -no-reboot ends QEMU, so a run that wedged in QEMU's
// emulated SVM (seen as a vCPU thread stuck in the outer kernel for
// good) ends within seconds as ErrCrashed instead of lasting until its
// timeout. loglevel=5 puts warnings and the lockup's register and stack
// dumps (every CPU's, for the cause) in the console tail that errors carry.
const outerCmdline = "console=ttyS0 loglevel=5 panic=-1 softlockup_panic=1 softlockup_all_cpu_backtrace=1 mitigations=off"

// qemuArgs is the outer VM's command line: q35 under multi-threaded TCG
// with every CPU feature (SVM included), no default devices, the console
// on stdio, an entropy device, and the 9p shares.
func qemuArgs(c *Config, kernelImage, initrd, work string, shareTags map[string]string) []string {
	args := []string{
		"-M", "q35",
		"-accel", "tcg,thread=multi",
		"-cpu", "max",
		"-smp", fmt.Sprint(c.CPUs),
		"-m", fmt.Sprint(c.MemoryMiB),
		"-nodefaults", "-no-user-config",
		"-vga", "none", "-display", "none",
		"-no-reboot",
		"-chardev", "stdio,id=con,signal=off",
		"-serial", "chardev:con",
		"-kernel", kernelImage,
		"-initrd", initrd,
		"-append", outerCmdline,
		"-device", "virtio-rng-pci",
		"-virtfs", "local,path=/,mount_tag=" + tagHostRoot + ",security_model=none,readonly=on,multidevs=remap",
		"-virtfs", "local,path=" + qemuEscape(work) + ",mount_tag=" + tagWork + ",security_model=none,multidevs=remap",
	}
	for _, s := range sortedKeys(shareTags) {
		args = append(args, "-virtfs", "local,path="+qemuEscape(s)+",mount_tag="+shareTags[s]+",security_model=none,multidevs=remap")
	}
	if c.Network {
		args = append(args, "-netdev", "user,id=net0", "-device", "virtio-net-pci,netdev=net0")
	}
	return args
}

// runQEMU starts QEMU, streams the program's output from the work dir,
// waits for QEMU to end (or kills it on timeout) and reads the status.
func runQEMU(ctx context.Context, c *Config, qemu string, args []string, work string) (Result, error) {
	var res Result
	if c.Timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, c.Timeout)
		defer cancel()
	}
	con := &consoleBuf{extra: c.Console}
	cmd := exec.Command(qemu, args...)
	cmd.Stdin = nil
	cmd.Stdout = con
	cmd.Stderr = con
	// If this process dies, QEMU dies with it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	cmd.WaitDelay = 5 * time.Second
	start := time.Now()
	if err := cmd.Start(); err != nil {
		return res, &UnavailableError{Reason: "starting " + qemu, Err: err}
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	kill := func() error { // ends QEMU and returns how Wait saw it end
		cmd.Process.Kill()
		return <-done
	}

	out := &tail{path: filepath.Join(work, fileStdout), w: c.Stdout}
	errOut := &tail{path: filepath.Join(work, fileStderr), w: c.Stderr}
	started := false
	progress := start // the last time the program wrote output
	poll := func() {
		if out.poll()+errOut.poll() > 0 {
			progress = time.Now()
		}
		if !started {
			if b, err := os.ReadFile(filepath.Join(work, fileStarted)); err == nil {
				started = true
				res.Boot = time.Since(start)
				res.GuestUptime, _ = parseUptime(b)
			}
		}
	}
	tick := time.NewTicker(pollInterval)
	defer tick.Stop()
	var waitErr error
	stalled := false
	for loop := true; loop; {
		select {
		case waitErr = <-done:
			loop = false
		case <-ctx.Done():
			werr := kill()
			res.Total = time.Since(start)
			poll()
			stage := "before the program started"
			if started {
				stage = fmt.Sprintf("after the program started (boot took %v)", res.Boot.Round(time.Millisecond))
			}
			return res, &VMError{Kind: ErrTimeout, Detail: fmt.Sprintf("%v after %v, %s", context.Cause(ctx), res.Total.Round(time.Millisecond), stage),
				QEMUExit: exitString(werr), ConsoleTail: con.tail()}
		case <-tick.C:
			poll()
			if c.StallTimeout > 0 && time.Since(progress) > c.StallTimeout {
				waitErr = kill()
				stalled = true
				loop = false
			}
		}
	}
	res.Total = time.Since(start)
	poll()
	data, err := os.ReadFile(filepath.Join(work, fileStatus))
	if err != nil {
		detail := "QEMU exited before the program's exit status was written"
		switch {
		case stalled:
			detail = fmt.Sprintf("no output from the program for %v: the outer VM stopped making progress (an emulator hang?) and was killed", c.StallTimeout)
		case started:
			detail = "QEMU exited while the program was running (outer kernel panic or crash?)"
		}
		return res, &VMError{Kind: ErrCrashed, Detail: detail, QEMUExit: exitString(waitErr), ConsoleTail: con.tail()}
	}
	st, err := parseStatus(data)
	if err != nil {
		return res, &VMError{Kind: ErrCrashed, Detail: err.Error(), QEMUExit: exitString(waitErr), ConsoleTail: con.tail()}
	}
	if st.setupErr != "" {
		return res, &VMError{Kind: ErrSetup, Detail: st.setupErr, QEMUExit: exitString(waitErr), ConsoleTail: con.tail()}
	}
	res.ExitCode = st.exitCode
	return res, nil
}

func exitString(err error) string {
	if err == nil {
		return "exit status 0"
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ProcessState.String()
	}
	return err.Error()
}

// tail copies what is appended to a file to a writer.
type tail struct {
	path string
	off  int64
	w    io.Writer
	buf  [32 << 10]byte
}

// poll copies what was appended since the last call and returns how many
// bytes that was.
func (t *tail) poll() int64 {
	f, err := os.Open(t.path)
	if err != nil {
		return 0
	}
	defer f.Close()
	var total int64
	for {
		n, err := f.ReadAt(t.buf[:], t.off)
		if n > 0 {
			t.w.Write(t.buf[:n])
			t.off += int64(n)
			total += int64(n)
		}
		if err != nil || n == 0 {
			return total
		}
	}
}

// consoleBuf keeps the last consoleKeep bytes of the outer console and
// forwards everything to extra.
type consoleBuf struct {
	mu    sync.Mutex
	buf   []byte
	extra io.Writer
}

func (c *consoleBuf) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.buf = append(c.buf, p...)
	if len(c.buf) > 2*consoleKeep {
		c.buf = append(c.buf[:0], c.buf[len(c.buf)-consoleKeep:]...)
	}
	if c.extra != nil {
		c.extra.Write(p)
	}
	return len(p), nil
}

var ansiEscape = regexp.MustCompile("\x1b(\\[[0-9;?]*[A-Za-z]|c)")

// tail returns the kept console text without terminal escapes.
func (c *consoleBuf) tail() string {
	c.mu.Lock()
	b := c.buf
	if len(b) > consoleKeep {
		b = b[len(b)-consoleKeep:]
	}
	s := string(b)
	c.mu.Unlock()
	s = ansiEscape.ReplaceAllString(s, "")
	return strings.ReplaceAll(s, "\r", "")
}
