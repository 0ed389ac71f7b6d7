// Command init is the whole guest userland in one static binary: PID 1
// init and agent, and — called through a link named after a command — the
// shell and core commands of package guest/internal/userland.
//
// How it is called decides what it does:
//
//	/init (as PID 1)            boot the guest and serve the agent (see below)
//	init -agent-fd N            serve the agent on descriptor N as an ordinary
//	                            process (no mounts, no reaping of strangers), for
//	                            tests on a build machine
//	init COMMAND [ARG]...       run a userland command
//	COMMAND [ARG]... (via link) run a userland command, e.g. /bin/sh -> /init
//
// # As PID 1
//
// Right away it writes 1 to I/O port 0x440 (through /dev/port) so the VMM
// can time the start of init; then it mounts /proc, /sys, /dev (devtmpfs),
// /dev/pts, /dev/shm, /tmp and /run, brings up lo, waits for the agent's
// virtio-console port, writes 2 to port 0x440 (agent ready) and serves the
// agent protocol on that port. The host's Config sets the clock
// (settimeofday), the hostname and the base environment. When the host asks
// for a shutdown, or the agent channel breaks, it kills everything, syncs
// and powers off. It never exits: a panic is recovered into a power-off,
// because PID 1 exiting panics the kernel.
//
// Kernel command line parameters it reads from /proc/cmdline:
//
//	gosandbox.agent=NAME     name of the virtio-console port of the agent
//	                         (default "gosandbox.agent")
//	gosandbox.agent_wait=D   how long to wait for that port to appear, a Go
//	                         duration (default 60s); then it powers off
//	gosandbox.debug=1        log the agent's debug messages to the console
//
// The VMM passes, for example:
//
//	console=hvc0 rdinit=/init gosandbox.agent=gosandbox.agent quiet
package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"syscall"

	"github.com/gosandbox/sandbox/guest/agent"
	"github.com/gosandbox/sandbox/guest/internal/userland"
)

func main() {
	name := filepath.Base(os.Args[0])
	args := os.Args[1:]
	if name == "init" || name == "gosandbox-init" {
		switch {
		case os.Getpid() == 1:
			pid1() // never returns
		case len(args) == 2 && args[0] == "-agent-fd":
			os.Exit(agentFD(args[1]))
		case len(args) > 0:
			name, args = args[0], args[1:]
		default:
			fmt.Fprintf(os.Stderr, "usage: init -agent-fd N | init COMMAND [ARG]...\ncommands: %v\n", userland.Names())
			os.Exit(2)
		}
	}
	run, ok := userland.Lookup(name)
	if !ok {
		fmt.Fprintf(os.Stderr, "%s: command not found in the gosandbox userland\n", name)
		os.Exit(127)
	}
	os.Exit(run(context.Background(), userland.IO{Stdin: os.Stdin, Stdout: os.Stdout, Stderr: os.Stderr}, args))
}

// agentFD serves the agent on an inherited descriptor, as an ordinary
// process: the agent's tests run it over a socketpair.
func agentFD(s string) int {
	fd, err := strconv.Atoi(s)
	if err != nil || fd < 3 {
		fmt.Fprintf(os.Stderr, "init: bad -agent-fd %q\n", s)
		return 2
	}
	syscall.CloseOnExec(fd) // the agent's children must not hold the channel open
	f := os.NewFile(uintptr(fd), "agent")
	err = agent.Serve(context.Background(), f, agent.Options{Agent: "gosandbox-init (agent-fd)", Env: os.Environ()})
	fmt.Fprintf(os.Stderr, "init: agent: %v\n", err)
	return 0
}
