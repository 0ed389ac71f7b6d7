// Package qemuguest boots the gosandbox guest (the same kernel, initramfs,
// init and agent a sandbox boots) under QEMU instead of the library's own
// VMM, so that benchmarks can compare the two side by side with everything
// but the VMM held equal.
//
// The machine is QEMU's `-M microvm`: no PCI, no firmware tables beyond
// ACPI, virtio devices on virtio-mmio. A virtio-serial device carries the
// console (port 0, hvc0) and a port named guest.PortName whose host end is
// a QEMU chardev socket (a Unix socket in a private temporary directory);
// agentclient.Dial over that socket speaks to the same agent as a sandbox.
// A virtio-rng device (fed from the host's /dev/urandom) matches the entropy
// device every sandbox has, so the guest probes the same drivers.
// With Config.UserNet the guest also gets a virtio-net device on QEMU's
// user-mode network (slirp: guest 10.0.2.15/24, gateway and host alias
// 10.0.2.2, DNS 10.0.2.3), which the init configures through
// agentclient.Options.Net exactly as in a sandbox.
//
// The guest kernel finds the virtio-mmio devices through the ACPI tables
// microvm generates (the default kernel has CONFIG_VIRTIO_MMIO and ACPI but
// not CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES; the virtio_mmio.device=
// parameters QEMU also appends are ignored by it), which TestStart checks.
//
// This is test support (internal): it drives the QEMU command line by hand
// because that command line is the whole interface; the Go QMP libraries
// (e.g. digitalocean/go-qemu) manage running VMs, not how they start. Every
// QEMU it starts is killed and reaped by Close (and gets SIGKILL if the
// calling thread dies), and its temporary directory is removed.
package qemuguest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/gosandbox/sandbox/guest"
	"github.com/gosandbox/sandbox/guest/agentclient"
	"github.com/gosandbox/sandbox/guest/agentproto"
	"github.com/gosandbox/sandbox/vmm"
)

// Errors, matched with errors.Is.
var (
	// ErrNoQEMU: qemu-system-x86_64 is not installed (Debian: apt-get
	// install qemu-system-x86) and Config.QEMU names no binary.
	ErrNoQEMU = errors.New("qemuguest: qemu-system-x86_64 not found (apt-get install qemu-system-x86, or set Config.QEMU)")
	// ErrInvalidConfig is matched by every *ConfigError.
	ErrInvalidConfig = errors.New("qemuguest: invalid config")
	// ErrExited: QEMU ended before the guest agent answered (see
	// *ExitError for its output).
	ErrExited = errors.New("qemuguest: QEMU exited")
	// ErrClosed: the guest was closed.
	ErrClosed = errors.New("qemuguest: closed")
)

// ConfigError reports a Config field Start cannot use.
type ConfigError struct {
	Field string
	Why   string
}

func (e *ConfigError) Error() string { return "qemuguest: Config." + e.Field + ": " + e.Why }

// Is makes errors.Is(err, ErrInvalidConfig) true.
func (e *ConfigError) Is(target error) bool { return target == ErrInvalidConfig }

// ExitError reports that QEMU ended (or could not start) before the agent
// answered, with the end of what QEMU and the guest console printed.
type ExitError struct {
	// Err is how the process ended (an *exec.ExitError, or a start error).
	Err error
	// Output is the tail of QEMU's stderr and of the guest's serial
	// console and hvc0.
	Output string
}

func (e *ExitError) Error() string {
	return fmt.Sprintf("qemuguest: QEMU exited before the guest agent answered: %v (check the command line it was given; output: %s)", e.Err, e.Output)
}

// Is makes errors.Is(err, ErrExited) true.
func (e *ExitError) Is(target error) bool { return target == ErrExited }

// Unwrap returns Err.
func (e *ExitError) Unwrap() error { return e.Err }

// Defaults for Config.
const (
	DefaultMemory = 512 << 20
	DefaultCPUs   = 1
)

// The user-mode network's fixed addresses (QEMU's slirp defaults).
const (
	UserNetMAC     = "52:54:00:12:34:56"
	UserNetIPv4    = "10.0.2.15/24"
	UserNetGateway = "10.0.2.2" // also the host's loopback
	UserNetDNS     = "10.0.2.3"
	// UserNetMTU is slirp's MTU; the guest interface gets it too.
	UserNetMTU = 1500
)

