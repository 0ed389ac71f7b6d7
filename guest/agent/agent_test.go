package agent

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/gosandbox/sandbox/guest/agentproto"
	"github.com/gosandbox/sandbox/guest/internal/guesttest"
)

func TestMain(m *testing.M) {
	code := m.Run()
	guesttest.Cleanup()
	os.Exit(code)
}

func enc(tb testing.TB, t agentproto.Type, id uint32, p agentproto.Payload) []byte {
	f, err := agentproto.Encode(t, id, p)
	if err != nil {
		tb.Fatal(err)
	}
	return agentproto.AppendFrame(nil, &f)
}

func raw(t agentproto.Type, id uint32, payload []byte) []byte {
	return agentproto.AppendFrame(nil, &agentproto.Frame{Type: t, ID: id, Payload: payload})
}

// hostSide runs the handshake as the host and returns a frame reader.
func hostSide(tb testing.TB, host *os.File, cfg agentproto.Config) *agentproto.Reader {
	r := agentproto.NewReader(host, agentproto.FromGuest)
	f, err := r.ReadFrame()
	if err != nil || f.Type != agentproto.TypeHello {
		tb.Fatalf("first frame = %v, %v; want hello", f.Type, err)
	}
	host.Write(enc(tb, agentproto.TypeConfig, 0, &cfg))
	f, err = r.ReadFrame()
	if err != nil || f.Type != agentproto.TypeReady {
		tb.Fatalf("frame after config = %v, %v; want ready", f.Type, err)
	}
	return r
}

