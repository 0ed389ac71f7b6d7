package userland

import (
	"bytes"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
)

// TestTCPBlast runs each mode against a loopback listener and checks what
// the listener saw against what tcpblast printed.
func TestTCPBlast(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	const served = 3<<20 + 5
	var (
		mode               atomic.Value // what the listener does with the next connections
		received, accepted atomic.Int64
		wg                 sync.WaitGroup       // connection handlers
		handled            = make(chan int, 16) // one per connection handled
	)
	mode.Store("")
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted.Add(1)
			m := mode.Load().(string)
			wg.Go(func() {
				defer func() { handled <- 1 }()
				defer c.Close()
				switch m {
				case "send":
					n, _ := io.Copy(io.Discard, c)
					received.Add(n)
				case "recv":
					io.CopyN(c, zeroReader{}, served)
				}
			})
		}
	}()
	defer func() {
		ln.Close()
		wg.Wait()
	}()
	addr := ln.Addr().String()
	field0 := func(out string) int64 {
		t.Helper()
		f := strings.Fields(out)
		if len(f) != 2 {
			t.Fatalf("output %q: want two fields", out)
		}
		n, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := strconv.ParseFloat(f[1], 64); err != nil {
			t.Fatal(err)
		}
		return n
	}

	mode.Store("send")
	code, out, errs := runCmd(t, "", "tcpblast", "send", addr, "1M")
	<-handled
	if code != 0 || field0(out) != 1<<20 || received.Load() != 1<<20 {
		t.Errorf("send 1M = %d, %q (%s); listener got %d bytes", code, out, errs, received.Load())
	}
	mode.Store("recv")
	code, out, errs = runCmd(t, "", "tcpblast", "recv", addr)
	if code != 0 || field0(out) != served {
		t.Errorf("recv = %d, %q (%s); want %d bytes", code, out, errs, served)
	}
	<-handled
	mode.Store("connect")
	code, out, errs = runCmd(t, "", "tcpblast", "connect", addr, "5")
	if code != 0 || field0(out) != 5 {
		t.Errorf("connect 5 = %d, %q (%s)", code, out, errs)
	}
	for range 5 {
		<-handled
	}
	if n := accepted.Load(); n != 7 {
		t.Errorf("the listener accepted %d connections, want 7", n)
	}

	f, _ := Lookup("tcpblast")
	for _, args := range [][]string{
		{}, {"send", addr}, {"send", addr, "lots"}, {"connect", addr, "-1"}, {"bogus", addr},
		{"recv", "127.0.0.1:1"}, // nothing listens on port 1
	} {
		var stderr bytes.Buffer
		if code := f(t.Context(), IO{Stdin: strings.NewReader(""), Stdout: io.Discard, Stderr: &stderr}, args); code == 0 || stderr.Len() == 0 {
			t.Errorf("tcpblast %q = %d, stderr %q; want a failure with a message", args, code, stderr.String())
		}
	}
}

type zeroReader struct{}

func (zeroReader) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}
