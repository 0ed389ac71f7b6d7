// Package sandbox runs untrusted code in KVM microVMs that live inside the
// calling process: no daemon, no cgo, one `go get`.
//
//	sb, err := sandbox.New(ctx, sandbox.Name("job-42"), sandbox.Memory(256<<20))
//	if err != nil {
//		return err // e.g. errors.Is(err, sandbox.ErrKVMUnusable) on a host without hardware KVM
//	}
//	defer sb.Close()
//	res, err := sb.Run(ctx, "sh", "-c", "echo hello from $(hostname)")
//	fmt.Printf("%s exit=%d\n", res.Stdout, res.ExitCode)
//
// New boots a Linux guest (the default kernel is github.com/gokrazy/kernel.amd64,
// found in the Go module cache or fetched from GOPROXY and verified) with the
// library's own VMM (package vmm): virtio-pci devices (package virtio), and
// a Go init/agent (package guest) that serves the host over a virtio-console
// port. Run and Exec start commands through that agent; many may run at
// once. Close stops the VM and releases everything.
//
// # Images
//
// Without an image the guest runs the library's own small userland (a
// shell and core commands). Image("python:3.12-slim") pulls an OCI image
// into the user's image cache (package image: every layer converted once
// to a SquashFS file, shared by all sandboxes and processes), attaches each
// layer as a read-only virtio-blk disk and has the guest stack them with
// overlayfs under a writable layer: a tmpfs, or a sparse ext4 disk with
// DiskSize. LazyImage boots an eStargz image before it is downloaded,
// reading files over virtio-9p as the guest touches them. The image's Env,
// WorkingDir and User become the sandbox's defaults; ImageCommand gives
// its Entrypoint and Cmd.
//
// # Network
//
// Every sandbox has a virtio-net interface whose other end is its own
// user-space TCP/IP stack in this process (package netstack): each flow
// the guest opens is checked against the policy and re-originated from an
// ordinary host socket, so there are no TAP devices, no root and no host
// NAT. By default the guest reaches the public internet only;
// NetworkRules opens more ("allow@host:tcp:8080" reaches the host's
// loopback as host.gosandbox.internal) or less, PublishPort exposes a
// guest port on the host, and NoNetwork removes the interface.
//
// A context passed to New or to a method bounds that call only, never the
// sandbox's life. The library prints nothing, installs no signal handler
// (see package vmm for how vCPUs are kicked), and logs only to the
// *slog.Logger given with the Logger option.
package sandbox

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/gosandbox/sandbox/guest"
	"github.com/gosandbox/sandbox/guest/agentclient"
	"github.com/gosandbox/sandbox/guest/agentproto"
	"github.com/gosandbox/sandbox/kernel"
	"github.com/gosandbox/sandbox/netstack"
	"github.com/gosandbox/sandbox/virtio"
	"github.com/gosandbox/sandbox/virtio/console"
	virtionet "github.com/gosandbox/sandbox/virtio/net"
	"github.com/gosandbox/sandbox/virtio/pci"
	"github.com/gosandbox/sandbox/virtio/rng"
	"github.com/gosandbox/sandbox/vmm"
)

// Errors, matched with errors.Is.
var (
	// ErrNoKVM: /dev/kvm does not exist on this host.
	ErrNoKVM = vmm.ErrNoKVM
	// ErrKVMPermission: /dev/kvm exists but cannot be opened.
	ErrKVMPermission = vmm.ErrKVMPermission
	// ErrKVMUnusable: KVM cannot boot a Linux guest here (no hardware
	// virtualization, or a PVM host).
	ErrKVMUnusable = vmm.ErrKVMUnusable
	// ErrGuestPanic: the guest kernel panicked.
	ErrGuestPanic = vmm.ErrGuestPanic
	// ErrGuestExited: the VM ended (it crashed, powered off or was stopped).
	ErrGuestExited = errors.New("sandbox: the VM is no longer running")
	// ErrExecNotFound: the command does not exist in the guest.
	ErrExecNotFound = agentclient.ErrExecNotFound
	// ErrPermission: the command is not executable.
	ErrPermission = agentclient.ErrPermission
	// ErrBadWorkingDir: the working directory does not exist in the guest.
	ErrBadWorkingDir = agentclient.ErrBadWorkingDir
	// ErrAgentGone: the channel to the guest agent broke.
	ErrAgentGone = agentclient.ErrAgentGone
	// ErrSetup: the guest could not set up what New asked for (mount the
	// image, configure the network); the error says what failed.
	ErrSetup = agentclient.ErrSetup
	// ErrClosed: the sandbox was closed.
	ErrClosed = errors.New("sandbox: closed")
)

