package agentclient_test

import (
	"context"
	"errors"
	"io"
	"testing"
	"time"

	"github.com/gosandbox/sandbox/guest/agentclient"
	"github.com/gosandbox/sandbox/guest/agentproto"
	"github.com/gosandbox/sandbox/guest/internal/guesttest"
)

func frameBytes(tb testing.TB, t agentproto.Type, id uint32, p agentproto.Payload) []byte {
	f, err := agentproto.Encode(t, id, p)
	if err != nil {
		tb.Fatal(err)
	}
	return agentproto.AppendFrame(nil, &f)
}

func raw(t agentproto.Type, id uint32, payload []byte) []byte {
	return agentproto.AppendFrame(nil, &agentproto.Frame{Type: t, ID: id, Payload: payload})
}

func cat(bs ...[]byte) []byte {
	var out []byte
	for _, b := range bs {
		out = append(out, b...)
	}
	return out
}

// FuzzClientFrames plays a hostile agent: after a correct handshake it
// answers the client's Exec (stream 1) with arbitrary bytes and then hangs
// up. The client must not panic, must not hang, and every call must end
// with a result or a typed error.
func FuzzClientFrames(f *testing.F) {
	started := frameBytes(f, agentproto.TypeStarted, 1, &agentproto.Started{PID: 7, Window: 1024})
	f.Add(cat(started, raw(agentproto.TypeStdout, 1, []byte("hi\n")), frameBytes(f, agentproto.TypeExit, 1, &agentproto.Exit{Code: 0})))
	f.Add(cat(started, raw(agentproto.TypeStderr, 1, []byte("e")), raw(agentproto.TypeWindow, 1, agentproto.WindowPayload(9)), frameBytes(f, agentproto.TypeExit, 1, &agentproto.Exit{Signal: 9})))
	f.Add(frameBytes(f, agentproto.TypeSpawnError, 1, &agentproto.SpawnError{Kind: agentproto.SpawnNotFound, Errno: 2}))
	f.Add(cat(started, started))
	f.Add(cat(started, raw(agentproto.TypeStdout, 2, []byte("x"))))
	f.Add(cat(started, raw(agentproto.TypeStdout, 1, make([]byte, agentproto.MaxData)), raw(agentproto.TypeStdout, 1, make([]byte, agentproto.MaxData))))
	f.Add(cat(raw(agentproto.TypePong, 0, []byte("zz")), raw(agentproto.TypeShutdownAck, 0, nil)))
	f.Add(frameBytes(f, agentproto.TypeError, 1, &agentproto.ErrorInfo{Code: 1, Message: "no"}))
	f.Add([]byte("GS\x09\x00\x01\x00\x00\x00\xff\xff\xff\x7f"))
	f.Fuzz(func(t *testing.T, data []byte) {
		host, guest := guesttest.SocketPair(t)
		defer guest.Close()
		agentDone := make(chan struct{})
		go func() {
			defer close(agentDone)
			guest.Write(frameBytes(t, agentproto.TypeHello, 0, &agentproto.Hello{Magic: agentproto.Magic, MinVersion: 1, MaxVersion: 1}))
			r := agentproto.NewReader(guest, agentproto.FromHost)
			if _, err := r.ReadFrame(); err != nil { // config
				return
			}
			guest.Write(frameBytes(t, agentproto.TypeReady, 0, &agentproto.Ready{Version: 1}))
			if _, err := r.ReadFrame(); err != nil { // exec
				return
			}
			guest.Write(data)
			guest.Close()
		}()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		c, err := agentclient.Dial(ctx, host, agentclient.Options{Window: 4096})
		if err != nil {
			t.Fatalf("Dial = %v", err)
		}
		defer c.Close()
		p, err := c.Exec(ctx, agentclient.Cmd{Args: []string{"x"}, Stdout: io.Discard})
		if err != nil {
			if errors.Is(err, context.DeadlineExceeded) {
				t.Fatalf("Exec hung")
			}
			return
		}
		_, err = p.Wait(ctx)
		if errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("Wait hung")
		}
		p.Signal(15)
		c.Ping(ctx)
		c.Close()
		<-agentDone
	})
}
