package agent

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/gosandbox/sandbox/guest/agentproto"
	"golang.org/x/sys/unix"
)

// credit is a stream's send window: the bytes of output the host still
// accepts.
type credit struct {
	mu     sync.Mutex
	cond   sync.Cond
	n      int64
	closed bool
}

func newCredit(n uint32) *credit {
	c := &credit{n: int64(n)}
	c.cond.L = &c.mu
	return c
}

func (c *credit) grant(n uint32) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.n+int64(n) > agentproto.MaxWindow {
		return fmt.Errorf("%w: window grows beyond %d bytes", agentproto.ErrBadPayload, agentproto.MaxWindow)
	}
	c.n += int64(n)
	c.cond.Broadcast()
	return nil
}

// take waits for credit and takes up to max bytes of it.
func (c *credit) take(max int) (int, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for c.n == 0 && !c.closed {
		c.cond.Wait()
	}
	if c.closed {
		return 0, false
	}
	k := int(min(c.n, int64(max)))
	c.n -= int64(k)
	return k, true
}

func (c *credit) close() {
	c.mu.Lock()
	c.closed = true
	c.cond.Broadcast()
	c.mu.Unlock()
}

// byteQueue holds stdin data received from the host and not yet written to
// the process, at most limit bytes (the credit the agent granted).
type byteQueue struct {
	mu     sync.Mutex
	cond   sync.Cond
	bufs   [][]byte
	size   int
	limit  int
	closed bool
}

func newByteQueue(limit int) *byteQueue {
	q := &byteQueue{limit: limit}
	q.cond.L = &q.mu
	return q
}

func (q *byteQueue) push(b []byte) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return fmt.Errorf("%w: stdin data after stdin was closed", agentproto.ErrBadPayload)
	}
	if q.size+len(b) > q.limit {
		return fmt.Errorf("%w: stdin data beyond the granted window", agentproto.ErrBadPayload)
	}
	q.bufs = append(q.bufs, b)
	q.size += len(b)
	q.cond.Signal()
	return nil
}

// pop waits for the next chunk; false means closed and drained.
func (q *byteQueue) pop() ([]byte, bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	for len(q.bufs) == 0 && !q.closed {
		q.cond.Wait()
	}
	if len(q.bufs) == 0 {
		return nil, false
	}
	b := q.bufs[0]
	q.bufs[0] = nil
	q.bufs = q.bufs[1:]
	return b, true
}

// consumed returns n bytes of window.
func (q *byteQueue) consumed(n int) {
	q.mu.Lock()
	q.size -= n
	q.mu.Unlock()
}

func (q *byteQueue) close() {
	q.mu.Lock()
	q.closed = true
	q.cond.Broadcast()
	q.mu.Unlock()
}

type stream struct {
	s      *server
	id     uint32
	tty    bool
	credit *credit
	stdinQ *byteQueue
	// ready is closed once the process runs; the fields below except
	// pid and exited are set before and not changed after.
	ready chan struct{}

	mu      sync.Mutex
	pid     int
	exited  bool
	outputs []*os.File // stdout, stderr pipes; or the pty master
	stdin   *os.File   // pipe write end, the pty master, or nil
}

func (st *stream) isReady() bool {
	select {
	case <-st.ready:
		return true
	default:
		return false
	}
}

func (st *stream) onStdin(b []byte) error {
	if st.stdin == nil {
		return fmt.Errorf("%w: stdin data for an exec without stdin", agentproto.ErrBadPayload)
	}
	return st.stdinQ.push(b)
}

func (st *stream) kill(sig unix.Signal, group bool) {
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.pid <= 0 || st.exited {
		return
	}
	if group {
		_ = unix.Kill(-st.pid, sig)
	}
	_ = unix.Kill(st.pid, sig)
}

func (st *stream) resize(rows, cols uint16) {
	if !st.tty {
		return
	}
	setWinsize(st.outputs[0], rows, cols)
}

// abort makes every goroutine of the stream return promptly.
func (st *stream) abort() {
	st.credit.close()
	st.stdinQ.close()
	past := time.Unix(1, 0)
	for _, f := range st.outputs {
		_ = f.SetReadDeadline(past)
	}
	if st.stdin != nil {
		_ = st.stdin.SetWriteDeadline(past)
	}
}