// Phases are the start-up timestamps of a sandbox.
type Phases struct {
	// Requested is when New was called.
	Requested time.Time
	// ImageReady is when the image was pulled and converted (or, for a
	// lazy image, its tables of contents fetched); zero without an image.
	ImageReady time.Time
	vmm.Phases
	AgentConnected time.Time // the host finished the agent handshake
}

// ToImageReady is the time from New to a usable image (0 without one).
func (p Phases) ToImageReady() time.Duration {
	if p.ImageReady.IsZero() {
		return 0
	}
	return p.ImageReady.Sub(p.Requested)
}

// ToAgentConnected is the time from New to a usable sandbox.
func (p Phases) ToAgentConnected() time.Duration {
	if p.AgentConnected.IsZero() {
		return 0
	}
	return p.AgentConnected.Sub(p.Created)
}

// String lists the phases: the image's preparation from New, the rest as
// offsets from the VM's creation.
func (p Phases) String() string {
	s := fmt.Sprintf("first KVM_RUN +%v, guest init +%v, agent ready +%v, connected +%v",
		p.ToFirstRun().Round(time.Microsecond), p.ToInit().Round(time.Millisecond),
		p.ToAgent().Round(time.Millisecond), p.ToAgentConnected().Round(time.Millisecond))
	if d := p.ToImageReady(); d > 0 {
		s = fmt.Sprintf("image ready %v after New; ", d.Round(time.Millisecond)) + s
	}
	return s
}

// Sandbox is a running microVM. Its methods are safe for concurrent use.
type Sandbox struct {
	cfg    config
	log    *slog.Logger
	vm     *vmm.VM
	bus    *pci.Bus
	con    *console.Device
	agent  *agentclient.Client
	hvclog *vmm.RingLog
	devs   []*pci.Transport // for deviceState
	disks  *rootDisks       // nil without an image
	net    *netstack.Network
	user   string // the image's default user spec

	mu        sync.Mutex
	phases    Phases
	closed    bool
	closeOnce sync.Once
	watchDone chan struct{}
}

// addVirtio puts dev on the PCI bus; the bus owns it from then on.
func (sb *Sandbox) addVirtio(dev virtio.Device) error {
	t, err := sb.bus.AddVirtio(dev)
	if err == nil {
		sb.devs = append(sb.devs, t)
	}
	return err
}

// deviceState describes the vCPUs (vmm.VCPUStates), the virtio devices'
// transport and ring state and the console ports, for diagnosing a stalled sandbox (the debug log gets
// it when a command does not start or finish within its context).
func (sb *Sandbox) deviceState() string {
	var b strings.Builder
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	states, err := sb.vm.VCPUStates(ctx)
	cancel()
	for _, st := range states {
		b.WriteString(st.String())
		b.WriteString("\n")
	}
	if err != nil {
		fmt.Fprintf(&b, "vCPU states: %v\n", err)
	}
	if sb.con != nil {
		b.WriteString(sb.con.String())
	}
	for _, t := range sb.devs {
		b.WriteString("\n")
		b.WriteString(t.String())
	}
	return b.String()
}

// logDevices logs msg with deviceState at debug level. The state is only
// gathered when that level is enabled: reading the vCPUs' states stops each
// vCPU briefly.
func (sb *Sandbox) logDevices(msg string) {
	if sb.log.Enabled(context.Background(), slog.LevelDebug) {
		sb.log.Debug(msg, "devices", sb.deviceState())
	}
}

