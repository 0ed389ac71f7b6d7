// Command hello starts a sandbox, runs a few commands in it, and prints what
// they said and how long each start-up phase took.
//
//	go run ./examples/hello
//
// On a host whose KVM cannot boot Linux (no hardware virtualization, or a
// PVM host like the project's build machines) it says so and runs itself
// inside the emulated KVM host (a QEMU software-emulated VM with real KVM
// inside, see internal/kvmhost), which installs what it needs on Debian and
// is slow: expect a minute or two.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"time"

	"github.com/gosandbox/sandbox"
	"github.com/gosandbox/sandbox/internal/examplehost"
)

func main() {
	cpus := flag.Int("cpus", 2, "virtual CPUs")
	mem := flag.Int("mem", 256, "guest memory in MiB")
	flag.Parse()
	if err := run(*cpus, *mem); err != nil {
		fmt.Fprintln(os.Stderr, "hello:", err)
		os.Exit(1)
	}
}

func run(cpus, memMiB int) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	start := time.Now()
	sb, err := examplehost.New(ctx, sandbox.Name("hello"), sandbox.CPUs(cpus), sandbox.Memory(uint64(memMiB)<<20))
	if err != nil {
		return err
	}
	defer sb.Close()
	ph := sb.Phases()
	fmt.Printf("%s\n", sb)
	fmt.Printf("boot phases (from sandbox.New):\n")
	fmt.Printf("  first KVM_RUN     %10v\n", ph.ToFirstRun().Round(time.Microsecond))
	fmt.Printf("  guest init exec   %10v\n", ph.ToInit().Round(time.Millisecond))
	fmt.Printf("  agent ready       %10v\n", ph.ToAgent().Round(time.Millisecond))
	fmt.Printf("  agent connected   %10v\n", ph.ToAgentConnected().Round(time.Millisecond))

	for _, args := range [][]string{
		{"uname", "-sr"},
		{"sh", "-c", "echo hello from $(cat /proc/sys/kernel/hostname), CPUs $(cat /sys/devices/system/cpu/online)"},
	} {
		t := time.Now()
		res, err := sb.Run(ctx, args[0], args[1:]...)
		if err != nil {
			return err
		}
		fmt.Printf("$ %v  (exit %d, %v)\n%s", args, res.ExitCode, time.Since(t).Round(time.Millisecond), res.Stdout)
	}
	fmt.Printf("total %v\n", time.Since(start).Round(time.Millisecond))
	return nil
}