func spawnErr(kind agentproto.SpawnKind, errno syscall.Errno, format string, args ...any) *agentproto.SpawnError {
	msg := fmt.Sprintf(format, args...)
	if len(msg) > agentproto.MaxMessage {
		msg = msg[:agentproto.MaxMessage]
	}
	return &agentproto.SpawnError{Kind: kind, Errno: int(errno), Message: strings.ToValidUTF8(msg, "?")}
}

func (s *server) exec(id uint32, req *agentproto.ExecRequest) error {
	if s.opts.allowExec != nil && !s.opts.allowExec(req) {
		return s.sendPayload(agentproto.TypeSpawnError, id, spawnErr(agentproto.SpawnPermission, unix.EPERM, "exec refused"))
	}
	window := req.Window
	if window == 0 {
		window = agentproto.DefaultWindow
	}
	st := &stream{s: s, id: id, tty: req.TTY, ready: make(chan struct{}), credit: newCredit(window), stdinQ: newByteQueue(int(s.opts.Window))}
	s.mu.Lock()
	_, busy := s.streams[id]
	n := len(s.streams)
	if !busy && n < s.opts.MaxStreams {
		s.streams[id] = st
	}
	s.mu.Unlock()
	if busy {
		return s.sendError(id, agentproto.ErrorCodeProtocol, "exec on a stream id that is in use")
	}
	if n >= s.opts.MaxStreams {
		return s.sendPayload(agentproto.TypeSpawnError, id, spawnErr(agentproto.SpawnOther, unix.EAGAIN, "too many concurrent execs (%d)", n))
	}
	// Spawning can be slow (an executable on a lazily fetched image):
	// do it off the read loop so the other streams keep flowing.
	s.goSafe(func() {
		if serr := s.start(st, req); serr != nil {
			s.mu.Lock()
			delete(s.streams, id)
			s.mu.Unlock()
			s.log.Debug("spawn failed", "id", id, "argv0", req.Argv[0], "kind", serr.Kind, "message", serr.Message)
			_ = s.sendPayload(agentproto.TypeSpawnError, id, serr)
		}
	})
	return nil
}

