package p9_test

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/hugelgupf/p9/fsimpl/localfs"
	"github.com/hugelgupf/p9/fsimpl/staticfs"
	"github.com/hugelgupf/p9/linux"
	ninep "github.com/hugelgupf/p9/p9"

	"github.com/gosandbox/sandbox/virtio"
	"github.com/gosandbox/sandbox/virtio/p9"
	"github.com/gosandbox/sandbox/virtio/virtiotest"
)

func staticTree(t testing.TB) ninep.Attacher {
	t.Helper()
	a, err := staticfs.New(staticfs.WithFile("a.txt", "alpha"), staticfs.WithFile("b.txt", strings.Repeat("b", 10000)))
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func TestNewOptions(t *testing.T) {
	a := staticTree(t)
	bad := []p9.Options{
		{Tag: "", Attacher: a},
		{Tag: strings.Repeat("x", 33), Attacher: a},
		{Tag: "a\x00b", Attacher: a},
		{Tag: "ok"},
		{Tag: "ok", Attacher: a, MaxMessage: 4095},
		{Tag: "ok", Attacher: a, MaxMessage: 4<<20 + 1},
	}
	for _, o := range bad {
		if _, err := p9.New(o); !errors.Is(err, p9.ErrOptions) {
			t.Errorf("New(%+v) = %v, want ErrOptions", o, err)
		}
	}
	for _, tag := range []string{"x", strings.Repeat("t", 32), "image"} {
		d, err := p9.New(p9.Options{Tag: tag, Attacher: a})
		if err != nil {
			t.Fatalf("New(tag %q): %v", tag, err)
		}
		if d.Tag() != tag {
			t.Errorf("Tag() = %q, want %q", d.Tag(), tag)
		}
		d.Close()
	}
}

func TestConfig(t *testing.T) {
	d, err := p9.New(p9.Options{Tag: "image", Attacher: staticTree(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if d.Type() != virtio.Type9P {
		t.Errorf("Type = %d, want 9", d.Type())
	}
	if d.Features()&p9.FeatureMountTag == 0 {
		t.Error("VIRTIO_9P_MOUNT_TAG not offered")
	}
	if got := d.QueueSizes(); len(got) != 1 || got[0] != p9.QueueSize {
		t.Errorf("QueueSizes = %v", got)
	}
	if d.ConfigSize() != 7 {
		t.Errorf("ConfigSize = %d, want 7", d.ConfigSize())
	}
	full := make([]byte, 7)
	d.ReadConfig(0, full)
	if want := []byte{5, 0, 'i', 'm', 'a', 'g', 'e'}; !bytes.Equal(full, want) {
		t.Errorf("config = %q, want %q", full, want)
	}
	part := make([]byte, 4)
	d.ReadConfig(3, part)
	if want := []byte{'m', 'a', 'g', 'e'}; !bytes.Equal(part, want) {
		t.Errorf("config at 3 = %q, want %q", part, want)
	}
	d.WriteConfig(0, []byte{1, 2}) // ignored
	d.ReadConfig(0, full)
	if full[0] != 5 {
		t.Error("WriteConfig changed the config")
	}
	d.ReadConfig(100, part) // outside: left alone
}

func TestConformance(t *testing.T) {
	virtiotest.TestDevice(t, func(t *testing.T) virtio.Device {
		d, err := p9.New(p9.Options{Tag: "conf", Attacher: staticTree(t)})
		if err != nil {
			t.Fatal(err)
		}
		return d
	}, 0)
}

// TestClientEndToEnd walks, stats, reads and lists a real directory served
// by localfs through the device, with hugelgupf/p9's client as the driver.
func TestClientEndToEnd(t *testing.T) {
	root, files := testTree(t)
	for _, msize := range []int{4096, 64 << 10, 512 << 10} {
		t.Run(fmt.Sprint("msize", msize), func(t *testing.T) {
			c, h, _ := newClient(t, localfs.Attacher(root), msize)
			rootF, err := c.Attach("/")
			if err != nil {
				t.Fatalf("attach: %v", err)
			}
			for name, want := range files {
				f := walk(t, rootF, name)
				_, mask, attr, err := f.GetAttr(ninep.AttrMaskAll)
				if err != nil || !mask.Size {
					t.Fatalf("getattr %s: %v", name, err)
				}
				if attr.Size != uint64(len(want)) {
					t.Errorf("%s: size %d, want %d", name, attr.Size, len(want))
				}
				if got := readAll(t, f); !bytes.Equal(got, want) {
					t.Errorf("%s: read %d bytes that differ from the %d written", name, len(got), len(want))
				}
				f.Close()
			}
			// Directory listings.
			for dir, want := range map[string][]string{
				"":        {"big.bin", "dir", "empty", "hello.txt"},
				"dir":     {"nested.bin", "sub"},
				"dir/sub": {"deeper.txt"},
			} {
				d := walk(t, rootF, dir)
				if _, _, err := d.Open(ninep.ReadOnly); err != nil {
					t.Fatalf("open dir %q: %v", dir, err)
				}
				var names []string
				off := uint64(0)
				for {
					ents, err := d.Readdir(off, uint32(msize-64))
					if err != nil {
						t.Fatalf("readdir %q: %v", dir, err)
					}
					if len(ents) == 0 {
						break
					}
					for _, e := range ents {
						if e.Name != "." && e.Name != ".." {
							names = append(names, e.Name)
						}
						off = e.Offset
					}
				}
				slices.Sort(names)
				if !slices.Equal(names, want) {
					t.Errorf("readdir %q = %v, want %v", dir, names, want)
				}
				d.Close()
			}
			// A missing name is an error from the server, not a transport failure.
			if _, _, err := rootF.Walk([]string{"missing"}); !errors.Is(err, linux.ENOENT) {
				t.Errorf("walk missing: %v, want ENOENT", err)
			}
			if err := h.FailErr(); err != nil {
				t.Errorf("device failed: %v", err)
			}
		})
	}
}

// TestConcurrentReads proves requests are served concurrently: eight reads
// must all be inside the attacher at once before any may finish (a device
// serving one request at a time would never get there).
func TestConcurrentReads(t *testing.T) {
	a, g, files := gated(t)
	c, h, _ := newClient(t, a, 64<<10)
	rootF, err := c.Attach("/")
	if err != nil {
		t.Fatal(err)
	}
	const n = 8
	want := files["big.bin"]
	type result struct {
		off int
		got []byte
		err error
	}
	results := make(chan result, n)
	var fs []ninep.File
	for i := range n {
		f := walk(t, rootF, "big.bin")
		if _, _, err := f.Open(ninep.ReadOnly); err != nil {
			t.Fatal(err)
		}
		fs = append(fs, f)
		go func(f ninep.File, off int) {
			buf := make([]byte, 32<<10)
			k, err := f.ReadAt(buf, int64(off))
			results <- result{off, buf[:k], err}
		}(f, i*100_003)
	}
	g.waitEntered(t, n)
	g.open()
	for range n {
		r := <-results
		if r.err != nil {
			t.Fatalf("read at %d: %v", r.off, r.err)
		}
		if !bytes.Equal(r.got, want[r.off:r.off+len(r.got)]) || len(r.got) == 0 {
			t.Errorf("read at %d: %d bytes, wrong data", r.off, len(r.got))
		}
	}
	// Many more concurrent whole-file reads through the same client.
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for i := range 16 {
		wg.Go(func() {
			name := []string{"hello.txt", "dir/nested.bin", "dir/sub/deeper.txt", "big.bin"}[i%4]
			_, f, err := rootF.Walk(strings.Split(name, "/"))
			if err != nil {
				errs <- err
				return
			}
			defer f.Close()
			if _, _, err := f.Open(ninep.ReadOnly); err != nil {
				errs <- err
				return
			}
			got := make([]byte, len(files[name])+1)
			k, err := f.ReadAt(got, 0)
			if k != len(files[name]) || !bytes.Equal(got[:k], files[name]) {
				errs <- fmt.Errorf("%s: %d bytes (err %v), want %d", name, k, err, len(files[name]))
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	for _, f := range fs {
		f.Close()
	}
	if err := h.FailErr(); err != nil {
		t.Errorf("device failed: %v", err)
	}
}

// TestHostileChains sends framing the guest could get wrong and checks
// each is answered on its own chain, and the device keeps serving.
func TestHostileChains(t *testing.T) {
	r := newRaw(t, staticTree(t))
	r.setup("b.txt")
	expect(t, r.do(tlopen(3, 2), 64), 13, 3)

	short := tread(9, 2, 0, 100)
	cases := []struct {
		name  string
		out   [][]byte
		in    int
		typ   uint8 // 0: expect an empty used entry
		errno uint32
		tag   uint16
	}{
		{"readable part shorter than a header", [][]byte{{1, 2, 3}}, 64, 0, 0, 0},
		{"no writable part", [][]byte{tclunk(9, 99)}, 0, 0, 0, 0},
		{"writable part shorter than a header", [][]byte{tclunk(9, 99)}, 5, 0, 0, 0},
		{"size field below 7", [][]byte{{3, 0, 0, 0, tTclunk, 9, 0, 0, 0, 0, 0}}, 64, tRlerror, eINVAL, 9},
		{"size field beyond the readable part", [][]byte{short[:len(short)-1]}, 64, tRlerror, eINVAL, 9},
		{"size field 4 GiB", [][]byte{{0xff, 0xff, 0xff, 0xff, tTclunk, 9, 0}}, 64, tRlerror, eINVAL, 9},
		{"message above msize", [][]byte{msg(tTwalk, 9, make([]byte, rawMsize))}, 64, tRlerror, eMSGSIZE, 9},
		{"NOTAG on Tclunk", [][]byte{tclunk(0xffff, 99)}, 64, tRlerror, eINVAL, 0xffff},
		{"answer larger than the writable part", [][]byte{tread(9, 2, 0, 5000)}, 1000, tRlerror, eMSGSIZE, 9},
		{"answer larger than the writable part, no room for an error", [][]byte{tread(9, 2, 0, 5000)}, 8, 0, 0, 0},
		{"undecodable body", [][]byte{msg(tTread, 9, []byte{1, 2, 3})}, 64, tRlerror, 0, 9},
		{"short Tflush", [][]byte{msg(tTflush, 9, []byte{1})}, 64, tRlerror, eINVAL, 9},
		{"Tflush of nothing outstanding", [][]byte{tflush(9, 1234)}, 64, tRflush, 0, 9},
		{"Tflush of itself", [][]byte{tflush(9, 9)}, 64, tRflush, 0, 9},
		{"header split over descriptors", [][]byte{tclunk(9, 99)[:3], tclunk(9, 99)[3:5], tclunk(9, 99)[5:]}, 64, tRlerror, 0, 9},
		{"unknown message type", [][]byte{msg(250, 9, []byte{1, 2, 3})}, 64, tRlerror, 0, 9},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r.h.Add(0, c.out, c.in)
			u := r.h.WaitUsed(0)
			if c.typ == 0 {
				if u.Len != 0 {
					t.Fatalf("used length %d, want 0", u.Len)
				}
			} else {
				rep := parse(t, u)
				expect(t, rep, c.typ, c.tag)
				if c.errno != 0 && rep.errno != c.errno {
					t.Fatalf("errno %d, want %d", rep.errno, c.errno)
				}
			}
			// The device still serves the guest.
			rep := r.do(tread(10, 2, 9990, 100), 200)
			expect(t, rep, tRread, 10)
			if !bytes.Equal(rep.body, append(u32(10), bytes.Repeat([]byte("b"), 10)...)) {
				t.Fatalf("Rread body %q", rep.body)
			}
		})
	}
	if err := r.h.FailErr(); err != nil {
		t.Fatalf("device failed: %v", err)
	}
}

// TestDuplicateTagAndFlush: a second request under an outstanding tag is
// refused on its own chain; Tflush is answered after the flushed request,
// in that order; a Tflush of a Tflush after both.
func TestDuplicateTagAndFlush(t *testing.T) {
	r, g := readInAttacher(t)
	expect(t, r.do(tread(20, 2, 0, 100), 200), tRlerror, 20) // duplicate
	r.h.Add(0, [][]byte{tflush(21, 20)}, 64)
	r.h.Add(0, [][]byte{tflush(22, 21)}, 64)
	// A later request overtakes the waiting flushes.
	expect(t, r.do(twalk(23, 1, 5, "hello.txt"), 256), tRwalk, 23)
	if u, ok := r.h.TryUsed(0); ok {
		t.Fatalf("chain %d answered while the flushed read is still in the attacher", u.Head)
	}
	g.open()
	var order []uint16
	for range 3 {
		rep := parse(t, r.h.WaitUsed(0))
		order = append(order, rep.tag)
		switch rep.tag {
		case 20:
			expect(t, rep, tRread, 20)
		default:
			expect(t, rep, tRflush, rep.tag)
		}
	}
	if !slices.Equal(order, []uint16{20, 21, 22}) {
		t.Fatalf("answer order %v, want [20 21 22]", order)
	}
	// The tags are free again.
	expect(t, r.do(tclunk(20, 5), 64), tRclunk, 20)
	if err := r.h.FailErr(); err != nil {
		t.Fatalf("device failed: %v", err)
	}
}

// TestUndecodableAmbiguous: an undecodable message while another request is
// with the server cannot be attributed; the device fails with ErrProtocol
// instead of answering a chain that may not be its own.
func TestUndecodableAmbiguous(t *testing.T) {
	r, g := readInAttacher(t)
	r.h.Add(0, [][]byte{msg(tTread, 21, []byte{1})}, 64)
	select {
	case <-r.h.Failed():
	case <-waitTimeout():
		t.Fatal("device did not fail (hang guard)")
	}
	if err := r.h.FailErr(); !errors.Is(err, p9.ErrProtocol) {
		t.Fatalf("Fail(%v), want ErrProtocol", err)
	}
	g.open()
	r.dev.Reset() // joins the read still in the attacher
	if u, ok := r.h.TryUsed(0); ok {
		t.Fatalf("chain %d answered after the device failed", u.Head)
	}
}

// TestMsizeNegotiation: Tversion's msize is capped at MaxMessage, and the
// negotiated msize bounds later messages.
func TestMsizeNegotiation(t *testing.T) {
	r := newRaw(t, staticTree(t))
	rep := r.do(tversion(0xffff, 1<<20), 64)
	expect(t, rep, tRversion, 0xffff)
	if m := le32(rep.body); m != rawMsize {
		t.Fatalf("Rversion msize %d, want the cap %d", m, rawMsize)
	}
	rep = r.do(tversion(0xffff, 5000), 64)
	if m := le32(rep.body); m != 5000 {
		t.Fatalf("Rversion msize %d, want 5000", m)
	}
	expect(t, r.do(msg(tTwalk, 9, make([]byte, 5000)), 64), tRlerror, 9)
	rep = r.do(tversion(0xffff, 100), 64)
	if m := le32(rep.body); m != p9.MinMessage {
		t.Fatalf("Rversion msize %d, want the floor %d", m, p9.MinMessage)
	}
	if err := r.h.FailErr(); err != nil {
		t.Fatalf("device failed: %v", err)
	}
}

func le32(b []byte) uint32 {
	if len(b) < 4 {
		return 0
	}
	return uint32(b[0]) | uint32(b[1])<<8 | uint32(b[2])<<16 | uint32(b[3])<<24
}

// TestResetJoinsAndDrops: Reset waits for a request in the attacher and
// never pushes its answer; the device serves again after re-activation;
// Close twice; no goroutine outlives Close.
func TestResetJoinsAndDrops(t *testing.T) {
	before := runtime.NumGoroutine()
	func() {
		r, g := readInAttacher(t)
		done := make(chan struct{})
		p9.SetShutdownHook(r.dev, g.open) // release the read only once Reset began
		go func() {
			r.dev.Reset()
			close(done)
		}()
		select {
		case <-done:
		case <-waitTimeout():
			t.Fatal("Reset did not return (hang guard)")
		}
		if u, ok := r.h.TryUsed(0); ok {
			t.Fatalf("chain %d pushed after Reset", u.Head)
		}
		// A fresh session: fids are gone, the tree is served again.
		r.h.Activate()
		r.setup("hello.txt")
		expect(t, r.do(tlopen(3, 2), 64), 13, 3)
		rep := r.do(tread(4, 2, 0, 100), 200)
		expect(t, rep, tRread, 4)
		if !bytes.HasSuffix(rep.body, []byte("hello, 9p\n")) {
			t.Fatalf("Rread %q", rep.body)
		}
		if err := r.dev.Close(); err != nil {
			t.Fatal(err)
		}
		if err := r.dev.Close(); err != nil {
			t.Fatal(err)
		}
		if err := r.dev.Activate(r.h.Activation()); !errors.Is(err, virtio.ErrClosed) {
			t.Fatalf("Activate after Close: %v, want ErrClosed", err)
		}
	}()
	checkGoroutines(t, before)
}

// TestClientLeak runs the client end to end and checks Close releases
// every goroutine, the 9P server's included.
func TestClientLeak(t *testing.T) {
	root, files := testTree(t)
	before := runtime.NumGoroutine()
	func() {
		c, _, dev := newClient(t, localfs.Attacher(root), 16<<10)
		rootF, err := c.Attach("/")
		if err != nil {
			t.Fatal(err)
		}
		f := walk(t, rootF, "dir/nested.bin")
		if got := readAll(t, f); !bytes.Equal(got, files["dir/nested.bin"]) {
			t.Fatal("wrong data")
		}
		c.Close()
		dev.Close()
	}()
	checkGoroutines(t, before)
}

// TestLargestAnswer: with the largest msize, a Tread of msize bytes gets an
// Rread 11 bytes longer than msize (the server does not shorten it). It is
// delivered when the chain has room, replaced by EMSGSIZE when not, and the
// stream keeps its framing either way.
func TestLargestAnswer(t *testing.T) {
	dir := t.TempDir()
	data := pattern(5<<20, 9)
	if err := os.WriteFile(filepath.Join(dir, "f"), data, 0o644); err != nil {
		t.Fatal(err)
	}
	dev, err := p9.New(p9.Options{Tag: "big", Attacher: localfs.Attacher(dir), MaxMessage: p9.MaxMessageLimit})
	if err != nil {
		t.Fatal(err)
	}
	h := virtiotest.NewHarness(t, dev, virtiotest.HarnessOptions{QueueSize: 4, DataPerQueue: 4 * 9 << 20, Features: features(dev)})
	r := &rawDevice{t: t, dev: dev, h: h}
	expect(t, r.do(tversion(0xffff, p9.MaxMessageLimit), 64), tRversion, 0xffff)
	expect(t, r.do(tattach(1, 1), 64), tRattach, 1)
	expect(t, r.do(twalk(2, 1, 2, "f"), 64), tRwalk, 2)
	expect(t, r.do(tlopen(3, 2), 64), 13, 3)
	const count = p9.MaxMessageLimit
	rep := r.do(tread(4, 2, 100, count), count+11)
	expect(t, rep, tRread, 4)
	if le32(rep.body) != count || !bytes.Equal(rep.body[4:], data[100:100+count]) {
		t.Fatalf("Rread of %d bytes, count %d: wrong data", len(rep.body), le32(rep.body))
	}
	rep = r.do(tread(5, 2, 0, count), 1<<20)
	expect(t, rep, tRlerror, 5)
	if rep.errno != eMSGSIZE {
		t.Fatalf("errno %d, want EMSGSIZE", rep.errno)
	}
	rep = r.do(tread(6, 2, 7, 10), 64)
	expect(t, rep, tRread, 6)
	if !bytes.Equal(rep.body[4:], data[7:17]) {
		t.Fatal("framing lost after a large answer")
	}
	if err := h.FailErr(); err != nil {
		t.Fatalf("device failed: %v", err)
	}
}

// TestXattrwalkUnsupported: the device answers Txattrwalk itself with
// EOPNOTSUPP (a Linux client then reports "no xattrs", which overlayfs
// accepts on a lower layer) instead of the library's EINVAL.
func TestXattrwalkUnsupported(t *testing.T) {
	r := newRaw(t, staticTree(t))
	r.setup()
	rep := r.do(msg(30, 3, u32(2), u32(3), str("trusted.overlay.opaque")), 64)
	expect(t, rep, tRlerror, 3)
	if rep.errno != 95 {
		t.Fatalf("Txattrwalk errno %d, want EOPNOTSUPP (95)", rep.errno)
	}
	// The session still serves.
	expect(t, r.do(tclunk(4, 2), 64), tRclunk, 4)
}
