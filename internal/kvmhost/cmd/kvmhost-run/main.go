// Command kvmhost-run runs a program inside the emulated KVM host (an outer
// QEMU/TCG VM with a real /dev/kvm) and exits with the program's exit code.
//
//	kvmhost-run [-mem MiB] [-cpus N] [-timeout D] [-net] [-module name] [-console] [-v] -- prog args...
//
// The program sees this host's files read-only at the same paths, the
// user's cache directory read-write, and GOSANDBOX_IN_KVMHOST=1. It exists
// for trying things by hand and for measuring the outer VM; tests use
// kvmhost.Delegate.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/gosandbox/sandbox/internal/kvmhost"
)

func main() {
	mem := flag.Int("mem", kvmhost.DefaultMemoryMiB, "outer VM memory in MiB")
	cpus := flag.Int("cpus", kvmhost.DefaultCPUs, "outer VM vCPUs")
	timeout := flag.Duration("timeout", 0, "bound on the whole run (0: none)")
	console := flag.Bool("console", false, "copy the outer VM console to stderr")
	verbose := flag.Bool("v", false, "log progress and timings to stderr")
	network := flag.Bool("net", false, "give the outer VM outbound network (QEMU user networking)")
	var modules stringList
	flag.Var(&modules, "module", "extra kernel module to load (repeatable)")
	flag.Parse()
	if flag.NArg() < 1 {
		fmt.Fprintln(os.Stderr, "usage: kvmhost-run [flags] -- program args...")
		os.Exit(2)
	}
	prog := flag.Arg(0)
	if !filepath.IsAbs(prog) {
		p, err := exec.LookPath(prog)
		if err != nil {
			fmt.Fprintln(os.Stderr, "kvmhost-run:", err)
			os.Exit(2)
		}
		prog, _ = filepath.Abs(p)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	cfg := kvmhost.Config{
		Program:   prog,
		Args:      flag.Args()[1:],
		Stdout:    os.Stdout,
		Stderr:    os.Stderr,
		MemoryMiB: *mem,
		CPUs:      *cpus,
		Timeout:   *timeout,
		Modules:   modules,
		Network:   *network,
	}
	if *console {
		cfg.Console = os.Stderr
	}
	if *verbose {
		cfg.Logger = slog.New(slog.NewTextHandler(os.Stderr, nil))
	}
	res, err := kvmhost.RunResult(ctx, cfg)
	if err != nil {
		fmt.Fprintln(os.Stderr, "kvmhost-run:", err)
		if errors.Is(err, kvmhost.ErrInvalidConfig) {
			os.Exit(2)
		}
		os.Exit(125)
	}
	if *verbose {
		fmt.Fprintf(os.Stderr, "kvmhost-run: exit %d, boot %v (guest uptime %v), total %v\n", res.ExitCode, res.Boot, res.GuestUptime, res.Total)
	}
	os.Exit(res.ExitCode)
}

type stringList []string

func (s *stringList) String() string     { return fmt.Sprint(*s) }
func (s *stringList) Set(v string) error { *s = append(*s, v); return nil }
