package p9_test

import (
	"encoding/binary"
	"errors"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hugelgupf/p9/fsimpl/localfs"
	ninep "github.com/hugelgupf/p9/p9"

	"github.com/gosandbox/sandbox/virtio"
	"github.com/gosandbox/sandbox/virtio/p9"
	"github.com/gosandbox/sandbox/virtio/virtiotest"
)

// 9P2000.L message types the raw tests build.
const (
	tRlerror  = 7
	tTlopen   = 12
	tTversion = 100
	tRversion = 101
	tTattach  = 104
	tRattach  = 105
	tTflush   = 108
	tRflush   = 109
	tTwalk    = 110
	tRwalk    = 111
	tTread    = 116
	tRread    = 117
	tTclunk   = 120
	tRclunk   = 121

	eINVAL   = 22
	eMSGSIZE = 90
)

// msg frames a 9P message: size[4] type[1] tag[2] body.
func msg(typ uint8, tag uint16, body ...[]byte) []byte {
	b := []byte{0, 0, 0, 0, typ, byte(tag), byte(tag >> 8)}
	for _, p := range body {
		b = append(b, p...)
	}
	binary.LittleEndian.PutUint32(b, uint32(len(b)))
	return b
}

func u16(v uint16) []byte { return binary.LittleEndian.AppendUint16(nil, v) }
func u32(v uint32) []byte { return binary.LittleEndian.AppendUint32(nil, v) }
func u64(v uint64) []byte { return binary.LittleEndian.AppendUint64(nil, v) }
func str(s string) []byte { return append(u16(uint16(len(s))), s...) }

func tversion(tag uint16, msize uint32) []byte {
	return msg(tTversion, tag, u32(msize), str("9P2000.L"))
}

func tattach(tag uint16, fid uint32) []byte {
	return msg(tTattach, tag, u32(fid), u32(^uint32(0)), str("root"), str(""), u32(0))
}

func twalk(tag uint16, fid, newFID uint32, names ...string) []byte {
	b := append(u32(fid), u32(newFID)...)
	b = append(b, u16(uint16(len(names)))...)
	for _, n := range names {
		b = append(b, str(n)...)
	}
	return msg(tTwalk, tag, b)
}

func tlopen(tag uint16, fid uint32) []byte { return msg(tTlopen, tag, u32(fid), u32(0)) }

func tread(tag uint16, fid uint32, off uint64, count uint32) []byte {
	return msg(tTread, tag, u32(fid), u64(off), u32(count))
}

func tclunk(tag uint16, fid uint32) []byte { return msg(tTclunk, tag, u32(fid)) }

func tflush(tag, old uint16) []byte { return msg(tTflush, tag, u16(old)) }

// reply is a parsed R-message.
type reply struct {
	size  uint32
	typ   uint8
	tag   uint16
	errno uint32 // for Rlerror
	body  []byte
}

func parse(t testing.TB, u virtiotest.Used) reply {
	t.Helper()
	b := u.Written
	if len(b) < 7 {
		t.Fatalf("used length %d: no 9P header", len(b))
	}
	r := reply{size: binary.LittleEndian.Uint32(b), typ: b[4], tag: binary.LittleEndian.Uint16(b[5:]), body: b[7:]}
	if int(r.size) != len(b) {
		t.Fatalf("size field %d, used length %d", r.size, len(b))
	}
	if r.typ == tRlerror {
		if len(b) != 11 {
			t.Fatalf("Rlerror of %d bytes", len(b))
		}
		r.errno = binary.LittleEndian.Uint32(b[7:])
	}
	return r
}

// expect checks type and tag of a reply.
func expect(t testing.TB, r reply, typ uint8, tag uint16) {
	t.Helper()
	if r.typ != typ || r.tag != tag {
		t.Fatalf("reply type %d tag %#x (errno %d), want type %d tag %#x", r.typ, r.tag, r.errno, typ, tag)
	}
}

// features are what the test driver negotiates. VIRTIO_F_EVENT_IDX is
// left out: virtiotest's DriverQueue writes used_event and then re-reads
// the used index with plain loads and stores, which x86 may reorder, so a
// driver waiting for an interrupt can miss one (seen as a rare hang here).
// The conformance suite still runs with it.
func features(dev *p9.Device) uint64 {
	return dev.Features() | virtio.FeatureVersion1 | virtio.FeatureIndirectDesc
}

// rawDevice is a device on a harness, driven with hand-built messages.
type rawDevice struct {
	t   testing.TB
	dev *p9.Device
	h   *virtiotest.Harness
}

const rawMsize = 8192

func newRaw(t testing.TB, a ninep.Attacher) *rawDevice {
	t.Helper()
	dev, err := p9.New(p9.Options{Tag: "test", Attacher: a, MaxMessage: rawMsize})
	if err != nil {
		t.Fatal(err)
	}
	h := virtiotest.NewHarness(t, dev, virtiotest.HarnessOptions{QueueSize: 32, DataPerQueue: 32 * 32 << 10, Features: features(dev)})
	return &rawDevice{t: t, dev: dev, h: h}
}

