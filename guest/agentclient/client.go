// Package agentclient is the host side of the guest agent protocol (package
// guest/agentproto). Dial runs the handshake over any io.ReadWriteCloser —
// the virtio-console port of a VM today, a Unix socket or an authenticated
// network connection later — with one code path, and the Client then runs
// processes in the guest with Exec: stdio streamed through io.Reader and
// io.Writer, TTY with resize, signals, exit status, typed spawn errors.
//
// Many execs run at once over the one channel. Each has its own credit
// windows (agentproto's flow control), so a slow Stdout writer of one exec
// stalls only that exec and the client buffers at most one window of output
// per exec. Everything the agent sends is validated; an agent that breaks
// the protocol, or a channel that dies, ends the Client: every pending and
// later call returns an error wrapping ErrAgentGone promptly.
package agentclient

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"syscall"
	"time"

	"github.com/gosandbox/sandbox/guest/agentproto"
)

// Errors. Spawn errors are *SpawnError values that match ErrExecNotFound,
// ErrPermission and ErrBadWorkingDir with errors.Is.
var (
	// ErrAgentGone means the channel to the guest agent broke (the VM
	// stopped, the agent died) or the agent broke the protocol; the
	// Client is unusable. Create a new sandbox.
	ErrAgentGone = errors.New("agentclient: the guest agent is gone (the VM stopped or the agent channel broke)")
	// ErrClosed means the Client was closed.
	ErrClosed = errors.New("agentclient: client closed")
	// ErrExecNotFound means the command does not exist in the guest (not
	// in PATH, or no such file).
	ErrExecNotFound = errors.New("agentclient: executable not found in the guest")
	// ErrPermission means the command is not executable by the user it
	// runs as.
	ErrPermission = errors.New("agentclient: permission denied starting the command")
	// ErrBadWorkingDir means Cmd.Dir does not exist or is not a directory
	// in the guest.
	ErrBadWorkingDir = errors.New("agentclient: working directory does not exist in the guest")
	// ErrSetup means the guest could not apply the boot setup the host
	// asked for (Options.Root or Options.Net); see *SetupError.
	ErrSetup = errors.New("agentclient: the guest could not set up the sandbox")
)

// SetupError is the error of a Dial whose boot setup failed in the guest
// (mounting the image, configuring the network).
type SetupError struct {
	Message string // the guest's description
}

// Error implements error.
func (e *SetupError) Error() string {
	return "agentclient: guest setup failed: " + e.Message
}

// Is matches ErrSetup.
func (e *SetupError) Is(target error) bool { return target == ErrSetup }

// SpawnError is the error of an Exec whose process could not be started.
type SpawnError struct {
	Argv0   string
	Kind    agentproto.SpawnKind
	Errno   syscall.Errno // the guest's errno, 0 if none
	Message string        // the agent's description
}

// Error implements error.
func (e *SpawnError) Error() string {
	return fmt.Sprintf("agentclient: cannot start %q in the guest: %v: %s", e.Argv0, e.Kind, e.Message)
}

// Is matches the sentinel error of the kind.
func (e *SpawnError) Is(target error) bool {
	switch e.Kind {
	case agentproto.SpawnNotFound:
		return target == ErrExecNotFound
	case agentproto.SpawnPermission:
		return target == ErrPermission
	case agentproto.SpawnBadDir:
		return target == ErrBadWorkingDir
	}
	return false
}

// Unwrap returns the errno, so errors.Is(err, syscall.ENOENT) works.
func (e *SpawnError) Unwrap() error {
	if e.Errno == 0 {
		return nil
	}
	return e.Errno
}

// Options configure Dial. The zero value is usable.
type Options struct {
	// Logger receives debug logs; nil discards them.
	Logger *slog.Logger
	// Hostname is the guest's hostname, at most 64 bytes; derive it from
	// a sandbox name with agentproto.Hostname. Empty leaves it alone.
	Hostname string
	// Env is added to the environment of every exec (KEY=value).
	Env []string
	// Now gives the time the guest's clock is set to; nil means
	// time.Now. Return the zero time to leave the guest clock alone.
	Now func() time.Time
	// Root, if set, makes the guest boot into an image.
	Root *agentproto.RootConfig
	// Net, if set, configures the guest's network interface.
	Net *agentproto.NetConfig
	// Window is the output credit granted to each exec, in bytes: the
	// most output the client buffers per exec; 0 means
	// agentproto.DefaultWindow.
	Window uint32
}

// Client is a connection to a guest agent. Its methods are safe for
// concurrent use.
type Client struct {
	rwc    io.ReadWriteCloser
	log    *slog.Logger
	opts   Options
	ready  agentproto.Ready
	reader *agentproto.Reader

	wmu  sync.Mutex
	wbuf []byte

	mu       sync.Mutex
	procs    map[uint32]*Process
	nextID   uint32
	err      error // set once when the client ends
	pings    map[string]chan struct{}
	pingSeq  uint64
	shutdown chan struct{} // closed on ShutdownAck
	ackOnce  sync.Once

	done      chan struct{} // closed when the read loop ended
	wg        sync.WaitGroup
	closeOnce sync.Once
}