func TestSetupAndHostErrors(t *testing.T) {
	bin := guesttest.Userland(t)
	host, guest := guesttest.SocketPair(t)
	defer host.Close()
	var got agentproto.Config
	done := make(chan error, 1)
	go func() {
		done <- Serve(context.Background(), guest, Options{
			Env:   []string{"PATH=" + bin},
			Setup: func(c agentproto.Config) ([]string, error) { got = c; return []string{"clock: not allowed"}, nil },
		})
	}()
	r := hostSide(t, host, agentproto.Config{Version: 1, TimeUnixNano: 5, Hostname: "box", Env: []string{"A=1"}})
	if got.Hostname != "box" || got.TimeUnixNano != 5 {
		t.Errorf("Setup got %+v", got)
	}
	// A second config, an exec with a bad payload and data for an
	// unknown stream: Error frames or silence, and the agent keeps going.
	host.Write(enc(t, agentproto.TypeConfig, 0, &agentproto.Config{Version: 1}))
	host.Write(raw(agentproto.TypeExec, 9, []byte(`{"argv":[]}`)))
	host.Write(raw(agentproto.TypeStdin, 77, []byte("x")))
	host.Write(raw(agentproto.TypePing, 0, []byte("p1")))
	var errs int
	for {
		f, err := r.ReadFrame()
		if err != nil {
			t.Fatalf("ReadFrame = %v", err)
		}
		if f.Type == agentproto.TypeError {
			errs++
			continue
		}
		if f.Type != agentproto.TypePong || !bytes.Equal(f.Payload, []byte("p1")) {
			t.Fatalf("got %v %q, want pong p1", f.Type, f.Payload)
		}
		break
	}
	if errs != 2 {
		t.Errorf("got %d error frames, want 2", errs)
	}
	// A framing error ends Serve with ErrProtocol.
	host.Write([]byte("XXXXXXXXXXXXXXXX"))
	select {
	case err := <-done:
		if !errors.Is(err, agentproto.ErrProtocol) {
			t.Errorf("Serve = %v, want ErrProtocol", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("Serve did not return after a framing error")
	}
}

// Stdin beyond the granted window is refused, not buffered.
func TestStdinWindowEnforced(t *testing.T) {
	bin := guesttest.Userland(t)
	host, guest := guesttest.SocketPair(t)
	done := make(chan error, 1)
	go func() {
		done <- Serve(context.Background(), guest, Options{Env: []string{"PATH=" + bin}, Window: 8})
	}()
	r := hostSide(t, host, agentproto.Config{Version: 1})
	host.Write(enc(t, agentproto.TypeExec, 1, &agentproto.ExecRequest{Argv: []string{"sleep", "100"}, Stdin: true}))
	f, err := r.ReadFrame()
	var st agentproto.Started
	if err != nil || agentproto.Decode(f, &st) != nil || st.Window != 8 {
		t.Fatalf("started = %v %q, %v", f.Type, f.Payload, err)
	}
	host.Write(raw(agentproto.TypeStdin, 1, []byte("0123456789")))
	f, err = r.ReadFrame()
	if err != nil || f.Type != agentproto.TypeError {
		t.Errorf("after 10 bytes into an 8-byte window: %v, %v; want an error frame", f.Type, err)
	}
	host.Close()
	if err := <-done; !errors.Is(err, ErrChannelClosed) {
		t.Errorf("Serve = %v, want ErrChannelClosed", err)
	}
}

// FuzzAgentFrames plays a hostile host after a correct handshake. The
// agent may run only `cat` from the userland; it must not panic or hang,
// and must return once the host hangs up.
func FuzzAgentFrames(f *testing.F) {
	f.Add(enc(f, agentproto.TypeExec, 1, &agentproto.ExecRequest{Argv: []string{"cat"}, Stdin: true}))
	f.Add(cat(enc(f, agentproto.TypeExec, 1, &agentproto.ExecRequest{Argv: []string{"cat"}, Stdin: true}),
		raw(agentproto.TypeStdin, 1, []byte("hello")), raw(agentproto.TypeWindow, 1, agentproto.WindowPayload(100)),
		raw(agentproto.TypeStdinClose, 1, nil)))
	f.Add(cat(enc(f, agentproto.TypeExec, 2, &agentproto.ExecRequest{Argv: []string{"cat"}, TTY: true, Rows: 10, Cols: 10, Stdin: true}),
		enc(f, agentproto.TypeResize, 2, &agentproto.Resize{Rows: 1, Cols: 2}), enc(f, agentproto.TypeSignal, 2, &agentproto.Signal{Signal: 15})))
	f.Add(cat(enc(f, agentproto.TypeExec, 1, &agentproto.ExecRequest{Argv: []string{"cat"}}), enc(f, agentproto.TypeExec, 1, &agentproto.ExecRequest{Argv: []string{"cat"}})))
	f.Add(enc(f, agentproto.TypeShutdown, 0, &agentproto.Shutdown{Reboot: true}))
	f.Add(raw(agentproto.TypeWindow, 3, agentproto.WindowPayload(agentproto.MaxWindow)))
	f.Fuzz(func(t *testing.T, data []byte) {
		bin := guesttest.Userland(t)
		host, guest := guesttest.SocketPair(t)
		done := make(chan error, 1)
		go func() {
			done <- Serve(context.Background(), guest, Options{
				Env:         []string{"PATH=" + bin},
				OutputGrace: time.Millisecond,
				allowExec: func(r *agentproto.ExecRequest) bool {
					return len(r.Argv) == 1 && r.Argv[0] == "cat" && r.UID == nil && r.GID == nil && r.Dir == ""
				},
			})
		}()
		hostSide(t, host, agentproto.Config{Version: 1})
		drained := make(chan struct{})
		go func() {
			io.Copy(io.Discard, host)
			close(drained)
		}()
		host.Write(data)
		host.Close()
		select {
		case <-done:
		case <-time.After(20 * time.Second):
			t.Fatal("Serve did not return after the host hung up")
		}
		<-drained
	})
}

func cat(bs ...[]byte) []byte {
	var out []byte
	for _, b := range bs {
		out = append(out, b...)
	}
	return out
}

func TestMergeEnv(t *testing.T) {
	got := mergeEnv([]string{"A=1", "B=2"}, []string{"B=3", "C=4"})
	want := []string{"A=1", "B=3", "C=4"}
	if len(got) != len(want) {
		t.Fatalf("mergeEnv = %q, want %q", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("mergeEnv = %q, want %q", got, want)
		}
	}
}

// A panic inside the agent ends Serve with ErrPanic (so PID 1 can power
// off) instead of crashing the process.
func TestPanicBecomesError(t *testing.T) {
	host, guest := guesttest.SocketPair(t)
	defer host.Close()
	done := make(chan error, 1)
	go func() {
		done <- Serve(context.Background(), guest, Options{allowExec: func(*agentproto.ExecRequest) bool { panic("boom") }})
	}()
	hostSide(t, host, agentproto.Config{Version: 1})
	host.Write(enc(t, agentproto.TypeExec, 1, &agentproto.ExecRequest{Argv: []string{"x"}}))
	if err := <-done; !errors.Is(err, ErrPanic) || !strings.Contains(err.Error(), "boom") {
		t.Errorf("Serve = %v, want ErrPanic with boom", err)
	}
}
