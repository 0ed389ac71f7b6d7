package agentclient

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"syscall"

	"github.com/gosandbox/sandbox/guest/agentproto"
)

// Cmd describes a process to run in the guest.
type Cmd struct {
	// Args is argv; Args[0] is looked up in the guest's PATH unless it
	// contains a slash. Required.
	Args []string
	// Env is merged over the guest's base environment (KEY=value).
	Env []string
	// Dir is the working directory; "" means /.
	Dir string
	// UID and GID run the process as that user and group; nil means root
	// (a nil GID with a UID set means the group with the UID's number).
	UID, GID *uint32
	// User is a user spec ("name", "uid", "uid:gid", "name:group")
	// resolved in the guest against its /etc/passwd and /etc/group; it
	// applies when UID and GID are nil.
	User string
	// TTY gives the process a pseudo-terminal of Rows x Cols for
	// stdin, stdout and stderr; its output arrives on Stdout only.
	TTY        bool
	Rows, Cols uint16
	// Stdin, if non-nil, is copied to the process's stdin; at EOF stdin is
	// closed (for a TTY, an end-of-file character is written). The copying
	// goroutine ends when the process has ended and its current Read
	// returns. Nil gives the process /dev/null (or an idle TTY).
	Stdin io.Reader
	// Stdout and Stderr receive the process's output; nil discards it.
	// Writes happen on one goroutine per process, in order.
	Stdout, Stderr io.Writer
}

// ExitStatus is how a process ended: an exit code, or the signal that
// killed it.
type ExitStatus struct {
	Code       int            // exit code; 0 when killed by a signal
	Signal     syscall.Signal // the signal that killed the process, or 0
	CoreDumped bool
}

// Success reports whether the process exited with code 0.
func (s ExitStatus) Success() bool { return s.Code == 0 && s.Signal == 0 }

// String describes the status like os.ProcessState does.
func (s ExitStatus) String() string {
	if s.Signal != 0 {
		return "signal: " + s.Signal.String()
	}
	return fmt.Sprintf("exit status %d", s.Code)
}

// Process is a process started by Exec.
type Process struct {
	c    *Client
	id   uint32
	argv string
	cmd  Cmd

	started chan struct{} // closed on Started, SpawnError or failure
	done    chan struct{} // closed when the exit status and all output are delivered

	mu        sync.Mutex
	pid       int
	startErr  error
	exited    bool
	status    ExitStatus
	err       error // set when the stream failed (agent gone)
	abandoned bool  // Exec returned early; kill on start, drop output
	stdinCred int64 // credit to send stdin
	stdinCond sync.Cond
	out       outQueue
	outCond   sync.Cond
	finished  bool // no more output will arrive (exit or failure)
}

type chunk struct {
	stderr bool
	b      []byte
}

type outQueue struct {
	chunks []chunk
	size   int
}

// Exec starts cmd in the guest and returns once it runs. ctx bounds the
// start only; use Wait to bound the process. A process that cannot be
// started gives a *SpawnError (ErrExecNotFound, ErrPermission,
// ErrBadWorkingDir).
func (c *Client) Exec(ctx context.Context, cmd Cmd) (*Process, error) {
	req := &agentproto.ExecRequest{
		Argv: cmd.Args, Env: cmd.Env, Dir: cmd.Dir, UID: cmd.UID, GID: cmd.GID, User: cmd.User,
		TTY: cmd.TTY, Rows: cmd.Rows, Cols: cmd.Cols, Stdin: cmd.Stdin != nil, Window: c.opts.Window,
	}
	if err := req.Validate(); err != nil {
		return nil, fmt.Errorf("agentclient: bad Cmd: %w", err)
	}
	p := &Process{c: c, cmd: cmd, argv: cmd.Args[0], started: make(chan struct{}), done: make(chan struct{})}
	p.stdinCond.L = &p.mu
	p.outCond.L = &p.mu
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return nil, err
	}
	if c.nextID == ^uint32(0) {
		c.mu.Unlock()
		return nil, fmt.Errorf("agentclient: stream ids exhausted; start a new client")
	}
	c.nextID++
	p.id = c.nextID
	c.procs[p.id] = p
	c.wg.Go(p.deliver)
	c.mu.Unlock()

	if err := c.sendPayload(agentproto.TypeExec, p.id, req); err != nil {
		c.remove(p.id)
		p.fail(err)
		return nil, err
	}
	select {
	case <-p.started:
	case <-ctx.Done():
		p.mu.Lock()
		p.abandoned = true
		pid := p.pid
		p.mu.Unlock()
		if pid != 0 {
			_ = p.kill()
		}
		return nil, fmt.Errorf("agentclient: starting %q: %w", p.argv, ctx.Err())
	}
	p.mu.Lock()
	err := p.startErr
	p.mu.Unlock()
	if err != nil {
		return nil, err
	}
	if cmd.Stdin != nil {
		go p.feedStdin()
	}
	return p, nil
}

