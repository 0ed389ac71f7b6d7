package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"runtime/debug"
	"strings"
	"sync"
	"time"

	"github.com/gosandbox/sandbox/guest/agentproto"
	"golang.org/x/sys/unix"
)

// DefaultEnv is the base environment of every exec unless Options.Env says
// otherwise.
var defaultEnv = []string{
	"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
	"HOME=/root",
}

// DefaultEnv returns the base environment every exec gets unless
// Options.Env replaces it.
func DefaultEnv() []string { return append([]string(nil), defaultEnv...) }

// Options configure Serve. The zero value serves with no setup hook, the
// default environment, a per-process waiter and a silent logger.
type Options struct {
	// Logger receives debug logs; nil discards them.
	Logger *slog.Logger
	// Env is the base environment of every exec; nil means DefaultEnv().
	// The host's Config.Env and the exec's own Env are merged over it.
	Env []string
	// Setup applies the host's Config (clock, hostname, root file system,
	// network) before the agent reports Ready, and returns warnings for
	// steps that failed harmlessly. An error means the sandbox is unusable:
	// the agent reports it in Ready.Failed and Serve returns a
	// *SetupFailed. Nil applies nothing (for an agent that is not PID 1).
	Setup func(agentproto.Config) ([]string, error)
	// Reaper, if set, is the PID 1 reaper the agent starts processes
	// through. Nil waits for each child by its pid, which is right for an
	// agent that shares its process with other code (tests).
	Reaper *Reaper
	// Window is the stdin credit granted per stream; 0 means
	// agentproto.DefaultWindow.
	Window uint32
	// MaxStreams caps concurrent execs; 0 means 1024.
	MaxStreams int
	// OutputGrace is how long output pipes may stay idle after the
	// process exited before they are closed; 0 means 250ms.
	OutputGrace time.Duration
	// Agent describes this agent build in the Hello frame.
	Agent string

	// allowExec, if set, vets each exec before it is spawned (tests that
	// feed the agent hostile input use it to keep it from running them).
	allowExec func(*agentproto.ExecRequest) bool
}

// ErrChannelClosed means the host end of the channel went away.
var ErrChannelClosed = errors.New("agent: channel to the host closed")

// SetupFailed is the error Serve returns when Options.Setup failed; the
// host was told.
type SetupFailed struct {
	Err error
}

// Error implements error.
func (s *SetupFailed) Error() string { return "agent: setup failed: " + s.Err.Error() }

// Unwrap returns the setup error.
func (s *SetupFailed) Unwrap() error { return s.Err }

// ShutdownRequest is the error Serve returns when the host asked the guest
// to power off (Reboot false) or reboot. The caller does it.
type ShutdownRequest struct {
	Reboot bool
}

// Error implements error.
func (s *ShutdownRequest) Error() string {
	if s.Reboot {
		return "agent: host requested reboot"
	}
	return "agent: host requested power off"
}

type server struct {
	opts   Options
	log    *slog.Logger
	rwc    io.ReadWriteCloser
	spawn  spawner
	env    []string
	ctx    context.Context
	cancel context.CancelFunc

	wmu  sync.Mutex
	wbuf []byte
	werr error

	mu       sync.Mutex
	streams  map[uint32]*stream
	panicErr error // set when a goroutine of the agent panicked
	closing  bool  // teardown started: streams that become ready now must end
	wg       sync.WaitGroup
}

// ErrPanic is wrapped by the error Serve returns when the agent itself
// panicked; the panic is recovered so that PID 1 can power off cleanly.
var ErrPanic = errors.New("agent: internal error (panic)")

// goSafe runs fn on a goroutine that Serve waits for; a panic in fn ends
// Serve with ErrPanic instead of the process.
func (s *server) goSafe(fn func()) {
	s.wg.Go(func() {
		defer func() {
			if r := recover(); r != nil {
				s.mu.Lock()
				if s.panicErr == nil {
					s.panicErr = fmt.Errorf("%w: %v\n%s", ErrPanic, r, debug.Stack())
				}
				s.mu.Unlock()
				s.cancel()
			}
		}()
		fn()
	})
}