// do sends one message with a writable part of in bytes and waits for it.
func (r *rawDevice) do(m []byte, in int) reply {
	r.t.Helper()
	r.h.Add(0, [][]byte{m}, in)
	return parse(r.t, r.h.WaitUsed(0))
}

// setup negotiates the version, attaches fid 1 and walks fid 2 to names.
func (r *rawDevice) setup(names ...string) {
	r.t.Helper()
	rv := r.do(tversion(0xffff, rawMsize), rawMsize)
	expect(r.t, rv, tRversion, 0xffff)
	expect(r.t, r.do(tattach(1, 1), 64), tRattach, 1)
	expect(r.t, r.do(twalk(2, 1, 2, names...), 256), tRwalk, 2)
}

// testTree writes a small directory tree and returns its root.
func testTree(t testing.TB) (string, map[string][]byte) {
	t.Helper()
	root := t.TempDir()
	files := map[string][]byte{
		"hello.txt":          []byte("hello, 9p\n"),
		"empty":              nil,
		"dir/nested.bin":     pattern(200_000, 7),
		"dir/sub/deeper.txt": []byte(strings.Repeat("deep ", 1000)),
		"big.bin":            pattern(3<<20+123, 1),
	}
	for name, data := range files {
		p := filepath.Join(root, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return root, files
}

// pattern returns n bytes that differ at every offset modulo a prime.
func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i%251) ^ seed
	}
	return b
}

// gate blocks ReadAt calls of a wrapped tree until released and reports
// each call that entered.
type gate struct {
	entered chan struct{}
	release chan struct{}
	once    sync.Once
}

func newGate() *gate {
	return &gate{entered: make(chan struct{}, 1024), release: make(chan struct{})}
}

func (g *gate) open() { g.once.Do(func() { close(g.release) }) }

// waitEntered waits for n ReadAt calls to be inside the gate at once.
func (g *gate) waitEntered(t testing.TB, n int) {
	t.Helper()
	timer := time.NewTimer(virtiotest.WaitTimeout)
	defer timer.Stop()
	for i := range n {
		select {
		case <-g.entered:
		case <-timer.C:
			t.Fatalf("only %d of %d reads reached the attacher (hang guard, not a timing assertion)", i, n)
		}
	}
}

type gateAttacher struct {
	inner ninep.Attacher
	g     *gate
}

func (a gateAttacher) Attach() (ninep.File, error) {
	f, err := a.inner.Attach()
	if err != nil {
		return nil, err
	}
	return gateFile{f, a.g}, nil
}

type gateFile struct {
	ninep.File
	g *gate
}

func (f gateFile) Walk(names []string) ([]ninep.QID, ninep.File, error) {
	q, nf, err := f.File.Walk(names)
	if nf != nil {
		nf = gateFile{nf, f.g}
	}
	return q, nf, err
}

func (f gateFile) WalkGetAttr(names []string) ([]ninep.QID, ninep.File, ninep.AttrMask, ninep.Attr, error) {
	q, nf, m, a, err := f.File.WalkGetAttr(names)
	if nf != nil {
		nf = gateFile{nf, f.g}
	}
	return q, nf, m, a, err
}

func (f gateFile) ReadAt(p []byte, off int64) (int, error) {
	f.g.entered <- struct{}{}
	<-f.g.release
	return f.File.ReadAt(p, off)
}

func gated(t testing.TB) (ninep.Attacher, *gate, map[string][]byte) {
	root, files := testTree(t)
	g := newGate()
	t.Cleanup(g.open)
	return gateAttacher{localfs.Attacher(root), g}, g, files
}

// readInAttacher returns a device with fid 2 open on hello.txt and a
// read of it (tag 20) that is in the attacher, held there until g opens.
func readInAttacher(t testing.TB) (*rawDevice, *gate) {
	t.Helper()
	a, g, _ := gated(t)
	r := newRaw(t, a)
	r.setup("hello.txt")
	expect(t, r.do(tlopen(3, 2), 64), 13, 3)
	r.h.Add(0, [][]byte{tread(20, 2, 0, 100)}, 200)
	g.waitEntered(t, 1)
	return r, g
}

// driverConn is a p9 client transport over the device's virtqueue: each
// T-message the client writes becomes one chain (readable: the message;
// writable: msize bytes), and the R-messages of used chains are what the
// client reads.
type driverConn struct {
	h     *virtiotest.Harness
	msize int

	mu    sync.Mutex // guards the driver queue and wbuf
	space *sync.Cond // on mu: descriptors were freed
	wbuf  []byte

	rmu    sync.Mutex
	rcond  *sync.Cond
	rbuf   []byte
	rerr   error
	stop   chan struct{}
	done   chan struct{}
	closed sync.Once
}

func newDriverConn(h *virtiotest.Harness, msize int) *driverConn {
	c := &driverConn{h: h, msize: msize, stop: make(chan struct{}), done: make(chan struct{})}
	c.rcond = sync.NewCond(&c.rmu)
	c.space = sync.NewCond(&c.mu)
	go c.receive()
	return c
}

