package console_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"sync"
	"testing"
	"time"

	"github.com/gosandbox/sandbox/virtio"
	"github.com/gosandbox/sandbox/virtio/console"
	"github.com/gosandbox/sandbox/virtio/virtiotest"
)

const agent = "gosandbox.agent"

// Queue indexes with one named port.
const (
	qConsoleRx = 0
	qConsoleTx = 1
	qCtrlRx    = 2
	qCtrlTx    = 3
	qAgentRx   = 4
	qAgentTx   = 5
)

type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuf) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

type ctrl struct {
	id           uint32
	event, value uint16
	extra        string
}

func ctrlMsg(id uint32, event, value uint16) []byte {
	b := make([]byte, 8)
	binary.LittleEndian.PutUint32(b[0:], id)
	binary.LittleEndian.PutUint16(b[4:], event)
	binary.LittleEndian.PutUint16(b[6:], value)
	return b
}

// guest drives the device the way Linux's virtio_console does.
type guest struct {
	t *testing.T
	h *virtiotest.Harness
}

func (g *guest) send(id uint32, event, value uint16) {
	g.t.Helper()
	g.h.Add(qCtrlTx, [][]byte{ctrlMsg(id, event, value)})
	g.h.WaitUsed(qCtrlTx)
}

func (g *guest) recv() ctrl {
	g.t.Helper()
	u := g.h.WaitUsed(qCtrlRx)
	if len(u.Written) < 8 {
		g.t.Fatalf("control message of %d bytes", len(u.Written))
	}
	w := u.Written
	// Re-post the buffer, as Linux does.
	g.h.Add(qCtrlRx, nil, 256)
	return ctrl{binary.LittleEndian.Uint32(w), binary.LittleEndian.Uint16(w[4:]), binary.LittleEndian.Uint16(w[6:]), string(w[8:])}
}

func (g *guest) expect(want ctrl) {
	g.t.Helper()
	if got := g.recv(); got != want {
		g.t.Fatalf("control message %+v, want %+v", got, want)
	}
}

// setup brings the device up to the point where the guest knows both ports.
func setup(t *testing.T, log io.Writer) (*console.Device, *guest) {
	t.Helper()
	d, err := console.New(console.Options{Console: log, Ports: []string{agent}})
	if err != nil {
		t.Fatal(err)
	}
	h := virtiotest.NewHarness(t, d, virtiotest.HarnessOptions{})
	g := &guest{t, h}
	for range 4 {
		h.Add(qCtrlRx, nil, 256)
	}
	g.send(0xffffffff, console.EventDeviceReady, 1)
	g.expect(ctrl{0, console.EventDeviceAdd, 0, ""})
	g.expect(ctrl{1, console.EventDeviceAdd, 0, ""})
	g.send(0, console.EventPortReady, 1)
	g.expect(ctrl{0, console.EventConsolePort, 1, ""})
	g.send(1, console.EventPortReady, 1)
	g.expect(ctrl{1, console.EventPortName, 0, agent})
	g.expect(ctrl{1, console.EventPortOpen, 1, ""})
	return d, g
}

func TestHandshakeAndConsoleLog(t *testing.T) {
	var log syncBuf
	_, g := setup(t, &log)
	g.h.Add(qConsoleTx, [][]byte{[]byte("Linux version 7.1"), []byte("\n")})
	g.h.WaitUsed(qConsoleTx)
	if got := log.String(); got != "Linux version 7.1\n" {
		t.Fatalf("console log %q", got)
	}
	cfg := make([]byte, 12)
	g.h.Dev.ReadConfig(0, cfg)
	if n := binary.LittleEndian.Uint32(cfg[4:]); n != 2 {
		t.Fatalf("max_nr_ports %d, want 2", n)
	}
}

func TestEcho(t *testing.T) {
	d, g := setup(t, nil)
	p := d.Port(agent)
	if p == nil || p.Name() != agent || p.ID() != 1 {
		t.Fatalf("Port(%q) = %v", agent, p)
	}
	ctx := context.Background()
	g.send(1, console.EventPortOpen, 1)
	if err := p.WaitGuestOpen(ctx, true); err != nil {
		t.Fatal(err)
	}
	// Guest to host.
	g.h.Add(qAgentTx, [][]byte{[]byte("ping")})
	buf := make([]byte, 16)
	n, err := p.Read(buf)
	if err != nil || string(buf[:n]) != "ping" {
		t.Fatalf("Read = %q, %v", buf[:n], err)
	}
	g.h.WaitUsed(qAgentTx)
	// Host to guest.
	g.h.Add(qAgentRx, nil, 64)
	if n, err := p.Write([]byte("pong")); n != 4 || err != nil {
		t.Fatalf("Write = %d, %v", n, err)
	}
	if u := g.h.WaitUsed(qAgentRx); string(u.Written) != "pong" {
		t.Fatalf("guest got %q", u.Written)
	}
}