// Serve speaks the agent protocol on rwc until the host goes away, asks
// for a shutdown (*ShutdownRequest), breaks the protocol (an error wrapping
// agentproto.ErrProtocol) or ctx ends. Before it returns it closes rwc,
// kills every process it started (SIGKILL to the process group) and waits
// for all its goroutines.
func Serve(ctx context.Context, rwc io.ReadWriteCloser, opts Options) (err error) {
	s := &server{
		opts:    opts,
		log:     opts.Logger,
		rwc:     rwc,
		streams: make(map[uint32]*stream),
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	if opts.Reaper != nil {
		s.spawn = opts.Reaper
	} else {
		s.spawn = pidWaiter{}
	}
	if s.opts.Window == 0 {
		s.opts.Window = agentproto.DefaultWindow
	}
	if s.opts.MaxStreams == 0 {
		s.opts.MaxStreams = 1024
	}
	if s.opts.OutputGrace == 0 {
		s.opts.OutputGrace = 250 * time.Millisecond
	}
	s.env = opts.Env
	if s.env == nil {
		s.env = DefaultEnv()
	}
	s.ctx, s.cancel = context.WithCancel(ctx)
	stop := context.AfterFunc(s.ctx, func() { rwc.Close() })
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("%w: %v\n%s", ErrPanic, r, debug.Stack())
		}
		stop()
		s.cancel()
		rwc.Close()
		s.teardown()
		s.mu.Lock()
		if s.panicErr != nil {
			err = s.panicErr
		}
		s.mu.Unlock()
	}()
	err = s.serve()
	if ctx.Err() != nil && !isShutdown(err) {
		return ctx.Err()
	}
	return err
}

func isShutdown(err error) bool {
	var sr *ShutdownRequest
	return errors.As(err, &sr)
}

func (s *server) teardown() {
	s.mu.Lock()
	s.closing = true
	for _, st := range s.streams {
		if st.isReady() {
			st.kill(unix.SIGKILL, true)
			st.abort()
		}
	}
	s.mu.Unlock()
	s.wg.Wait()
}

func (s *server) serve() error {
	hello := &agentproto.Hello{Magic: agentproto.Magic, MinVersion: agentproto.MinVersion, MaxVersion: agentproto.Version, Agent: s.opts.Agent}
	if err := s.sendPayload(agentproto.TypeHello, 0, hello); err != nil {
		return err
	}
	r := agentproto.NewReader(s.rwc, agentproto.FromHost)
	f, err := r.ReadFrame()
	if err != nil {
		return s.readErr(err)
	}
	if f.Type != agentproto.TypeConfig {
		return fmt.Errorf("%w: first host frame is %v, want config", agentproto.ErrProtocol, f.Type)
	}
	var cfg agentproto.Config
	if err := agentproto.Decode(f, &cfg); err != nil {
		return err
	}
	var warnings []string
	var setupErr error
	if s.opts.Setup != nil {
		warnings, setupErr = s.opts.Setup(cfg)
	}
	if len(warnings) > 64 {
		warnings = warnings[:64]
	}
	for i, w := range warnings {
		if len(w) > agentproto.MaxMessage {
			warnings[i] = w[:agentproto.MaxMessage]
		}
		warnings[i] = strings.ReplaceAll(warnings[i], "\x00", "")
	}
	s.env = mergeEnv(s.env, cfg.Env)
	var uts unix.Utsname
	_ = unix.Uname(&uts)
	host := unix.ByteSliceToString(uts.Nodename[:])
	if len(host) > agentproto.MaxHostnameLen {
		host = ""
	}
	ready := &agentproto.Ready{Version: cfg.Version, Hostname: strings.ToValidUTF8(host, "?"), Kernel: unix.ByteSliceToString(uts.Release[:]), Warnings: warnings}
	if setupErr != nil {
		msg := strings.ReplaceAll(strings.ToValidUTF8(setupErr.Error(), "?"), "\x00", "")
		if len(msg) > agentproto.MaxMessage {
			msg = msg[:agentproto.MaxMessage]
		}
		ready.Failed = msg
	}
	if err := s.sendPayload(agentproto.TypeReady, 0, ready); err != nil {
		return err
	}
	if setupErr != nil {
		return &SetupFailed{Err: setupErr}
	}
	s.log.Debug("agent ready", "version", cfg.Version)
	for {
		f, err := r.ReadFrame()
		if err != nil {
			return s.readErr(err)
		}
		if err := s.dispatch(f); err != nil {
			return err
		}
	}
}

func (s *server) readErr(err error) error {
	if errors.Is(err, agentproto.ErrProtocol) {
		return err
	}
	return fmt.Errorf("%w: %w", ErrChannelClosed, err)
}