// PID returns the process id in the guest.
func (p *Process) PID() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.pid
}

func (p *Process) isStarted() bool {
	select {
	case <-p.started:
		return true
	default:
		return false
	}
}

// onFrame handles a frame for this process from the read loop. It never
// blocks; an error is a protocol violation that ends the client.
func (p *Process) onFrame(f agentproto.Frame) error {
	switch f.Type {
	case agentproto.TypeStarted:
		var s agentproto.Started
		if err := agentproto.Decode(f, &s); err != nil {
			return err
		}
		if p.isStarted() {
			return fmt.Errorf("%w: second started frame for stream %d", agentproto.ErrProtocol, f.ID)
		}
		p.mu.Lock()
		p.pid = s.PID
		p.stdinCred = int64(s.Window)
		abandoned := p.abandoned
		p.mu.Unlock()
		close(p.started)
		if abandoned {
			p.c.wg.Go(func() { _ = p.kill() })
		}
		return nil
	case agentproto.TypeSpawnError:
		var s agentproto.SpawnError
		if err := agentproto.Decode(f, &s); err != nil {
			return err
		}
		if p.isStarted() {
			return fmt.Errorf("%w: spawn error after start for stream %d", agentproto.ErrProtocol, f.ID)
		}
		p.c.remove(p.id)
		p.failStart(&SpawnError{Argv0: p.argv, Kind: s.Kind, Errno: syscall.Errno(s.Errno), Message: s.Message})
		return nil
	}
	if !p.isStarted() {
		return fmt.Errorf("%w: %v before started for stream %d", agentproto.ErrProtocol, f.Type, f.ID)
	}
	switch f.Type {
	case agentproto.TypeStdout, agentproto.TypeStderr:
		p.mu.Lock()
		defer p.mu.Unlock()
		if p.out.size+len(f.Payload) > int(p.c.opts.Window) {
			return fmt.Errorf("%w: output beyond the granted window on stream %d", agentproto.ErrProtocol, f.ID)
		}
		if len(f.Payload) == 0 {
			return nil
		}
		p.out.chunks = append(p.out.chunks, chunk{stderr: f.Type == agentproto.TypeStderr, b: f.Payload})
		p.out.size += len(f.Payload)
		p.outCond.Signal()
		return nil
	case agentproto.TypeWindow:
		n, err := agentproto.ParseWindow(f)
		if err != nil {
			return err
		}
		p.mu.Lock()
		defer p.mu.Unlock()
		if p.stdinCred+int64(n) > agentproto.MaxWindow {
			return fmt.Errorf("%w: stdin window beyond %d on stream %d", agentproto.ErrProtocol, agentproto.MaxWindow, f.ID)
		}
		p.stdinCred += int64(n)
		p.stdinCond.Broadcast()
		return nil
	case agentproto.TypeExit:
		var e agentproto.Exit
		if err := agentproto.Decode(f, &e); err != nil {
			return err
		}
		p.c.remove(p.id)
		p.mu.Lock()
		p.exited = true
		p.status = ExitStatus{Code: e.Code, Signal: syscall.Signal(e.Signal), CoreDumped: e.Core}
		p.finished = true
		p.outCond.Broadcast()
		p.stdinCond.Broadcast()
		p.mu.Unlock()
		return nil
	}
	return fmt.Errorf("%w: unexpected %v on stream %d", agentproto.ErrProtocol, f.Type, f.ID)
}

// failStart ends a process that never started.
func (p *Process) failStart(err error) {
	p.mu.Lock()
	p.startErr = err
	p.err = err
	p.finished = true
	p.outCond.Broadcast()
	p.mu.Unlock()
	if !p.isStarted() {
		close(p.started)
	}
}

// fail ends the process because the client ended.
func (p *Process) fail(err error) {
	p.mu.Lock()
	if p.err == nil && !p.exited {
		p.err = err
	}
	if !p.isStarted() && p.startErr == nil {
		p.startErr = err
		close(p.started)
	}
	p.finished = true
	p.outCond.Broadcast()
	p.stdinCond.Broadcast()
	p.mu.Unlock()
}