// start spawns the process and its goroutines, sending Started.
func (s *server) start(st *stream, req *agentproto.ExecRequest) *agentproto.SpawnError {
	id := st.id
	env := mergeEnv(s.env, req.Env)
	if req.TTY {
		if _, ok := lookupEnv(env, "TERM"); !ok {
			env = append(env, "TERM=xterm")
		}
	}
	dir := req.Dir
	if dir == "" {
		dir = "/"
	}
	if fi, err := os.Stat(dir); err != nil {
		return spawnErr(agentproto.SpawnBadDir, errnoOf(err), "working directory %s: %v", dir, err)
	} else if !fi.IsDir() {
		return spawnErr(agentproto.SpawnBadDir, unix.ENOTDIR, "working directory %s is not a directory", dir)
	}
	path, serr := resolveExec(req.Argv[0], dir, env)
	if serr != nil {
		return serr
	}

	var childFiles []*os.File
	closeChild := func() {
		for _, f := range childFiles {
			f.Close()
		}
	}
	closeParent := func() {
		for _, f := range st.outputs {
			f.Close()
		}
		if st.stdin != nil && !req.TTY {
			st.stdin.Close()
		}
	}
	sys := &syscall.SysProcAttr{Setsid: true}
	if req.User != "" && req.UID == nil && req.GID == nil {
		u, err := resolveUser(req.User, readDB("/etc/passwd"), readDB("/etc/group"))
		if err != nil {
			return spawnErr(agentproto.SpawnOther, 0, "%v", err)
		}
		sys.Credential = &syscall.Credential{Uid: u.uid, Gid: u.gid, Groups: u.groups}
		if _, ok := lookupEnv(req.Env, "HOME"); !ok && u.home != "" {
			env = mergeEnv(env, []string{"HOME=" + u.home})
		}
	} else if req.UID != nil || req.GID != nil {
		cred := &syscall.Credential{}
		if req.UID != nil {
			cred.Uid = *req.UID
			cred.Gid = *req.UID
		}
		if req.GID != nil {
			cred.Gid = *req.GID
		}
		sys.Credential = cred
	}
	if req.TTY {
		master, slave, err := openPTY()
		if err != nil {
			return spawnErr(agentproto.SpawnOther, errnoOf(err), "pseudo-terminal: %v", err)
		}
		setWinsize(master, req.Rows, req.Cols)
		st.outputs = []*os.File{master}
		if req.Stdin {
			st.stdin = master
		}
		childFiles = []*os.File{slave, slave, slave}
		sys.Setctty = true
		sys.Ctty = 0
	} else {
		var in *os.File
		if req.Stdin {
			r, w, err := os.Pipe()
			if err != nil {
				return spawnErr(agentproto.SpawnOther, errnoOf(err), "stdin pipe: %v", err)
			}
			in, st.stdin = r, w
		} else {
			f, err := os.Open(os.DevNull)
			if err != nil {
				return spawnErr(agentproto.SpawnOther, errnoOf(err), "%s: %v", os.DevNull, err)
			}
			in = f
		}
		childFiles = append(childFiles, in)
		for range 2 {
			r, w, err := os.Pipe()
			if err != nil {
				closeChild()
				closeParent()
				return spawnErr(agentproto.SpawnOther, errnoOf(err), "output pipe: %v", err)
			}
			st.outputs = append(st.outputs, r)
			childFiles = append(childFiles, w)
		}
	}
	fds := make([]uintptr, len(childFiles))
	for i, f := range childFiles {
		fds[i] = f.Fd()
	}
	attr := &syscall.ProcAttr{Dir: dir, Env: env, Files: fds, Sys: sys}
	pid, status, err := s.spawn.start(func() (int, error) {
		return syscall.ForkExec(path, req.Argv, attr)
	})
	closeChild()
	if err != nil {
		closeParent()
		errno := errnoOf(err)
		switch errno {
		case unix.ENOENT:
			return spawnErr(agentproto.SpawnNotFound, errno, "%s: %v", req.Argv[0], err)
		case unix.EACCES, unix.EPERM:
			return spawnErr(agentproto.SpawnPermission, errno, "%s: %v", req.Argv[0], err)
		}
		return spawnErr(agentproto.SpawnOther, errno, "%s: %v", req.Argv[0], err)
	}
	st.mu.Lock()
	st.pid = pid
	st.mu.Unlock()
	// Publish the stream to the read loop. If Serve is tearing down, it
	// did not see this stream as ready, so end the process here.
	s.mu.Lock()
	closing := s.closing
	close(st.ready)
	s.mu.Unlock()
	if closing {
		st.kill(unix.SIGKILL, true)
		st.abort()
	}
	started := &agentproto.Started{PID: pid}
	if st.stdin != nil {
		started.Window = s.opts.Window
	}
	// Started goes out before any output frame: the pumps start after it.
	_ = s.sendPayload(agentproto.TypeStarted, id, started)
	s.log.Debug("started", "id", id, "pid", pid, "argv0", req.Argv[0])

	var pumps sync.WaitGroup
	types := []agentproto.Type{agentproto.TypeStdout, agentproto.TypeStderr}
	for i, f := range st.outputs {
		pumps.Add(1)
		s.goSafe(func() {
			defer pumps.Done()
			st.pump(f, types[i])
		})
	}
	stdinDone := make(chan struct{})
	if st.stdin != nil {
		s.goSafe(func() {
			defer close(stdinDone)
			st.feedStdin()
		})
	} else {
		close(stdinDone)
	}
	s.goSafe(func() { st.wait(status, &pumps, stdinDone) })
	return nil
}

// pump moves one output file to the host within the stream's credit. It
// reads first and then waits for credit, rather than reserving credit for a
// read that may never return (stderr often stays silent while stdout needs
// the whole window); a pump holds at most one read buffer of data.
func (st *stream) pump(f *os.File, t agentproto.Type) {
	buf := make([]byte, agentproto.MaxData)
	for {
		st.mu.Lock()
		exited := st.exited
		st.mu.Unlock()
		if exited {
			_ = f.SetReadDeadline(time.Now().Add(st.s.opts.OutputGrace))
		}
		n, err := f.Read(buf)
		data := buf[:n]
		for len(data) > 0 {
			k, ok := st.credit.take(len(data))
			if !ok {
				return
			}
			if st.s.send(agentproto.Frame{Type: t, ID: st.id, Payload: data[:k]}) != nil {
				return
			}
			data = data[k:]
		}
		if err != nil { // EOF, EIO from a pty whose slave closed, or the grace deadline
			return
		}
	}
}