// New boots a sandbox and returns once its agent answers. ctx bounds the
// boot only.
func New(ctx context.Context, opts ...Option) (_ *Sandbox, err error) {
	requested := time.Now()
	cfg := defaultConfig()
	for _, o := range opts {
		if err := o(&cfg); err != nil {
			return nil, err
		}
	}
	host, err := vmm.Probe()
	if err != nil {
		return nil, err
	}
	if err := host.CanBootLinux(); err != nil {
		return nil, err
	}
	var k *kernel.Kernel
	if cfg.kernelPath != "" {
		k, err = kernel.FromFile(ctx, cfg.kernelPath, kernel.WithLogger(cfg.logger))
	} else {
		k, err = kernel.Default(ctx, kernel.WithLogger(cfg.logger))
	}
	if err != nil {
		return nil, err
	}
	cacheDir, err := os.UserCacheDir()
	if err != nil {
		return nil, fmt.Errorf("sandbox: no cache directory (set $HOME or $XDG_CACHE_HOME): %w", err)
	}
	initrd, err := guestInitramfs(cacheDir)
	if err != nil {
		return nil, err
	}

	sb := &Sandbox{cfg: cfg, log: cfg.logger, hvclog: vmm.NewRingLog(64 << 10), watchDone: make(chan struct{})}
	env := cfg.env
	if cfg.imageRef != "" || cfg.img != nil {
		if cfg.lazy {
			if sb.disks, err = lazyRoot(ctx, &cfg); err != nil {
				return nil, err
			}
		} else {
			img, err := resolveImage(ctx, &cfg)
			if err != nil {
				return nil, err
			}
			if sb.disks, err = imageDisks(img, &cfg); err != nil {
				return nil, err
			}
		}
		sb.phases.ImageReady = time.Now()
		env = append(append([]string(nil), sb.disks.command.Env...), cfg.env...)
		if sb.cfg.workDir == "" {
			sb.cfg.workDir = sb.disks.command.Dir
		}
		if u := sb.disks.command.User; u != "" && u != "root" && u != "0" && u != "0:0" {
			sb.user = u
		}
	}
	var con io.Writer = sb.hvclog
	if cfg.console != nil {
		con = io.MultiWriter(sb.hvclog, cfg.console)
	}
	sb.vm, err = vmm.New(vmm.Config{Memory: cfg.memory, VCPUs: cfg.cpus, Console: cfg.console, Logger: cfg.logger})
	if err != nil {
		if sb.disks != nil {
			sb.disks.close()
		}
		return nil, err
	}
	defer func() {
		if err != nil {
			sb.Close()
		}
	}()
	if sb.con, err = console.New(console.Options{Console: con, Ports: []string{guest.PortName}, Logger: cfg.logger}); err != nil {
		return nil, err
	}
	if sb.bus, err = pci.New(pci.Config{Mem: sb.vm.Memory(), Interrupts: sb.vm, Ioevents: sb.vm, Logger: cfg.logger}); err != nil {
		return nil, err
	}
	if err = sb.addVirtio(sb.con); err != nil {
		sb.con.Close()
		return nil, err
	}
	r := rng.New(rand.Reader)
	if err = sb.addVirtio(r); err != nil {
		r.Close()
		return nil, err
	}
	var netCfg *agentproto.NetConfig
	if !cfg.noNetwork {
		id := cfg.name
		if id == "" {
			var b [8]byte
			rand.Read(b[:])
			id = fmt.Sprintf("sandbox-%x", b)
		}
		var dev *virtionet.Device
		if sb.net, dev, netCfg, err = startNetwork(&cfg, id); err != nil {
			return nil, err
		}
		if err = sb.addVirtio(dev); err != nil {
			dev.Close()
			return nil, err
		}
	}
	var root *agentproto.RootConfig
	if sb.disks != nil {
		for _, d := range sb.disks.devs {
			if err = sb.addVirtio(d); err != nil {
				return nil, err
			}
		}
		root = sb.disks.root
	}
	if err = sb.vm.AttachPCI(sb.bus); err != nil {
		return nil, err
	}
	cmdline := guest.KernelCmdline(guest.PortName)
	if cfg.cmdline != "" {
		cmdline += " " + cfg.cmdline
	}
	if _, err = sb.vm.LoadLinux(vmm.LinuxConfig{Kernel: k.Vmlinux, SetupHeader: k.SetupHeader, InitrdFile: initrd, Cmdline: cmdline}); err != nil {
		return nil, err
	}
	if err = sb.vm.Start(); err != nil {
		return nil, err
	}

	// Connect to the agent, unless the VM dies or ctx ends first.
	sb.agent, err = agentclient.DialUntil(ctx, sb.con.Port(guest.PortName), sb.vm.Done(), agentclient.Options{
		Logger:   cfg.logger,
		Hostname: agentproto.Hostname(cfg.name),
		Env:      env,
		Root:     root,
		Net:      netCfg,
	})
	switch {
	case err == nil:
	case ctx.Err() != nil:
		return nil, fmt.Errorf("sandbox: boot: %w (console: %s)", ctx.Err(), sb.consoleTail())
	case errors.Is(err, agentclient.ErrAgentGone) && isDone(sb.vm.Done()):
		return nil, sb.guestError(fmt.Errorf("sandbox: the VM ended while booting: %w", ErrGuestExited))
	default:
		return nil, sb.guestError(fmt.Errorf("sandbox: connect to the guest agent: %w", err))
	}
	sb.mu.Lock()
	sb.phases.Requested = requested
	sb.phases.Phases = sb.vm.Phases()
	sb.phases.AgentConnected = time.Now()
	sb.mu.Unlock()
	go sb.watch()
	sb.log.Debug("sandbox ready", "phases", sb.Phases().String())
	return sb, nil
}