// Dial runs the protocol handshake on rwc and returns a Client that owns
// rwc. ctx bounds the handshake only. On error rwc is closed.
func Dial(ctx context.Context, rwc io.ReadWriteCloser, opts Options) (*Client, error) {
	c := &Client{
		rwc:      rwc,
		log:      opts.Logger,
		opts:     opts,
		procs:    make(map[uint32]*Process),
		pings:    make(map[string]chan struct{}),
		shutdown: make(chan struct{}),
		done:     make(chan struct{}),
		reader:   agentproto.NewReader(rwc, agentproto.FromGuest),
	}
	if c.log == nil {
		c.log = slog.New(slog.DiscardHandler)
	}
	if c.opts.Window == 0 {
		c.opts.Window = agentproto.DefaultWindow
	}
	if c.opts.Window > agentproto.MaxWindow {
		rwc.Close()
		return nil, fmt.Errorf("agentclient: Options.Window %d is larger than %d", opts.Window, agentproto.MaxWindow)
	}
	if err := agentproto.ValidHostname(opts.Hostname); err != nil {
		rwc.Close()
		return nil, fmt.Errorf("agentclient: Options.Hostname: %w (derive it with agentproto.Hostname)", err)
	}
	hs := make(chan error, 1)
	go func() { hs <- c.handshake() }()
	var err error
	select {
	case err = <-hs:
	case <-ctx.Done():
		rwc.Close()
		<-hs
		err = fmt.Errorf("agentclient: waiting for the guest agent: %w", ctx.Err())
	}
	if err != nil {
		rwc.Close()
		return nil, err
	}
	c.wg.Go(c.readLoop)
	return c, nil
}

// DialUntil is Dial that also gives up when ended is closed, for example
// when the VM that runs the agent stops before its agent answers; the error
// then matches ErrAgentGone. ctx bounds the handshake only, as for Dial.
func DialUntil(ctx context.Context, rwc io.ReadWriteCloser, ended <-chan struct{}, opts Options) (*Client, error) {
	dctx, cancel := context.WithCancel(ctx)
	watched := make(chan struct{})
	go func() {
		defer close(watched)
		select {
		case <-ended:
			cancel()
		case <-dctx.Done():
		}
	}()
	c, err := Dial(dctx, rwc, opts)
	cancel()
	<-watched
	if err != nil && ctx.Err() == nil {
		select {
		case <-ended:
			return nil, fmt.Errorf("%w: it ended before it answered", ErrAgentGone)
		default:
		}
	}
	return c, err
}

func (c *Client) handshake() error {
	f, err := c.reader.ReadFrame()
	if err != nil {
		return c.gone(err)
	}
	var hello agentproto.Hello
	if f.Type != agentproto.TypeHello {
		return c.gone(fmt.Errorf("%w: first frame is %v, want hello", agentproto.ErrProtocol, f.Type))
	}
	if err := agentproto.Decode(f, &hello); err != nil {
		return c.gone(err)
	}
	v, err := agentproto.Negotiate(hello.MinVersion, hello.MaxVersion)
	if err != nil {
		return err
	}
	now := time.Now
	if c.opts.Now != nil {
		now = c.opts.Now
	}
	cfg := &agentproto.Config{Version: v, Hostname: c.opts.Hostname, Env: c.opts.Env, Root: c.opts.Root, Net: c.opts.Net}
	if t := now(); !t.IsZero() && t.UnixNano() > 0 {
		cfg.TimeUnixNano = t.UnixNano()
	}
	f, err = agentproto.Encode(agentproto.TypeConfig, 0, cfg)
	if err != nil {
		return fmt.Errorf("agentclient: %w", err)
	}
	if err := c.send(f); err != nil {
		return err
	}
	f, err = c.reader.ReadFrame()
	if err != nil {
		return c.gone(err)
	}
	if f.Type != agentproto.TypeReady {
		return c.gone(fmt.Errorf("%w: got %v, want ready", agentproto.ErrProtocol, f.Type))
	}
	if err := agentproto.Decode(f, &c.ready); err != nil {
		return c.gone(err)
	}
	if c.ready.Version != v {
		return c.gone(fmt.Errorf("%w: agent answered version %d, want %d", agentproto.ErrProtocol, c.ready.Version, v))
	}
	if c.ready.Failed != "" {
		return &SetupError{Message: c.ready.Failed}
	}
	c.log.Debug("agent ready", "version", v, "kernel", c.ready.Kernel, "warnings", c.ready.Warnings)
	return nil
}

func (c *Client) gone(cause error) error {
	return fmt.Errorf("%w: %w", ErrAgentGone, cause)
}

// Ready returns what the agent reported at the handshake: protocol
// version, hostname, kernel release and setup warnings.
func (c *Client) Ready() agentproto.Ready { return c.ready }

// Done returns a channel closed when the client has ended (closed, or the
// agent is gone); Err then says why.
func (c *Client) Done() <-chan struct{} { return c.done }

