package agentclient_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/gosandbox/sandbox/guest/agent"
	"github.com/gosandbox/sandbox/guest/agentclient"
	"github.com/gosandbox/sandbox/guest/agentproto"
	"github.com/gosandbox/sandbox/guest/internal/guesttest"
)

func TestMain(m *testing.M) {
	code := m.Run()
	guesttest.Cleanup()
	os.Exit(code)
}

type env struct {
	c      *agentclient.Client
	served chan error
	bin    string
}

// start runs the agent in-process on one end of a socketpair, with the
// guest userland in PATH, and dials it from the other end.
func start(tb testing.TB, opts agentclient.Options) *env {
	tb.Helper()
	bin := guesttest.Userland(tb)
	host, guest := guesttest.SocketPair(tb)
	e := &env{served: make(chan error, 1), bin: bin}
	go func() {
		e.served <- agent.Serve(context.Background(), guest, agent.Options{
			Env: []string{"PATH=" + bin, "HOME=/"},
		})
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := agentclient.Dial(ctx, host, opts)
	if err != nil {
		tb.Fatalf("Dial = %v", err)
	}
	e.c = c
	tb.Cleanup(func() {
		c.Close()
		<-e.served
	})
	return e
}

func ctxT(tb testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	tb.Cleanup(cancel)
	return ctx
}

func run(t *testing.T, c *agentclient.Client, cmd agentclient.Cmd) (agentclient.ExitStatus, string, string) {
	t.Helper()
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	st, err := c.Run(ctxT(t), cmd)
	if err != nil {
		t.Fatalf("Run(%q) = %v", cmd.Args, err)
	}
	return st, out.String(), errb.String()
}

func TestExitCodes(t *testing.T) {
	e := start(t, agentclient.Options{})
	tests := []struct {
		args []string
		code int
	}{
		{[]string{"true"}, 0},
		{[]string{"false"}, 1},
		{[]string{"sh", "-c", "exit 3"}, 3},
		{[]string{"sh", "-c", "no-such-command-here"}, 127},
	}
	for _, tt := range tests {
		st, _, _ := run(t, e.c, agentclient.Cmd{Args: tt.args})
		if st.Code != tt.code || st.Signal != 0 {
			t.Errorf("Run(%q) = %v, want exit status %d", tt.args, st, tt.code)
		}
	}
}

func TestStdoutStderrApart(t *testing.T) {
	e := start(t, agentclient.Options{})
	st, out, errs := run(t, e.c, agentclient.Cmd{Args: []string{"sh", "-c", "echo to-out; echo to-err >&2; echo more-out"}})
	if !st.Success() || out != "to-out\nmore-out\n" || errs != "to-err\n" {
		t.Errorf("Run = %v, stdout %q, stderr %q; want success, %q, %q", st, out, errs, "to-out\nmore-out\n", "to-err\n")
	}
}

func TestEnvDirHostnameConfig(t *testing.T) {
	e := start(t, agentclient.Options{Env: []string{"FROM_HOST=1"}})
	_, out, _ := run(t, e.c, agentclient.Cmd{Args: []string{"sh", "-c", "echo $FROM_HOST $OWN; pwd"}, Env: []string{"OWN=2"}, Dir: "/tmp"})
	if out != "1 2\n/tmp\n" {
		t.Errorf("output %q, want %q", out, "1 2\n/tmp\n")
	}
	if r := e.c.Ready(); r.Version != agentproto.Version || r.Kernel == "" {
		t.Errorf("Ready() = %+v", r)
	}
}

func TestStdinThroughCat(t *testing.T) {
	e := start(t, agentclient.Options{})
	in := make([]byte, 3<<20+17)
	for i := range in {
		in[i] = byte(i * 7)
	}
	st, out, _ := run(t, e.c, agentclient.Cmd{Args: []string{"cat"}, Stdin: bytes.NewReader(in)})
	if !st.Success() || out != string(in) {
		t.Errorf("cat: %v, %d bytes out, want %d identical bytes", st, len(out), len(in))
	}
	// Empty stdin: cat sees EOF at once.
	st, out, _ = run(t, e.c, agentclient.Cmd{Args: []string{"cat"}, Stdin: strings.NewReader("")})
	if !st.Success() || out != "" {
		t.Errorf("cat of empty stdin: %v, %q", st, out)
	}
}

func TestLargeOutputHash(t *testing.T) {
	e := start(t, agentclient.Options{})
	const n = 64 << 20
	want := sha256.Sum256(bytes.Repeat([]byte("y\n"), n/2))
	h := sha256.New()
	cw := &countWriter{w: h}
	var errb bytes.Buffer
	st, err := e.c.Run(ctxT(t), agentclient.Cmd{Args: []string{"sh", "-c", "yes | head -c 64M"}, Stdout: cw, Stderr: &errb})
	if err != nil || !st.Success() {
		t.Fatalf("Run = %v, %v (stderr %q)", st, err, errb.String())
	}
	if cw.n != n || !bytes.Equal(h.Sum(nil), want[:]) {
		t.Errorf("got %d bytes with sha256 %x, want %d bytes with %x", cw.n, h.Sum(nil), n, want)
	}
	// The same through the guest's own sha256sum.
	_, out, _ := run(t, e.c, agentclient.Cmd{Args: []string{"sh", "-c", "yes | head -c 64M | sha256sum"}})
	if got := strings.Fields(out); len(got) == 0 || got[0] != fmt.Sprintf("%x", want) {
		t.Errorf("guest sha256sum = %q, want %x", out, want)
	}
}

type countWriter struct {
	w io.Writer
	n int
}

func (c *countWriter) Write(b []byte) (int, error) {
	c.n += len(b)
	return c.w.Write(b)
}

func TestSignal(t *testing.T) {
	e := start(t, agentclient.Options{})
	p, err := e.c.Exec(ctxT(t), agentclient.Cmd{Args: []string{"sleep", "100"}})
	if err != nil {
		t.Fatalf("Exec = %v", err)
	}
	if p.PID() <= 0 {
		t.Errorf("PID() = %d", p.PID())
	}
	if err := p.Signal(syscall.SIGTERM); err != nil {
		t.Fatalf("Signal = %v", err)
	}
	st, err := p.Wait(ctxT(t))
	if err != nil || st.Signal != syscall.SIGTERM || st.Code != 0 {
		t.Errorf("Wait = %v, %v; want killed by SIGTERM", st, err)
	}
	if err := p.Signal(syscall.SIGTERM); !errors.Is(err, os.ErrProcessDone) {
		t.Errorf("Signal after exit = %v, want os.ErrProcessDone", err)
	}
}

func TestTTYSizeAndResize(t *testing.T) {
	e := start(t, agentclient.Options{})
	st, out, _ := run(t, e.c, agentclient.Cmd{Args: []string{"stty", "size"}, TTY: true, Rows: 24, Cols: 80})
	if !st.Success() || strings.TrimSpace(out) != "24 80" {
		t.Errorf("stty size = %v, %q; want \"24 80\"", st, out)
	}

	pr, pw := io.Pipe()
	var buf syncBuffer
	p, err := e.c.Exec(ctxT(t), agentclient.Cmd{Args: []string{"sh", "-c", "stty -echo; echo ready; read x; stty size"}, TTY: true, Rows: 24, Cols: 80, Stdin: pr, Stdout: &buf})
	if err != nil {
		t.Fatalf("Exec = %v", err)
	}
	waitFor(t, &buf, "ready")
	if err := p.Resize(50, 132); err != nil {
		t.Fatalf("Resize = %v", err)
	}
	io.WriteString(pw, "go\n")
	st, err = p.Wait(ctxT(t))
	pw.Close()
	if err != nil || !st.Success() || !strings.Contains(buf.String(), "50 132") {
		t.Errorf("after Resize(50, 132): %v, %v, output %q", st, err, buf.String())
	}
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func waitFor(t *testing.T, b *syncBuffer, s string) {
	t.Helper()
	ctx := ctxT(t)
	for !strings.Contains(b.String(), s) {
		select {
		case <-ctx.Done():
			t.Fatalf("output %q never contained %q", b.String(), s)
		case <-time.After(5 * time.Millisecond):
		}
	}
}

func TestConcurrentExecs(t *testing.T) {
	e := start(t, agentclient.Options{})
	var wg sync.WaitGroup
	errs := make(chan error, 20)
	for i := range 20 {
		wg.Go(func() {
			var out bytes.Buffer
			n := 1000 * (i + 1)
			st, err := e.c.Run(ctxT(t), agentclient.Cmd{Args: []string{"sh", "-c", fmt.Sprintf("seq %d | wc -l; echo id-%d", n, i)}, Stdout: &out})
			want := fmt.Sprintf("%d\nid-%d\n", n, i)
			if err != nil || !st.Success() || out.String() != want {
				errs <- fmt.Errorf("exec %d: %v, %v, %q; want %q", i, st, err, out.String(), want)
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// blockingWriter blocks every Write until released.
type blockingWriter struct{ release chan struct{} }

func (b *blockingWriter) Write(p []byte) (int, error) {
	<-b.release
	return len(p), nil
}

// A process whose output nobody reads must not stall the others: credit
// windows keep its output in the guest's pipe.
func TestSlowReaderDoesNotStallOthers(t *testing.T) {
	e := start(t, agentclient.Options{Window: 64 << 10})
	bw := &blockingWriter{release: make(chan struct{})}
	p, err := e.c.Exec(ctxT(t), agentclient.Cmd{Args: []string{"sh", "-c", "yes | head -c 32M"}, Stdout: bw})
	if err != nil {
		t.Fatalf("Exec = %v", err)
	}
	for i := range 5 {
		st, out, _ := run(t, e.c, agentclient.Cmd{Args: []string{"echo", fmt.Sprint(i)}})
		if !st.Success() || out != fmt.Sprintf("%d\n", i) {
			t.Errorf("echo while another exec is stalled: %v, %q", st, out)
		}
	}
	close(bw.release)
	if st, err := p.Wait(ctxT(t)); err != nil || !st.Success() {
		t.Errorf("stalled exec: Wait = %v, %v", st, err)
	}
}

func TestExecTimeout(t *testing.T) {
	e := start(t, agentclient.Options{})
	p, err := e.c.Exec(ctxT(t), agentclient.Cmd{Args: []string{"sleep", "100"}})
	if err != nil {
		t.Fatalf("Exec = %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if _, err := p.Wait(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Wait(short ctx) = %v, want context.DeadlineExceeded", err)
	}
	st, err := p.Wait(ctxT(t))
	if err != nil || st.Signal != syscall.SIGKILL {
		t.Errorf("Wait after timeout = %v, %v; want killed by SIGKILL", st, err)
	}
	// Run with a deadline does the same in one call.
	ctx2, cancel2 := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel2()
	if _, err := e.c.Run(ctx2, agentclient.Cmd{Args: []string{"sleep", "100"}}); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Run(timeout) = %v, want context.DeadlineExceeded", err)
	}
}

func TestSpawnErrors(t *testing.T) {
	e := start(t, agentclient.Options{})
	noexec := filepath.Join(t.TempDir(), "noexec")
	os.WriteFile(noexec, []byte("#!/bin/sh\n"), 0o644)
	tests := []struct {
		cmd  agentclient.Cmd
		want error
		kind agentproto.SpawnKind
	}{
		{agentclient.Cmd{Args: []string{"no-such-command"}}, agentclient.ErrExecNotFound, agentproto.SpawnNotFound},
		{agentclient.Cmd{Args: []string{"/no/such/file"}}, agentclient.ErrExecNotFound, agentproto.SpawnNotFound},
		{agentclient.Cmd{Args: []string{"true"}, Dir: "/no/such/dir"}, agentclient.ErrBadWorkingDir, agentproto.SpawnBadDir},
		{agentclient.Cmd{Args: []string{"true"}, Dir: noexec}, agentclient.ErrBadWorkingDir, agentproto.SpawnBadDir},
		{agentclient.Cmd{Args: []string{noexec}}, agentclient.ErrPermission, agentproto.SpawnPermission},
	}
	for _, tt := range tests {
		_, err := e.c.Exec(ctxT(t), tt.cmd)
		var se *agentclient.SpawnError
		if !errors.Is(err, tt.want) || !errors.As(err, &se) || se.Kind != tt.kind {
			t.Errorf("Exec(%q in %q) = %v, want %v", tt.cmd.Args, tt.cmd.Dir, err, tt.want)
		}
	}
	// The client still works.
	if st, _, _ := run(t, e.c, agentclient.Cmd{Args: []string{"true"}}); !st.Success() {
		t.Errorf("true after spawn errors = %v", st)
	}
	if _, err := e.c.Exec(ctxT(t), agentclient.Cmd{}); err == nil {
		t.Errorf("Exec(empty Cmd) = nil error")
	}
}

func TestPingShutdownClose(t *testing.T) {
	e := start(t, agentclient.Options{})
	if err := e.c.Ping(ctxT(t)); err != nil {
		t.Fatalf("Ping = %v", err)
	}
	if err := e.c.Shutdown(ctxT(t)); err != nil {
		t.Fatalf("Shutdown = %v", err)
	}
	var sd *agent.ShutdownRequest
	if err := <-e.served; !errors.As(err, &sd) || sd.Reboot {
		t.Errorf("Serve = %v, want a power-off ShutdownRequest", err)
	}
	e.served <- nil // for the cleanup
	<-e.c.Done()
	if _, err := e.c.Exec(ctxT(t), agentclient.Cmd{Args: []string{"true"}}); !errors.Is(err, agentclient.ErrAgentGone) {
		t.Errorf("Exec after shutdown = %v, want ErrAgentGone", err)
	}
	e.c.Close()
	e.c.Close()
}

// The agent as a separate process (the guest binary in -agent-fd mode),
// killed while a process runs: pending and later calls fail with
// ErrAgentGone instead of hanging.
func TestAgentProcessDies(t *testing.T) {
	bin := guesttest.Userland(t)
	host, guest := guesttest.SocketPair(t)
	cmd := exec.Command(filepath.Join(bin, "init"), "-agent-fd", "3")
	cmd.ExtraFiles = []*os.File{guest}
	cmd.Env = []string{"PATH=" + bin}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	guest.Close()
	c, err := agentclient.Dial(ctxT(t), host, agentclient.Options{Hostname: "ignored-outside-pid1"})
	if err != nil {
		t.Fatalf("Dial = %v", err)
	}
	defer c.Close()
	st, out, _ := run(t, c, agentclient.Cmd{Args: []string{"sh", "-c", "echo hi"}})
	if !st.Success() || out != "hi\n" {
		t.Fatalf("sh -c 'echo hi' = %v, %q", st, out)
	}
	p, err := c.Exec(ctxT(t), agentclient.Cmd{Args: []string{"sleep", "100"}})
	if err != nil {
		t.Fatalf("Exec = %v", err)
	}
	defer syscall.Kill(p.PID(), syscall.SIGKILL) // the agent's orphan, on this host
	cmd.Process.Kill()
	cmd.Wait()
	if _, err := p.Wait(ctxT(t)); !errors.Is(err, agentclient.ErrAgentGone) {
		t.Errorf("Wait after the agent died = %v, want ErrAgentGone", err)
	}
	if _, err := c.Exec(ctxT(t), agentclient.Cmd{Args: []string{"true"}}); !errors.Is(err, agentclient.ErrAgentGone) {
		t.Errorf("Exec after the agent died = %v, want ErrAgentGone", err)
	}
	if err := c.Ping(ctxT(t)); !errors.Is(err, agentclient.ErrAgentGone) {
		t.Errorf("Ping after the agent died = %v, want ErrAgentGone", err)
	}
}

func TestDialTimeout(t *testing.T) {
	host, guest := guesttest.SocketPair(t)
	defer guest.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if _, err := agentclient.Dial(ctx, host, agentclient.Options{}); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Dial to a silent peer = %v, want context.DeadlineExceeded", err)
	}
	if _, err := agentclient.Dial(context.Background(), guest, agentclient.Options{Hostname: strings.Repeat("x", 65)}); err == nil {
		t.Errorf("Dial with a 65-byte hostname succeeded")
	}
}

func TestDialUntil(t *testing.T) {
	host, guest := guesttest.SocketPair(t)
	defer guest.Close()
	ended := make(chan struct{})
	time.AfterFunc(20*time.Millisecond, func() { close(ended) })
	_, err := agentclient.DialUntil(context.Background(), host, ended, agentclient.Options{})
	if !errors.Is(err, agentclient.ErrAgentGone) {
		t.Errorf("DialUntil to a silent peer that ended = %v, want ErrAgentGone", err)
	}

	host, guest2 := guesttest.SocketPair(t)
	defer guest2.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	_, err = agentclient.DialUntil(ctx, host, make(chan struct{}), agentclient.Options{})
	if !errors.Is(err, context.DeadlineExceeded) || errors.Is(err, agentclient.ErrAgentGone) {
		t.Errorf("DialUntil to a silent peer past ctx = %v, want context.DeadlineExceeded only", err)
	}
}

func BenchmarkExecTrue(b *testing.B) {
	e := start(b, agentclient.Options{})
	ctx := context.Background()
	for b.Loop() {
		st, err := e.c.Run(ctx, agentclient.Cmd{Args: []string{"true"}})
		if err != nil || !st.Success() {
			b.Fatalf("Run(true) = %v, %v", st, err)
		}
	}
}

func BenchmarkStdoutThroughput(b *testing.B) {
	e := start(b, agentclient.Options{})
	ctx := context.Background()
	const n = 64 << 20
	b.SetBytes(n)
	for b.Loop() {
		cw := &countWriter{w: io.Discard}
		st, err := e.c.Run(ctx, agentclient.Cmd{Args: []string{"head", "-c", "64M", "/dev/zero"}, Stdout: cw})
		if err != nil || !st.Success() || cw.n != n {
			b.Fatalf("Run = %v, %v, %d bytes", st, err, cw.n)
		}
	}
}

// An interactive shell on a TTY: commands typed on stdin, exit status from
// the shell's exit.
func TestInteractiveShellOnTTY(t *testing.T) {
	e := start(t, agentclient.Options{})
	var out syncBuffer
	st, err := e.c.Run(ctxT(t), agentclient.Cmd{
		Args: []string{"sh"}, TTY: true, Rows: 30, Cols: 100,
		Stdin:  strings.NewReader("echo hello-$((6*7))\nstty size\nexit 3\n"),
		Stdout: &out,
	})
	if err != nil || st.Code != 3 {
		t.Errorf("sh on a TTY = %v, %v; want exit status 3", st, err)
	}
	if s := out.String(); !strings.Contains(s, "hello-42") || !strings.Contains(s, "30 100") {
		t.Errorf("TTY output %q lacks hello-42 and 30 100", s)
	}
}

func openFDs(t *testing.T) int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skip("no /proc/self/fd")
	}
	return len(ents)
}

// Clients and agents created and closed in a loop leave no goroutines or
// descriptors behind.
func TestNoLeaks(t *testing.T) {
	guesttest.Userland(t)
	cycle := func() {
		host, guest := guesttest.SocketPair(t)
		served := make(chan error, 1)
		go func() {
			served <- agent.Serve(context.Background(), guest, agent.Options{Env: []string{"PATH=" + guesttest.Userland(t)}})
		}()
		c, err := agentclient.Dial(ctxT(t), host, agentclient.Options{})
		if err != nil {
			t.Fatal(err)
		}
		var out bytes.Buffer
		if st, err := c.Run(ctxT(t), agentclient.Cmd{Args: []string{"sh", "-c", "echo x; cat"}, Stdin: strings.NewReader("y"), Stdout: &out}); err != nil || !st.Success() {
			t.Fatalf("Run = %v, %v", st, err)
		}
		p, err := c.Exec(ctxT(t), agentclient.Cmd{Args: []string{"sleep", "100"}, TTY: true})
		if err != nil {
			t.Fatal(err)
		}
		_ = p
		c.Close() // with a process still running: the agent kills it
		<-served
	}
	cycle()
	g0, f0 := runtime.NumGoroutine(), openFDs(t)
	for range 10 {
		cycle()
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		g, f := runtime.NumGoroutine(), openFDs(t)
		if g <= g0 && f <= f0 {
			return
		}
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			n := runtime.Stack(buf, true)
			t.Fatalf("after 10 cycles: %d goroutines (was %d), %d fds (was %d)\n%s", g, g0, f, f0, buf[:n])
		}
		time.Sleep(10 * time.Millisecond)
	}
}