func isDone(c <-chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

// watch ends the agent connection when the VM ends, so that pending calls
// return at once.
func (sb *Sandbox) watch() {
	defer close(sb.watchDone)
	<-sb.vm.Done()
	sb.agent.Close()
}

// guestError wraps err with how the VM ended, if it did.
func (sb *Sandbox) guestError(err error) error {
	select {
	case <-sb.vm.Done():
	case <-time.After(200 * time.Millisecond):
		return err
	}
	ex, werr := sb.vm.Wait(context.Background())
	if werr != nil || ex == nil {
		return err
	}
	if gerr := ex.AsError(); gerr != nil {
		return fmt.Errorf("%w: %w", err, gerr)
	}
	return fmt.Errorf("%w: %w (%s)", err, ErrGuestExited, ex)
}

func (sb *Sandbox) consoleTail() string {
	b := sb.vm.ConsoleLog()
	b = append(b, sb.hvclog.Bytes()...)
	if len(b) > 2048 {
		b = b[len(b)-2048:]
	}
	return string(b)
}

// Phases returns the sandbox's start-up timestamps.
func (sb *Sandbox) Phases() Phases {
	sb.mu.Lock()
	defer sb.mu.Unlock()
	return sb.phases
}

// String describes the sandbox in one line.
func (sb *Sandbox) String() string {
	name := sb.cfg.name
	if name == "" {
		name = "(unnamed)"
	}
	return fmt.Sprintf("sandbox %s: %s", name, sb.vm)
}

// Cmd describes a command to run in the sandbox.
type Cmd struct {
	// Args is argv; Args[0] is looked up in the guest's PATH unless it
	// contains a slash.
	Args []string
	// Env adds to the sandbox's environment (KEY=value).
	Env []string
	// Dir is the working directory; "" means the sandbox's (WorkDir) or /.
	Dir string
	// UID and GID run the command as that user and group; nil means root.
	UID, GID *uint32
	// User is a user spec ("name", "uid", "uid:gid", "name:group")
	// resolved in the guest against its /etc/passwd and /etc/group; it
	// applies when UID and GID are nil. "" means the image's user (see
	// Image), or root.
	User string
	// TTY gives the command a terminal of Rows x Cols; its output all
	// arrives on Stdout.
	TTY        bool
	Rows, Cols uint16
	// Stdin feeds the command's stdin (nil: empty). Stdout and Stderr
	// receive its output (nil: discarded), with back-pressure: a slow
	// writer pauses the command, not the sandbox.
	Stdin          io.Reader
	Stdout, Stderr io.Writer
}

// ExitStatus is how a command ended.
type ExitStatus = agentclient.ExitStatus

// Process is a command started by Exec.
type Process struct {
	sb *Sandbox
	p  *agentclient.Process
}

// PID is the process's ID in the guest.
func (p *Process) PID() int { return p.p.PID() }

// Signal sends sig to the process.
func (p *Process) Signal(sig syscall.Signal) error { return p.sb.wrap(p.p.Signal(sig)) }

// Resize changes the size of the process's terminal.
func (p *Process) Resize(rows, cols uint16) error { return p.sb.wrap(p.p.Resize(rows, cols)) }

// Wait waits until the process ends (and its output was delivered). If ctx
// ends first, Wait returns ctx.Err() and the process keeps running.
func (p *Process) Wait(ctx context.Context) (ExitStatus, error) {
	st, err := p.p.Wait(ctx)
	if err != nil && ctx.Err() != nil {
		p.sb.logDevices("sandbox: a command outlived its context")
	}
	return st, p.sb.wrap(err)
}

// Exec starts a command. ctx bounds the start only.
func (sb *Sandbox) Exec(ctx context.Context, cmd Cmd) (*Process, error) {
	if err := sb.usable(); err != nil {
		return nil, err
	}
	if cmd.Dir == "" {
		cmd.Dir = sb.cfg.workDir
	}
	if cmd.User == "" && cmd.UID == nil && cmd.GID == nil {
		cmd.User = sb.user
	}
	p, err := sb.agent.Exec(ctx, agentclient.Cmd(cmd))
	if err != nil {
		if ctx.Err() != nil {
			sb.logDevices("sandbox: a command did not start within its context")
		}
		return nil, sb.wrap(err)
	}
	return &Process{sb: sb, p: p}, nil
}

// Result is the outcome of Run.
type Result struct {
	Stdout, Stderr []byte
	ExitCode       int            // 0 if killed by a signal
	Signal         syscall.Signal // the signal that ended the command, or 0
}

// Success reports whether the command exited with code 0.
func (r Result) Success() bool { return r.ExitCode == 0 && r.Signal == 0 }

// Run runs a command to completion and collects its output. A non-zero
// exit is not an error; a command that cannot start is (ErrExecNotFound,
// ErrPermission, ErrBadWorkingDir). If ctx ends first, the command is
// killed and Run returns ctx.Err().
func (sb *Sandbox) Run(ctx context.Context, name string, args ...string) (Result, error) {
	var out, errb bytes.Buffer
	p, err := sb.Exec(ctx, Cmd{Args: append([]string{name}, args...), Stdout: &out, Stderr: &errb})
	if err != nil {
		return Result{}, err
	}
	st, err := p.Wait(ctx)
	if err != nil && ctx.Err() != nil {
		p.Signal(syscall.SIGKILL)
		kctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		p.Wait(kctx)
		cancel()
		return Result{Stdout: out.Bytes(), Stderr: errb.Bytes()}, ctx.Err()
	}
	if err != nil {
		return Result{}, err
	}
	return Result{Stdout: out.Bytes(), Stderr: errb.Bytes(), ExitCode: st.Code, Signal: st.Signal}, nil
}

func (sb *Sandbox) usable() error {
	sb.mu.Lock()
	closed := sb.closed
	sb.mu.Unlock()
	if closed {
		return ErrClosed
	}
	select {
	case <-sb.vm.Done():
		return sb.guestError(ErrGuestExited)
	default:
	}
	return nil
}

// wrap adds how the VM ended to an error that came from a broken agent
// channel.
func (sb *Sandbox) wrap(err error) error {
	if err == nil || !errors.Is(err, agentclient.ErrAgentGone) && !errors.Is(err, agentclient.ErrClosed) {
		return err
	}
	sb.mu.Lock()
	closed := sb.closed
	sb.mu.Unlock()
	if closed {
		return fmt.Errorf("%w: %w", ErrClosed, err)
	}
	if errors.Is(err, agentclient.ErrClosed) {
		// The watcher closed the client because the VM ended.
		err = ErrAgentGone
	}
	return sb.guestError(err)
}

// Stop asks the guest to power off and waits for it (or for ctx), then
// closes the sandbox.
func (sb *Sandbox) Stop(ctx context.Context) error {
	if err := sb.usable(); err == nil {
		sb.agent.Shutdown(ctx)
		select {
		case <-sb.vm.Done():
		case <-ctx.Done():
		}
	}
	return sb.Close()
}

// Close stops the VM at once and releases every fd, mapping and goroutine
// of the sandbox. It is safe to call more than once.
func (sb *Sandbox) Close() error {
	var err error
	sb.closeOnce.Do(func() {
		sb.mu.Lock()
		sb.closed = true
		sb.mu.Unlock()
		// Order matters: the vCPUs stop first, then the devices (their
		// goroutines use guest memory and the VM's irqfds), then the VM
		// releases its memory and fds.
		var errs []error
		if sb.vm != nil {
			if serr := sb.vm.Stop(context.Background()); serr != nil && !errors.Is(serr, vmm.ErrNotStarted) {
				errs = append(errs, serr)
			}
		}
		if sb.agent != nil {
			sb.agent.Close()
			<-sb.watchDone
		}
		if sb.disks != nil {
			errs = append(errs, sb.disks.abort())
		}
		if sb.bus != nil {
			errs = append(errs, sb.bus.Close())
		} else if sb.con != nil {
			errs = append(errs, sb.con.Close())
		}
		if sb.net != nil {
			errs = append(errs, sb.net.Close())
		}
		if sb.disks != nil {
			errs = append(errs, sb.disks.close())
		}
		if sb.vm != nil {
			errs = append(errs, sb.vm.Close())
		}
		err = errors.Join(errs...)
	})
	return err
}