// deliver writes output to the Cmd's writers and returns credit; it
// closes done when the process has ended and its output is delivered.
func (p *Process) deliver() {
	defer close(p.done)
	for {
		p.mu.Lock()
		for len(p.out.chunks) == 0 && !p.finished {
			p.outCond.Wait()
		}
		if len(p.out.chunks) == 0 {
			p.mu.Unlock()
			return
		}
		ch := p.out.chunks[0]
		p.out.chunks[0] = chunk{}
		p.out.chunks = p.out.chunks[1:]
		drop := p.abandoned || p.err != nil
		p.mu.Unlock()

		w := p.cmd.Stdout
		if ch.stderr {
			w = p.cmd.Stderr
		}
		if w != nil && !drop {
			_, _ = w.Write(ch.b) // a failing writer loses output but must not stall the guest
		}
		p.mu.Lock()
		p.out.size -= len(ch.b)
		ended := p.exited || p.err != nil
		p.mu.Unlock()
		if !ended {
			_ = p.c.send(agentproto.Frame{Type: agentproto.TypeWindow, ID: p.id, Payload: agentproto.WindowPayload(uint32(len(ch.b)))})
		}
	}
}

// feedStdin copies Cmd.Stdin to the guest within the stdin credit.
func (p *Process) feedStdin() {
	buf := make([]byte, agentproto.MaxData)
	for {
		p.mu.Lock()
		for p.stdinCred == 0 && !p.finished {
			p.stdinCond.Wait()
		}
		if p.finished {
			p.mu.Unlock()
			return
		}
		k := int(min(p.stdinCred, int64(len(buf))))
		p.mu.Unlock()
		n, err := p.cmd.Stdin.Read(buf[:k])
		if n > 0 {
			p.mu.Lock()
			p.stdinCred -= int64(n)
			fin := p.finished
			p.mu.Unlock()
			if fin {
				return
			}
			if p.c.send(agentproto.Frame{Type: agentproto.TypeStdin, ID: p.id, Payload: buf[:n]}) != nil {
				return
			}
		}
		if err != nil {
			p.mu.Lock()
			fin := p.finished
			p.mu.Unlock()
			if !fin {
				_ = p.c.send(agentproto.Frame{Type: agentproto.TypeStdinClose, ID: p.id})
			}
			return
		}
	}
}

func (p *Process) check() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.err != nil {
		return p.err
	}
	if p.exited {
		return os.ErrProcessDone
	}
	return nil
}

// Signal sends sig to the process. It returns os.ErrProcessDone if the
// process has already exited.
func (p *Process) Signal(sig syscall.Signal) error {
	if err := p.check(); err != nil {
		return err
	}
	return p.c.sendPayload(agentproto.TypeSignal, p.id, &agentproto.Signal{Signal: int(sig)})
}

// kill sends SIGKILL to the process group.
func (p *Process) kill() error {
	if err := p.check(); err != nil {
		return err
	}
	return p.c.sendPayload(agentproto.TypeSignal, p.id, &agentproto.Signal{Signal: int(syscall.SIGKILL), Group: true})
}

// Resize sets the TTY's window size (the process gets SIGWINCH).
func (p *Process) Resize(rows, cols uint16) error {
	if !p.cmd.TTY {
		return errors.New("agentclient: Resize of a process without a TTY")
	}
	if err := p.check(); err != nil {
		return err
	}
	return p.c.sendPayload(agentproto.TypeResize, p.id, &agentproto.Resize{Rows: rows, Cols: cols})
}

// Wait waits until the process has exited and its output has been
// written to Cmd.Stdout and Cmd.Stderr, and returns how it ended. If ctx
// ends first, Wait kills the process's group (SIGKILL) and returns an error
// wrapping ctx.Err(); a later Wait still reports the exit status. If the
// agent goes away first, the error wraps ErrAgentGone. Wait may be called
// more than once.
func (p *Process) Wait(ctx context.Context) (ExitStatus, error) {
	select {
	case <-p.done:
	case <-ctx.Done():
		select {
		case <-p.done:
		default:
			_ = p.kill()
			return ExitStatus{}, fmt.Errorf("agentclient: %q killed: %w", p.argv, ctx.Err())
		}
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.exited {
		return ExitStatus{}, p.err
	}
	return p.status, nil
}