// Err returns nil while the client works, else why it ended.
func (c *Client) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// send writes one frame; writes are serialized.
func (c *Client) send(f agentproto.Frame) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.wbuf = agentproto.AppendFrame(c.wbuf[:0], &f)
	_, err := c.rwc.Write(c.wbuf)
	if cap(c.wbuf) > 2*agentproto.MaxData {
		c.wbuf = nil
	}
	if err != nil {
		if e := c.Err(); e != nil {
			return e
		}
		return c.gone(err)
	}
	return nil
}

func (c *Client) sendPayload(t agentproto.Type, id uint32, p agentproto.Payload) error {
	f, err := agentproto.Encode(t, id, p)
	if err != nil {
		return fmt.Errorf("agentclient: %w", err)
	}
	return c.send(f)
}

// fail ends the client with err (the first error wins), closes the channel
// and fails every process.
func (c *Client) fail(err error) {
	c.mu.Lock()
	if c.err == nil {
		c.err = err
	}
	err = c.err
	procs := c.procs
	c.procs = map[uint32]*Process{}
	c.mu.Unlock()
	c.rwc.Close()
	for _, p := range procs {
		p.fail(err)
	}
}

func (c *Client) readLoop() {
	defer close(c.done)
	for {
		f, err := c.reader.ReadFrame()
		if err != nil {
			c.fail(c.gone(err))
			return
		}
		if err := c.dispatch(f); err != nil {
			c.log.Debug("agent broke the protocol", "err", err)
			c.fail(c.gone(err))
			return
		}
	}
}

func (c *Client) dispatch(f agentproto.Frame) error {
	switch f.Type {
	case agentproto.TypePong:
		c.mu.Lock()
		ch := c.pings[string(f.Payload)]
		delete(c.pings, string(f.Payload))
		c.mu.Unlock()
		if ch != nil {
			close(ch)
		}
		return nil
	case agentproto.TypeShutdownAck:
		c.ackOnce.Do(func() { close(c.shutdown) })
		return nil
	case agentproto.TypeError:
		var ei agentproto.ErrorInfo
		if err := agentproto.Decode(f, &ei); err != nil {
			return err
		}
		c.log.Debug("agent rejected a frame", "id", f.ID, "code", ei.Code, "message", ei.Message)
		if p := c.lookup(f.ID); p != nil && !p.isStarted() {
			// The agent refused the Exec itself: fail that one exec.
			c.remove(f.ID)
			p.failStart(fmt.Errorf("agentclient: the agent rejected the exec: %s", ei.Message))
		}
		return nil
	case agentproto.TypeHello, agentproto.TypeReady:
		return fmt.Errorf("%w: %v after the handshake", agentproto.ErrProtocol, f.Type)
	}
	p := c.lookup(f.ID)
	if p == nil {
		// A stream this client never opened, or one already ended.
		if !c.opened(f.ID) {
			return fmt.Errorf("%w: %v for stream %d that was never opened", agentproto.ErrProtocol, f.Type, f.ID)
		}
		return nil
	}
	return p.onFrame(f)
}

// opened reports whether the client ever opened stream id.
func (c *Client) opened(id uint32) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return id <= c.nextID
}

func (c *Client) lookup(id uint32) *Process {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.procs[id]
}

func (c *Client) remove(id uint32) {
	c.mu.Lock()
	delete(c.procs, id)
	c.mu.Unlock()
}

// Ping checks that the agent answers.
func (c *Client) Ping(ctx context.Context) error {
	ch := make(chan struct{})
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return err
	}
	c.pingSeq++
	key := fmt.Sprintf("%016x", c.pingSeq)
	c.pings[key] = ch
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		delete(c.pings, key)
		c.mu.Unlock()
	}()
	if err := c.send(agentproto.Frame{Type: agentproto.TypePing, Payload: []byte(key)}); err != nil {
		return err
	}
	select {
	case <-ch:
		return nil
	case <-c.done:
		return c.Err()
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Shutdown asks the guest to sync and power off, and waits for the agent
// to acknowledge it (or for the channel to close, which a powered-off guest
// also does). The Client is unusable afterwards; call Close.
func (c *Client) Shutdown(ctx context.Context) error {
	if err := c.sendPayload(agentproto.TypeShutdown, 0, &agentproto.Shutdown{}); err != nil {
		return err
	}
	select {
	case <-c.shutdown:
		return nil
	case <-c.done:
		select {
		case <-c.shutdown:
			return nil
		default:
		}
		if errors.Is(c.Err(), ErrClosed) {
			return ErrClosed
		}
		return nil // the guest went away: powered off
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Close closes the channel, fails pending calls with ErrClosed and waits
// for the client's goroutines. A goroutine blocked inside a Cmd.Stdout or
// Cmd.Stderr Write is waited for until that Write returns. Safe to call
// twice.
func (c *Client) Close() error {
	c.closeOnce.Do(func() {
		c.fail(ErrClosed)
		c.wg.Wait()
	})
	return nil
}

// Run starts cmd and waits for it: Exec followed by Wait.
func (c *Client) Run(ctx context.Context, cmd Cmd) (ExitStatus, error) {
	p, err := c.Exec(ctx, cmd)
	if err != nil {
		return ExitStatus{}, err
	}
	return p.Wait(ctx)
}