// Config says what Start boots and how.
type Config struct {
	// QEMU is the qemu-system-x86_64 binary; "" looks it up in PATH.
	QEMU string
	// Kernel is the guest kernel: a bzImage (as kernel.Kernel.Path), or an
	// ELF vmlinux with a PVH note. Required.
	Kernel string
	// Initramfs is the guest's initramfs file (guest.WriteInitramfs).
	// Required.
	Initramfs string
	// Cmdline is appended to the command line a sandbox guest gets
	// (vmm.BaseCmdline and guest.KernelCmdline(guest.PortName)).
	Cmdline string
	// Memory is the guest memory in bytes, a multiple of 1 MiB; 0 means
	// DefaultMemory.
	Memory int64
	// CPUs is the vCPU count; 0 means DefaultCPUs.
	CPUs int
	// UserNet gives the guest a virtio-net interface on QEMU's user-mode
	// network, configured by the init (see the UserNet constants).
	UserNet bool
	// Accel is "kvm" (the default) or "tcg" (software emulation: slow,
	// but it needs no /dev/kvm, for tests).
	Accel string
	// CPU is the -cpu model. "" means "host" with KVM, without a PMU (a
	// sandbox guest has none either) and, when this host is itself a
	// virtual machine, without XSAVE and AVX (nested KVM may keep the
	// guest's XSAVE layout inconsistent, as package vmm explains; it hides
	// XSAVE there too), and "max" with TCG.
	CPU string
	// Hostname and Env are passed to the agent (agentclient.Options).
	Hostname string
	Env      []string
	// Logger receives debug logs; nil discards them.
	Logger *slog.Logger
}

// Phases are a boot's timestamps.
type Phases struct {
	Started        time.Time // just before QEMU was started
	Init           time.Time // the guest init's first boot marker (zero if none was seen)
	AgentReady     time.Time // the agent's boot marker (zero if none was seen)
	AgentConnected time.Time // the agent handshake finished
}

// ToAgentConnected is the time from Start to a usable agent.
func (p Phases) ToAgentConnected() time.Duration { return since(p.Started, p.AgentConnected) }

// ToInit is the time from Start to the guest init's first marker.
func (p Phases) ToInit() time.Duration { return since(p.Started, p.Init) }

func since(a, b time.Time) time.Duration {
	if b.IsZero() {
		return 0
	}
	return b.Sub(a)
}

// Guest is a running QEMU guest with a connected agent.
type Guest struct {
	cfg   Config
	log   *slog.Logger
	dir   string
	cmd   *exec.Cmd
	exit  chan struct{} // closed when QEMU was reaped
	werr  error         // QEMU's wait result, set before exit closes
	agent *agentclient.Client
	net   *agentproto.NetConfig
	qout  *tailBuffer

	mu        sync.Mutex
	phases    Phases
	markers   net.Conn
	wg        sync.WaitGroup
	closeOnce sync.Once
}

// Start boots QEMU and returns once the guest agent answers. ctx bounds
// the start only; the guest runs until Close.
func Start(ctx context.Context, cfg Config) (_ *Guest, err error) {
	if err := cfg.fill(); err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "qemuguest-")
	if err != nil {
		return nil, fmt.Errorf("qemuguest: temporary directory: %w", err)
	}
	g := &Guest{cfg: cfg, log: cfg.Logger, dir: dir, exit: make(chan struct{}), qout: &tailBuffer{max: 8 << 10}}
	defer func() {
		if err != nil {
			g.Close()
		}
	}()
	if cfg.UserNet {
		g.net = &agentproto.NetConfig{
			MAC: UserNetMAC, MTU: UserNetMTU, IPv4: UserNetIPv4, GatewayIPv4: UserNetGateway,
			DNS: []string{UserNetDNS}, Hosts: map[string]string{"host.gosandbox.internal": UserNetGateway},
		}
	}
	agentSock := filepath.Join(dir, "agent.sock")
	markerSock := filepath.Join(dir, "markers.sock")
	g.cmd = exec.Command(cfg.QEMU, g.args(agentSock, markerSock)...)
	g.cmd.Stdout, g.cmd.Stderr = g.qout, g.qout
	g.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	g.log.Debug("starting QEMU", "args", g.cmd.Args)
	g.phases.Started = time.Now()
	if err := g.cmd.Start(); err != nil {
		close(g.exit)
		g.cmd = nil
		return nil, &ExitError{Err: err}
	}
	g.wg.Go(func() {
		g.werr = g.cmd.Wait()
		close(g.exit)
	})

	// QEMU creates both sockets before the guest runs; connect the boot
	// markers first so that none is missed.
	mk, err := g.dialSocket(ctx, markerSock)
	if err != nil {
		return nil, err
	}
	g.mu.Lock()
	g.markers = mk
	g.mu.Unlock()
	g.wg.Go(func() { g.readMarkers(mk) })
	conn, err := g.dialSocket(ctx, agentSock)
	if err != nil {
		return nil, err
	}
	g.agent, err = agentclient.DialUntil(ctx, conn, g.exit, agentclient.Options{
		Logger: cfg.Logger, Hostname: cfg.Hostname, Env: cfg.Env, Net: g.net,
	})
	if err != nil {
		select {
		case <-g.exit:
			return nil, g.exitError()
		case <-time.After(200 * time.Millisecond):
		}
		return nil, fmt.Errorf("qemuguest: connect to the guest agent: %w (console: %s)", err, g.consoleTail())
	}
	g.mu.Lock()
	g.phases.AgentConnected = time.Now()
	g.mu.Unlock()
	return g, nil
}

