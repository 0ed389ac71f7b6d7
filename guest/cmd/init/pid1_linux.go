package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/gosandbox/sandbox/guest/agent"
	"github.com/gosandbox/sandbox/guest/agentproto"
	"golang.org/x/sys/unix"
)

// Boot phase markers written to I/O port 0x440.
const (
	markerPort        = 0x440
	markerInitStarted = 1
	markerAgentReady  = 2
	markerPoweroff    = 3
)

// marker writes one byte to the boot-marker I/O port through /dev/port;
// errors are ignored (a VMM without the port just does not time it).
func marker(v byte) {
	f, err := os.OpenFile("/dev/port", os.O_WRONLY, 0)
	if err != nil {
		return
	}
	_, _ = f.WriteAt([]byte{v}, markerPort)
	f.Close()
}

type params struct {
	port     string
	portWait time.Duration
	debug    bool
}

func parseCmdline(cmdline string) params {
	p := params{port: "gosandbox.agent", portWait: 60 * time.Second}
	for _, f := range strings.Fields(cmdline) {
		k, v, _ := strings.Cut(f, "=")
		switch k {
		case "gosandbox.agent":
			if v != "" {
				p.port = v
			}
		case "gosandbox.agent_wait":
			if d, err := time.ParseDuration(v); err == nil && d > 0 {
				p.portWait = d
			}
		case "gosandbox.debug":
			p.debug = v == "1" || v == "true" || v == ""
		}
	}
	return p
}

type mount struct {
	source, target, fstype string
	flags                  uintptr
	data                   string
}