func TestHostWriteBackPressure(t *testing.T) {
	d, g := setup(t, nil)
	p := d.Port(agent)
	done := make(chan error, 1)
	go func() {
		_, err := p.Write([]byte("0123456789"))
		done <- err
	}()
	// The guest has not opened the port: a posted buffer stays unused.
	g.h.Add(qAgentRx, nil, 4)
	if _, ok := g.h.TryUsed(qAgentRx); ok {
		t.Fatal("data delivered before the guest opened the port")
	}
	g.send(1, console.EventPortOpen, 1)
	if u := g.h.WaitUsed(qAgentRx); string(u.Written) != "0123" {
		t.Fatalf("first buffer %q", u.Written)
	}
	// Six bytes remain and no buffer is posted: Write cannot have returned.
	select {
	case err := <-done:
		t.Fatalf("Write returned (%v) with 6 bytes undelivered", err)
	default:
	}
	g.h.Add(qAgentRx, nil, 8)
	if u := g.h.WaitUsed(qAgentRx); string(u.Written) != "456789" {
		t.Fatalf("second buffer %q", u.Written)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

func TestGuestWriteBackPressure(t *testing.T) {
	d, g := setup(t, nil)
	p := d.Port(agent)
	for _, s := range []string{"one", "two", "three"} {
		g.h.Add(qAgentTx, [][]byte{[]byte(s)})
	}
	buf := make([]byte, 2)
	n, _ := p.Read(buf) // "on"
	if string(buf[:n]) != "on" {
		t.Fatalf("read %q", buf[:n])
	}
	n, _ = p.Read(buf) // "e"
	if string(buf[:n]) != "e" {
		t.Fatalf("read %q", buf[:n])
	}
	// "one" was handed over, so its buffer comes back; "two" is waiting
	// for a reader, so neither it nor "three" can have been returned.
	if u := g.h.WaitUsed(qAgentTx); u.Len != 0 {
		t.Fatalf("used len %d", u.Len)
	}
	if _, ok := g.h.TryUsed(qAgentTx); ok {
		t.Fatal("a transmit buffer came back before the host read it")
	}
	rest, err := io.ReadAll(io.LimitReader(p, 8))
	if err != nil || string(rest) != "twothree" {
		t.Fatalf("rest %q, %v", rest, err)
	}
}

func TestOpenCloseEvents(t *testing.T) {
	d, g := setup(t, nil)
	p := d.Port(agent)
	ctx, cancel := context.WithTimeout(context.Background(), virtiotest.WaitTimeout)
	defer cancel()
	if p.GuestOpen() {
		t.Fatal("port open before the guest opened it")
	}
	g.send(1, console.EventPortOpen, 1)
	if err := p.WaitGuestOpen(ctx, true); err != nil || !p.GuestOpen() {
		t.Fatalf("WaitGuestOpen(true) = %v", err)
	}
	g.send(1, console.EventPortOpen, 0)
	if err := p.WaitGuestOpen(ctx, false); err != nil || p.GuestOpen() {
		t.Fatalf("WaitGuestOpen(false) = %v", err)
	}
	// Host close: the guest hears PORT_OPEN 0, I/O fails with ErrPortClosed.
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	g.expect(ctrl{1, console.EventPortOpen, 0, ""})
	if _, err := p.Read(make([]byte, 1)); !errors.Is(err, console.ErrPortClosed) {
		t.Fatalf("Read after Close = %v", err)
	}
	if _, err := p.Write([]byte("x")); !errors.Is(err, console.ErrPortClosed) {
		t.Fatalf("Write after Close = %v", err)
	}
	if err := p.WaitGuestOpen(ctx, true); !errors.Is(err, console.ErrPortClosed) {
		t.Fatalf("WaitGuestOpen after Close = %v", err)
	}
	p.Close()
}

func TestResetUnblocksAndRecovers(t *testing.T) {
	d, g := setup(t, nil)
	p := d.Port(agent)
	g.send(1, console.EventPortOpen, 1)
	done := make(chan error, 1)
	go func() {
		_, err := p.Write([]byte("after reset"))
		done <- err
	}()
	readErr := make(chan error, 1)
	go func() {
		_, err := p.Read(make([]byte, 1))
		readErr <- err
	}()
	d.Reset() // must not wait for the blocked writer or reader
	if p.GuestOpen() {
		t.Fatal("port still open after reset")
	}
	d.Close()
	if err := <-done; !errors.Is(err, console.ErrPortClosed) {
		t.Fatalf("blocked Write after Close = %v", err)
	}
	if err := <-readErr; !errors.Is(err, console.ErrPortClosed) {
		t.Fatalf("blocked Read after Close = %v", err)
	}
}

func TestControlGarbage(t *testing.T) {
	_, g := setup(t, nil)
	// Unknown port ids, unknown events and short messages are ignored.
	g.send(99, console.EventPortOpen, 1)
	g.send(1, 1234, 1)
	g.h.Add(qCtrlTx, [][]byte{[]byte("abc")})
	g.h.WaitUsed(qCtrlTx)
	if err := g.h.FailErr(); err != nil {
		t.Fatal(err)
	}
}

func TestNewRejects(t *testing.T) {
	for _, ports := range [][]string{{""}, {"a", "a"}, {"a/b"}, {string(make([]byte, 128))}, make([]string, console.MaxPorts)} {
		if _, err := console.New(console.Options{Ports: ports}); !errors.Is(err, console.ErrOptions) {
			t.Errorf("New(%q) = %v", ports, err)
		}
	}
}

func TestConformance(t *testing.T) {
	virtiotest.TestDevice(t, func(t *testing.T) virtio.Device {
		d, err := console.New(console.Options{Ports: []string{agent}})
		if err != nil {
			t.Fatal(err)
		}
		return d
	}, qConsoleTx, qCtrlTx, qAgentTx)
}

func BenchmarkGuestToHost(b *testing.B) {
	d, err := console.New(console.Options{Ports: []string{agent}})
	if err != nil {
		b.Fatal(err)
	}
	h := virtiotest.NewHarness(b, d, virtiotest.HarnessOptions{})
	p := d.Port(agent)
	chunk := bytes.Repeat([]byte("x"), 32<<10)
	go io.Copy(io.Discard, p)
	b.SetBytes(int64(len(chunk)))
	for b.Loop() {
		h.Add(qAgentTx, [][]byte{chunk})
		h.WaitUsed(qAgentTx)
	}
	p.Close()
}

func BenchmarkHostToGuest(b *testing.B) {
	d, err := console.New(console.Options{Ports: []string{agent}})
	if err != nil {
		b.Fatal(err)
	}
	h := virtiotest.NewHarness(b, d, virtiotest.HarnessOptions{})
	for range 4 {
		h.Add(qCtrlRx, nil, 256)
	}
	h.Add(qCtrlTx, [][]byte{ctrlMsg(0, console.EventDeviceReady, 1)})
	h.Add(qCtrlTx, [][]byte{ctrlMsg(1, console.EventPortReady, 1)})
	h.Add(qCtrlTx, [][]byte{ctrlMsg(1, console.EventPortOpen, 1)})
	p := d.Port(agent)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := p.WaitGuestOpen(ctx, true); err != nil {
		b.Fatal(err)
	}
	chunk := bytes.Repeat([]byte("x"), 32<<10)
	b.SetBytes(int64(len(chunk)))
	for b.Loop() {
		h.Queues[qAgentRx].Add(nil, 32<<10)
		h.Kick(qAgentRx)
		if _, err := p.Write(chunk); err != nil {
			b.Fatal(err)
		}
		h.WaitUsed(qAgentRx)
	}
}

func TestConsoleInput(t *testing.T) {
	d, g := setup(t, nil)
	// Linux opens hvc0 itself when it turns port 0 into a console.
	g.send(0, console.EventPortOpen, 1)
	g.h.Add(qConsoleRx, nil, 16)
	if n, err := d.ConsoleInput().Write([]byte("ls\n")); n != 3 || err != nil {
		t.Fatalf("Write = %d, %v", n, err)
	}
	if u := g.h.WaitUsed(qConsoleRx); string(u.Written) != "ls\n" {
		t.Fatalf("guest console read %q", u.Written)
	}
}

func TestGuestHangupGivesEOF(t *testing.T) {
	d, g := setup(t, nil)
	p := d.Port(agent)
	g.send(1, console.EventPortOpen, 1)
	g.h.Add(qAgentTx, [][]byte{[]byte("last words")})
	g.send(1, console.EventPortOpen, 0) // the agent exits
	got, err := io.ReadAll(p)
	if err != nil || string(got) != "last words" {
		t.Fatalf("ReadAll = %q, %v; want the data, then EOF", got, err)
	}
	// The guest opens the port again: new data flows.
	g.send(1, console.EventPortOpen, 1)
	g.h.Add(qAgentTx, [][]byte{[]byte("again")})
	buf := make([]byte, 8)
	n, err := p.Read(buf)
	if err != nil || string(buf[:n]) != "again" {
		t.Fatalf("Read after reopen = %q, %v", buf[:n], err)
	}
}

func TestDeviceString(t *testing.T) {
	d, err := console.New(console.Options{Ports: []string{"agent"}})
	if err != nil {
		t.Fatal(err)
	}
	want := `virtio-console: active false, closed false; port 1 "agent": guest ready false, guest open false, host closed false`
	if got := d.String(); got != want {
		t.Errorf("String() = %q, want %q", got, want)
	}
	d.Close()
	want = `virtio-console: active false, closed true; port 1 "agent": guest ready false, guest open false, host closed true`
	if got := d.String(); got != want {
		t.Errorf("after Close, String() = %q, want %q", got, want)
	}
}