// fill validates cfg and sets its defaults.
func (cfg *Config) fill() error {
	if cfg.Kernel == "" {
		return &ConfigError{"Kernel", "empty (give the bzImage path, e.g. kernel.Default's Path)"}
	}
	if cfg.Initramfs == "" {
		return &ConfigError{"Initramfs", "empty (write one with guest.WriteInitramfs)"}
	}
	for _, f := range []struct{ field, path string }{{"Kernel", cfg.Kernel}, {"Initramfs", cfg.Initramfs}} {
		if st, err := os.Stat(f.path); err != nil || !st.Mode().IsRegular() {
			return &ConfigError{f.field, fmt.Sprintf("%q is not a readable regular file", f.path)}
		}
	}
	if cfg.Memory == 0 {
		cfg.Memory = DefaultMemory
	}
	if cfg.Memory < 64<<20 || cfg.Memory%(1<<20) != 0 {
		return &ConfigError{"Memory", fmt.Sprintf("%d bytes: want a multiple of 1 MiB, at least 64 MiB", cfg.Memory)}
	}
	if cfg.CPUs == 0 {
		cfg.CPUs = DefaultCPUs
	}
	if cfg.CPUs < 1 || cfg.CPUs > 64 {
		return &ConfigError{"CPUs", fmt.Sprintf("%d: want 1 to 64", cfg.CPUs)}
	}
	switch cfg.Accel {
	case "":
		cfg.Accel = "kvm"
	case "kvm", "tcg":
	default:
		return &ConfigError{"Accel", fmt.Sprintf("%q: want kvm or tcg", cfg.Accel)}
	}
	if strings.ContainsAny(cfg.Cmdline, "\n\x00") {
		return &ConfigError{"Cmdline", "contains a newline or NUL"}
	}
	if cfg.CPU == "" {
		cfg.CPU = defaultCPU(cfg.Accel)
	}
	if cfg.QEMU == "" {
		p, err := exec.LookPath("qemu-system-x86_64")
		if err != nil {
			return fmt.Errorf("%w: %v", ErrNoQEMU, err)
		}
		cfg.QEMU = p
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return nil
}

// defaultCPU picks the -cpu model (see Config.CPU).
func defaultCPU(accel string) string {
	if accel == "tcg" {
		return "max"
	}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(l, "flags") {
				if strings.Contains(" "+l+" ", " hypervisor ") {
					return "host,xsave=off,avx=off,avx2=off,pmu=off"
				}
				break
			}
		}
	}
	return "host,pmu=off"
}

// hostTSCkHz returns the host's TSC rate from /proc/cpuinfo, or 0. Under
// TCG the guest's TSC runs at the host's rate, and its calibration against
// the emulated PIT fails now and then on a busy host (seen here in 1 boot
// of 5: "tsc: Unable to calibrate against PIT", the TSC marked unstable,
// then no progress for minutes); tsc_early_khz gives the kernel the rate
// instead. KVM guests get it from kvmclock and need nothing.
func hostTSCkHz() int {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return 0
	}
	var mhz float64
	constant := false
	for _, l := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(l, ":")
		if !ok {
			continue
		}
		switch strings.TrimSpace(k) {
		case "cpu MHz":
			if mhz == 0 {
				mhz, _ = strconv.ParseFloat(strings.TrimSpace(v), 64)
			}
		case "flags":
			constant = constant || strings.Contains(" "+v+" ", " constant_tsc ")
		}
	}
	if !constant || mhz < 100 || mhz > 20000 {
		return 0
	}
	return int(mhz * 1000)
}