var mounts = []mount{
	{"proc", "/proc", "proc", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, ""},
	{"sysfs", "/sys", "sysfs", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, ""},
	{"devtmpfs", "/dev", "devtmpfs", unix.MS_NOSUID, "mode=0755"},
	{"devpts", "/dev/pts", "devpts", unix.MS_NOSUID | unix.MS_NOEXEC, "mode=0620,ptmxmode=0666,gid=5"},
	{"tmpfs", "/dev/shm", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=1777"},
	{"tmpfs", "/tmp", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=1777"},
	{"tmpfs", "/run", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=0755"},
}

func mountAll(log *slog.Logger) {
	for _, m := range mounts {
		if err := os.MkdirAll(m.target, 0o755); err != nil {
			log.Warn("mkdir", "path", m.target, "err", err)
		}
		if err := unix.Mount(m.source, m.target, m.fstype, m.flags, m.data); err != nil && !errors.Is(err, unix.EBUSY) {
			log.Warn("mount", "target", m.target, "fstype", m.fstype, "err", err)
		}
	}
	for name, target := range map[string]string{"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1", "stderr": "/proc/self/fd/2"} {
		_ = os.Symlink(target, "/dev/"+name)
	}
}

// loopbackUp sets IFF_UP on lo; the kernel then gives it 127.0.0.1/8.
func loopbackUp() error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq("lo")
	if err != nil {
		return err
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		return err
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	return unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr)
}

// findPort waits for the virtio-console port called name (there is no
// udev: the names are in sysfs) and returns its device path. root is "/"
// except in tests.
func findPort(root, name string, wait time.Duration) (string, error) {
	deadline := time.Now().Add(wait)
	for {
		dirs, _ := filepath.Glob(filepath.Join(root, "sys/class/virtio-ports/vport*"))
		for _, d := range dirs {
			b, err := os.ReadFile(filepath.Join(d, "name"))
			if err != nil || strings.TrimSpace(string(b)) != name {
				continue
			}
			dev := filepath.Join(root, "dev", filepath.Base(d))
			if _, err := os.Stat(dev); err == nil {
				return dev, nil
			}
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("no virtio-console port named %q after %v (found %d ports; does the VMM add it?)", name, wait, len(dirs))
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// setup applies the host's Config: clock, hostname, the image root and
// the network. Failing to set up the root or the network is fatal (the
// host reports it); the clock and hostname are warnings.
func setup(cfg agentproto.Config) ([]string, error) {
	var warnings []string
	if cfg.TimeUnixNano > 0 {
		tv := unix.NsecToTimeval(cfg.TimeUnixNano)
		if err := unix.Settimeofday(&tv); err != nil {
			warnings = append(warnings, "set clock: "+err.Error())
		}
	}
	if cfg.Hostname != "" {
		if err := unix.Sethostname([]byte(cfg.Hostname)); err != nil {
			warnings = append(warnings, "set hostname: "+err.Error())
		}
	}
	if cfg.Root != nil {
		if err := setupRoot(cfg.Root); err != nil {
			return warnings, fmt.Errorf("root file system: %w", err)
		}
	}
	if cfg.Hostname != "" {
		_ = os.MkdirAll("/etc", 0o755)
		_ = os.WriteFile("/etc/hostname", []byte(cfg.Hostname+"\n"), 0o644)
	}
	if cfg.Net != nil {
		if err := setupNet(cfg.Net, cfg.Hostname); err != nil {
			return warnings, fmt.Errorf("network: %w", err)
		}
	}
	return warnings, nil
}

// powerOff ends the guest. The VMM gives the guest no ACPI, so a real
// power-off would only halt the CPUs where the host cannot see it: in a VM
// the init writes markerPoweroff to the marker port and resets instead
// (the kernel's reboot=k pulls the i8042 reset line, which ends the VM; the
// marker makes the VMM report a power-off, not a reboot). In the test
// namespaces (testAgentFD) a power-off ends the PID namespace, as before.
func powerOff(log *slog.Logger, reboot bool) {
	_ = unix.Kill(-1, unix.SIGKILL)
	unix.Sync()
	cmd := unix.LINUX_REBOOT_CMD_POWER_OFF
	if reboot {
		cmd = unix.LINUX_REBOOT_CMD_RESTART
	} else if os.Getenv(testAgentFD) == "" {
		marker(markerPoweroff)
		cmd = unix.LINUX_REBOOT_CMD_RESTART
	}
	err := unix.Reboot(cmd)
	log.Error("power off failed; halting here", "err", err)
	for {
		time.Sleep(time.Hour)
	}
}

// testAgentFD is the environment variable that makes PID 1 serve the
// agent on an inherited descriptor instead of the virtio-console port, and
// write no boot markers: tests run init as PID 1 of a new PID, mount, UTS
// and network namespace on the build machine with it. A kernel never sets
// it.
const testAgentFD = "GOSANDBOX_AGENT_FD"

// shieldSignals catches the signals on which the Go runtime would exit
// (SIGTERM, SIGHUP, ...) and drops them: `kill 1` from a command in the
// guest must not end PID 1, which would panic the kernel. They are caught,
// not ignored, so processes the agent starts get default dispositions.
func shieldSignals(log *slog.Logger) {
	ch := make(chan os.Signal, 16)
	signal.Notify(ch, unix.SIGHUP, unix.SIGINT, unix.SIGTERM, unix.SIGQUIT, unix.SIGUSR1, unix.SIGUSR2,
		unix.SIGALRM, unix.SIGPIPE, unix.SIGABRT, unix.SIGTRAP, unix.SIGSEGV, unix.SIGBUS, unix.SIGFPE,
		unix.SIGSYS, unix.SIGPWR, unix.SIGXCPU, unix.SIGXFSZ, unix.SIGVTALRM, unix.SIGPROF, unix.SIGSTKFLT)
	go func() {
		for sig := range ch {
			log.Debug("PID 1 ignores a signal", "signal", sig)
		}
	}()
}

// pid1 boots the guest and serves the agent. It never returns.
func pid1() {
	testFD := os.Getenv(testAgentFD)
	if testFD == "" {
		marker(markerInitStarted)
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	defer func() {
		if r := recover(); r != nil {
			log.Error("init panicked; powering off", "panic", r)
			powerOff(log, false)
		}
	}()
	shieldSignals(log)
	os.Setenv("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
	os.Setenv("HOME", "/root")
	mountAll(log)
	cmdline, _ := os.ReadFile("/proc/cmdline")
	p := parseCmdline(string(cmdline))
	if p.debug {
		log = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	if err := loopbackUp(); err != nil {
		log.Warn("bring up lo", "err", err)
	}
	reaper := agent.NewReaper()
	var port *os.File
	if testFD != "" {
		fd, err := strconv.Atoi(testFD)
		if err != nil || fd < 3 {
			log.Error("bad "+testAgentFD, "value", testFD)
			powerOff(log, false)
		}
		unix.CloseOnExec(fd)
		port = os.NewFile(uintptr(fd), "agent")
	} else {
		dev, err := findPort("/", p.port, p.portWait)
		if err != nil {
			log.Error("agent port", "err", err)
			powerOff(log, false)
		}
		port, err = os.OpenFile(dev, os.O_RDWR, 0)
		if err != nil {
			log.Error("open agent port", "dev", dev, "err", err)
			powerOff(log, false)
		}
		marker(markerAgentReady)
		log.Debug("serving the agent", "port", p.port, "dev", dev)
	}
	err := agent.Serve(context.Background(), port, agent.Options{
		Logger: log,
		Env:    agent.DefaultEnv(),
		Setup:  setup,
		Reaper: reaper,
		Agent:  "gosandbox-init",
	})
	var sd *agent.ShutdownRequest
	var sf *agent.SetupFailed
	if errors.As(err, &sf) {
		// The host was told; give it a moment to read the answer.
		log.Error("setup failed; powering off", "err", sf.Err)
		time.Sleep(100 * time.Millisecond)
		powerOff(log, false)
	}
	if errors.As(err, &sd) {
		log.Debug("shutdown requested", "reboot", sd.Reboot)
		powerOff(log, sd.Reboot)
	}
	log.Error("agent channel ended; powering off", "err", err)
	powerOff(log, false)
}