// feedStdin writes the host's stdin data to the process and returns credit.
func (st *stream) feedStdin() {
	broken := false
	for {
		b, ok := st.stdinQ.pop()
		if !ok {
			break
		}
		if !broken {
			if _, err := st.stdin.Write(b); err != nil {
				broken = true // the process closed its stdin: drop the rest
			}
		}
		st.stdinQ.consumed(len(b))
		if st.s.send(agentproto.Frame{Type: agentproto.TypeWindow, ID: st.id, Payload: agentproto.WindowPayload(uint32(len(b)))}) != nil {
			return
		}
	}
	if st.tty {
		if !broken {
			_, _ = st.stdin.Write([]byte{4}) // VEOF: the line discipline reports end of file
		}
		return
	}
	st.stdin.Close()
}

// wait reports the process's exit after its output.
func (st *stream) wait(status <-chan unix.WaitStatus, pumps *sync.WaitGroup, stdinDone <-chan struct{}) {
	ws := <-status
	st.mu.Lock()
	st.exited = true
	st.mu.Unlock()
	grace := time.Now().Add(st.s.opts.OutputGrace)
	for _, f := range st.outputs {
		_ = f.SetReadDeadline(grace)
	}
	pumps.Wait()
	if st.stdin != nil {
		st.stdinQ.close()
		_ = st.stdin.SetWriteDeadline(time.Now())
	}
	<-stdinDone
	for _, f := range st.outputs {
		f.Close()
	}
	if st.stdin != nil && !st.tty {
		st.stdin.Close()
	}
	exit := &agentproto.Exit{}
	switch {
	case ws.Signaled():
		exit.Signal = int(ws.Signal())
		exit.Core = ws.CoreDump()
	case ws.Exited():
		exit.Code = ws.ExitStatus()
	default:
		exit.Code = 255
	}
	s := st.s
	_ = s.sendPayload(agentproto.TypeExit, st.id, exit)
	s.log.Debug("exited", "id", st.id, "pid", st.pid, "code", exit.Code, "signal", exit.Signal)
	s.mu.Lock()
	delete(s.streams, st.id)
	s.mu.Unlock()
}

// resolveExec finds the executable for argv0 the way execvp does, with
// typed errors for the cases the host distinguishes.
func resolveExec(argv0, dir string, env []string) (string, *agentproto.SpawnError) {
	check := func(p string) (bool, *agentproto.SpawnError) {
		fi, err := os.Stat(p)
		if err != nil {
			if errors.Is(err, os.ErrNotExist) || errnoOf(err) == unix.ENOTDIR {
				return false, nil
			}
			return false, spawnErr(agentproto.SpawnPermission, errnoOf(err), "%s: %v", p, err)
		}
		if fi.IsDir() || fi.Mode()&0o111 == 0 {
			return false, spawnErr(agentproto.SpawnPermission, unix.EACCES, "%s: permission denied (not an executable file)", p)
		}
		return true, nil
	}
	if strings.Contains(argv0, "/") {
		p := argv0
		if !filepath.IsAbs(p) {
			p = filepath.Join(dir, p)
		}
		ok, serr := check(p)
		if serr != nil {
			return "", serr
		}
		if !ok {
			return "", spawnErr(agentproto.SpawnNotFound, unix.ENOENT, "%s: no such file", argv0)
		}
		return p, nil
	}
	pathEnv, ok := lookupEnv(env, "PATH")
	if !ok {
		pathEnv, _ = lookupEnv(defaultEnv, "PATH")
	}
	var denied *agentproto.SpawnError
	for _, d := range filepath.SplitList(pathEnv) {
		if d == "" {
			d = "."
		}
		if !filepath.IsAbs(d) {
			d = filepath.Join(dir, d)
		}
		p := filepath.Join(d, argv0)
		ok, serr := check(p)
		if ok {
			return p, nil
		}
		if serr != nil && denied == nil {
			denied = serr
		}
	}
	if denied != nil {
		return "", denied
	}
	return "", spawnErr(agentproto.SpawnNotFound, unix.ENOENT, "%s: command not found in PATH %s", argv0, pathEnv)
}

func errnoOf(err error) syscall.Errno {
	var e syscall.Errno
	if errors.As(err, &e) {
		return e
	}
	return 0
}