// args is QEMU's command line.
func (g *Guest) args(agentSock, markerSock string) []string {
	cfg := g.cfg
	cmdline := vmm.BaseCmdline + " " + guest.KernelCmdline(guest.PortName)
	if cfg.Accel == "tcg" {
		if khz := hostTSCkHz(); khz > 0 {
			cmdline += fmt.Sprintf(" tsc_early_khz=%d", khz)
		}
	}
	cmdline = strings.TrimSpace(cmdline + " " + cfg.Cmdline)
	a := []string{
		"-M", "microvm,x-option-roms=off,rtc=off",
		"-accel", cfg.Accel, "-cpu", cfg.CPU,
		"-m", fmt.Sprintf("%dM", cfg.Memory>>20), "-smp", fmt.Sprint(cfg.CPUs),
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		"-kernel", cfg.Kernel, "-initrd", cfg.Initramfs, "-append", cmdline,
		"-chardev", "file,id=ser,path=" + filepath.Join(g.dir, "serial.log"), "-serial", "chardev:ser",
		"-chardev", "socket,id=mk,path=" + markerSock + ",server=on,wait=off",
		"-device", fmt.Sprintf("isa-debugcon,iobase=%#x,chardev=mk", guest.BootMarkerPort),
		"-device", "virtio-serial-device,max_ports=2",
		"-chardev", "file,id=con,path=" + filepath.Join(g.dir, "console.log"), "-device", "virtconsole,chardev=con",
		"-chardev", "socket,id=agent,path=" + agentSock + ",server=on,wait=off",
		"-device", "virtserialport,chardev=agent,name=" + guest.PortName,
		"-object", "rng-random,id=rng0,filename=/dev/urandom", "-device", "virtio-rng-device,rng=rng0",
	}
	if cfg.UserNet {
		a = append(a, "-netdev", "user,id=n0",
			"-device", "virtio-net-device,netdev=n0,mac="+UserNetMAC)
	}
	return a
}

// dialSocket connects to one of QEMU's chardev sockets, waiting for QEMU
// to create it.
func (g *Guest) dialSocket(ctx context.Context, path string) (*net.UnixConn, error) {
	for {
		c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: path, Net: "unix"})
		if err == nil {
			return c, nil
		}
		select {
		case <-g.exit:
			return nil, g.exitError()
		case <-ctx.Done():
			return nil, fmt.Errorf("qemuguest: waiting for QEMU's socket %s: %w (QEMU output: %s)", filepath.Base(path), ctx.Err(), g.qout)
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// readMarkers timestamps the guest's boot markers.
func (g *Guest) readMarkers(c net.Conn) {
	var b [16]byte
	for {
		n, err := c.Read(b[:])
		now := time.Now()
		g.mu.Lock()
		for _, m := range b[:n] {
			switch {
			case m == guest.BootMarkerInitStarted && g.phases.Init.IsZero():
				g.phases.Init = now
			case m == guest.BootMarkerAgentReady && g.phases.AgentReady.IsZero():
				g.phases.AgentReady = now
			}
		}
		g.mu.Unlock()
		if err != nil {
			return
		}
	}
}

// exitError describes QEMU's end; call it after g.exit closed.
func (g *Guest) exitError() error {
	<-g.exit
	return &ExitError{Err: g.werr, Output: g.qout.String() + g.consoleTail()}
}

// consoleTail is the end of the serial console and hvc0.
func (g *Guest) consoleTail() string {
	var b strings.Builder
	for _, name := range []string{"serial.log", "console.log"} {
		data, _ := os.ReadFile(filepath.Join(g.dir, name))
		if len(data) > 2048 {
			data = data[len(data)-2048:]
		}
		if len(data) > 0 {
			fmt.Fprintf(&b, "[%s] %s", name, data)
		}
	}
	return b.String()
}

// Agent returns the client of the guest's agent.
func (g *Guest) Agent() *agentclient.Client { return g.agent }

// Net returns the network configuration the guest applied, or nil without
// UserNet.
func (g *Guest) Net() *agentproto.NetConfig { return g.net }

// Phases returns the boot's timestamps.
func (g *Guest) Phases() Phases {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.phases
}

// Console returns what the guest wrote on its serial console and hvc0
// (the last few KiB of each).
func (g *Guest) Console() string { return g.consoleTail() }

// Done is closed when QEMU has ended.
func (g *Guest) Done() <-chan struct{} { return g.exit }

// Close kills QEMU, waits for it, closes the agent connection and removes
// the temporary directory. It is safe to call more than once.
func (g *Guest) Close() error {
	g.closeOnce.Do(func() {
		if g.agent != nil {
			g.agent.Close()
		}
		if g.cmd != nil {
			g.cmd.Process.Kill()
		}
		<-g.exit
		g.mu.Lock()
		if g.markers != nil {
			g.markers.Close()
		}
		g.mu.Unlock()
		g.wg.Wait()
		os.RemoveAll(g.dir)
	})
	return nil
}

// tailBuffer keeps the last max bytes written to it.
type tailBuffer struct {
	mu  sync.Mutex
	max int
	buf bytes.Buffer
}

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.buf.Write(p)
	if over := t.buf.Len() - t.max; over > 0 {
		t.buf.Next(over)
	}
	return len(p), nil
}

func (t *tailBuffer) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.buf.String()
}

var _ io.Writer = (*tailBuffer)(nil)
