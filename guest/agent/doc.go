// Package agent is the guest side of the agent protocol (package
// guest/agentproto): it serves exec requests from the host over one byte
// stream. In the VM, guest/cmd/init runs it as PID 1 on the virtio-console
// port; in tests it runs in-process or as an ordinary process over a
// socketpair, on the build machine, with no VM (Options.ReapAll off).
//
// Each exec runs with its own session (setsid), pipes or a pseudo-terminal
// for stdio, and goroutines that move data under the protocol's credit
// windows, so a process whose output the host reads slowly only stalls
// itself. A process's Exit frame is sent after its output: once the process
// has exited, its output is read until end of file, or until the pipes stay
// idle for OutputGrace (descendants that keep the pipes open, like a
// backgrounded `sleep`, do not hold the Exit back forever).
//
// Process spawning uses syscall.ForkExec rather than os/exec because PID 1
// must reap every child with wait4(-1) (orphans are re-parented to it), and
// os/exec's own wait would race with that reaper; see Reaper.
package agent