// send writes one frame; writes are serialized and a write error is sticky
// and ends Serve.
func (s *server) send(f agentproto.Frame) error {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	if s.werr != nil {
		return s.werr
	}
	s.wbuf = agentproto.AppendFrame(s.wbuf[:0], &f)
	if _, err := s.rwc.Write(s.wbuf); err != nil {
		s.werr = fmt.Errorf("%w: %w", ErrChannelClosed, err)
		s.cancel()
		return s.werr
	}
	if cap(s.wbuf) > 2*agentproto.MaxData {
		s.wbuf = nil
	}
	return nil
}

func (s *server) sendPayload(t agentproto.Type, id uint32, p agentproto.Payload) error {
	f, err := agentproto.Encode(t, id, p)
	if err != nil {
		return err
	}
	return s.send(f)
}

func (s *server) sendError(id uint32, code int, msg string) error {
	if len(msg) > agentproto.MaxMessage {
		msg = msg[:agentproto.MaxMessage]
	}
	return s.sendPayload(agentproto.TypeError, id, &agentproto.ErrorInfo{Code: code, Message: strings.ToValidUTF8(strings.ReplaceAll(msg, "\x00", ""), "?")})
}

func (s *server) lookup(id uint32) *stream {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.streams[id]
}

// dispatch handles one frame from the host. A frame that breaks the rules
// but leaves the stream in sync is answered with an Error frame; only a
// failure to write ends the connection.
func (s *server) dispatch(f agentproto.Frame) error {
	switch f.Type {
	case agentproto.TypePing:
		return s.send(agentproto.Frame{Type: agentproto.TypePong, Payload: f.Payload})
	case agentproto.TypeShutdown:
		var sd agentproto.Shutdown
		if err := agentproto.Decode(f, &sd); err != nil {
			return s.sendError(0, agentproto.ErrorCodeProtocol, err.Error())
		}
		if err := s.send(agentproto.Frame{Type: agentproto.TypeShutdownAck}); err != nil {
			return err
		}
		return &ShutdownRequest{Reboot: sd.Reboot}
	case agentproto.TypeConfig:
		return s.sendError(0, agentproto.ErrorCodeProtocol, "config after the handshake")
	case agentproto.TypeExec:
		var req agentproto.ExecRequest
		if err := agentproto.Decode(f, &req); err != nil {
			return s.sendError(f.ID, agentproto.ErrorCodeProtocol, err.Error())
		}
		return s.exec(f.ID, &req)
	case agentproto.TypeError:
		var ei agentproto.ErrorInfo
		if err := agentproto.Decode(f, &ei); err == nil {
			s.log.Debug("host reported an error", "id", f.ID, "code", ei.Code, "message", ei.Message)
		}
		return nil
	}
	st := s.lookup(f.ID)
	if st == nil {
		return nil // the stream ended; this frame crossed its Exit
	}
	if !st.isReady() {
		return s.sendError(f.ID, agentproto.ErrorCodeProtocol, fmt.Sprintf("%v before the exec started", f.Type))
	}
	var err error
	switch f.Type {
	case agentproto.TypeStdin:
		err = st.onStdin(f.Payload)
	case agentproto.TypeStdinClose:
		st.stdinQ.close()
	case agentproto.TypeWindow:
		var n uint32
		if n, err = agentproto.ParseWindow(f); err == nil {
			err = st.credit.grant(n)
		}
	case agentproto.TypeResize:
		var rs agentproto.Resize
		if err = agentproto.Decode(f, &rs); err == nil {
			st.resize(rs.Rows, rs.Cols)
		}
	case agentproto.TypeSignal:
		var sg agentproto.Signal
		if err = agentproto.Decode(f, &sg); err == nil {
			st.kill(unix.Signal(sg.Signal), sg.Group)
		}
	}
	if err != nil {
		return s.sendError(f.ID, agentproto.ErrorCodeProtocol, err.Error())
	}
	return nil
}

// mergeEnv returns base with each KEY=value of over replacing base's KEY.
func mergeEnv(base, over []string) []string {
	out := make([]string, 0, len(base)+len(over))
	idx := make(map[string]int, len(base)+len(over))
	for _, list := range [][]string{base, over} {
		for _, kv := range list {
			k, _, _ := strings.Cut(kv, "=")
			if i, ok := idx[k]; ok {
				out[i] = kv
				continue
			}
			idx[k] = len(out)
			out = append(out, kv)
		}
	}
	return out
}

func lookupEnv(env []string, key string) (string, bool) {
	for i := len(env) - 1; i >= 0; i-- {
		if k, v, ok := strings.Cut(env[i], "="); ok && k == key {
			return v, true
		}
	}
	return "", false
}