func (c *driverConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.wbuf = append(c.wbuf, p...)
	for len(c.wbuf) >= 4 {
		size := int(binary.LittleEndian.Uint32(c.wbuf))
		if len(c.wbuf) < size {
			break
		}
		for {
			_, err := c.h.Queues[0].Add([][]byte{c.wbuf[:size]}, c.msize)
			if err == nil {
				break
			}
			if !errors.Is(err, virtiotest.ErrNoSpace) || size > c.msize {
				return 0, err
			}
			select {
			case <-c.stop:
				return 0, io.ErrClosedPipe
			default:
			}
			c.space.Wait() // for receive to free descriptors
		}
		c.h.Kick(0)
		c.wbuf = append(c.wbuf[:0], c.wbuf[size:]...)
	}
	return len(p), nil
}

func (c *driverConn) receive() {
	defer close(c.done)
	for {
		c.mu.Lock()
		var got []byte
		var err error
		for {
			u, ok, e := c.h.Queues[0].PopUsed()
			if e != nil {
				err = e
				break
			}
			if !ok {
				break
			}
			got = append(got, u.Written...)
		}
		c.space.Broadcast()
		c.mu.Unlock()
		c.rmu.Lock()
		c.rbuf = append(c.rbuf, got...)
		if err != nil && c.rerr == nil {
			c.rerr = err
		}
		c.rcond.Broadcast()
		c.rmu.Unlock()
		if err != nil {
			return
		}
		select {
		case <-c.h.Interrupts(0):
		case <-c.h.Failed():
			c.rmu.Lock()
			c.rerr = c.h.FailErr()
			c.rcond.Broadcast()
			c.rmu.Unlock()
			return
		case <-c.stop:
			return
		}
	}
}

func (c *driverConn) Read(p []byte) (int, error) {
	c.rmu.Lock()
	defer c.rmu.Unlock()
	for len(c.rbuf) == 0 && c.rerr == nil {
		c.rcond.Wait()
	}
	if len(c.rbuf) == 0 {
		return 0, c.rerr
	}
	n := copy(p, c.rbuf)
	c.rbuf = c.rbuf[n:]
	return n, nil
}

func (c *driverConn) Close() error {
	c.closed.Do(func() {
		close(c.stop)
		<-c.done
		c.mu.Lock()
		c.space.Broadcast()
		c.mu.Unlock()
		c.rmu.Lock()
		if c.rerr == nil {
			c.rerr = io.EOF
		}
		c.rcond.Broadcast()
		c.rmu.Unlock()
	})
	return nil
}

// newClient builds a device serving a, a harness, and a p9 client over
// the device's queue.
func newClient(t testing.TB, a ninep.Attacher, msize int) (*ninep.Client, *virtiotest.Harness, *p9.Device) {
	t.Helper()
	dev, err := p9.New(p9.Options{Tag: "test", Attacher: a, MaxMessage: uint32(max(msize, p9.MinMessage))})
	if err != nil {
		t.Fatal(err)
	}
	const qsize = 64
	slot := 2*msize + 4096
	h := virtiotest.NewHarness(t, dev, virtiotest.HarnessOptions{QueueSize: qsize, DataPerQueue: uint64(qsize * slot), Features: features(dev)})
	conn := newDriverConn(h, msize)
	c, err := ninep.NewClient(conn, ninep.WithMessageSize(uint32(msize)))
	if err != nil {
		conn.Close()
		t.Fatalf("p9 client over the device: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c, h, dev
}

// walk walks root to path and returns the file.
func walk(t testing.TB, root ninep.File, path string) ninep.File {
	t.Helper()
	var names []string
	if path != "" {
		names = strings.Split(path, "/")
	}
	_, f, err := root.Walk(names)
	if err != nil {
		t.Fatalf("walk %q: %v", path, err)
	}
	return f
}

// readAll opens f and reads it to the end in reads of at most chunk bytes.
func readAll(t testing.TB, f ninep.File) []byte {
	t.Helper()
	if _, _, err := f.Open(ninep.ReadOnly); err != nil {
		t.Fatalf("open: %v", err)
	}
	var out []byte
	buf := make([]byte, 256<<10)
	for {
		n, err := f.ReadAt(buf, int64(len(out)))
		out = append(out, buf[:n]...)
		if errors.Is(err, io.EOF) || (err == nil && n == 0) {
			return out
		}
		if err != nil {
			t.Fatalf("read at %d: %v", len(out), err)
		}
	}
}

// checkGoroutines fails if the goroutine count does not return to before.
func checkGoroutines(t testing.TB, before int) {
	t.Helper()
	deadline := time.Now().Add(virtiotest.WaitTimeout)
	for runtime.NumGoroutine() > before {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			t.Fatalf("%d goroutines before, %d after Close:\n%s", before, runtime.NumGoroutine(), buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// waitTimeout returns a channel that fires after virtiotest.WaitTimeout, a
// guard against hangs (never a performance assertion).
func waitTimeout() <-chan time.Time { return time.After(virtiotest.WaitTimeout) }
