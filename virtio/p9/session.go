package p9

import (
	"encoding/binary"
	"fmt"
	"io"
	"log/slog"
	"sync"

	"github.com/gosandbox/sandbox/virtio"
)

// request is one descriptor chain holding a T-message.
type request struct {
	ch   virtio.Chain // own copies of the buffer lists (Pop reuses its Chain)
	wlen int          // writable bytes
	size uint32       // validated T-message size
	tag  uint16       // the guest's tag
	// prefix is served to the server instead of the chain's first bytes:
	// the validated header (and Tversion's capped msize), so a guest
	// rewriting its buffer cannot change the framing the device checked.
	prefix    [hdrLen + 4]byte
	prefixLen int

	// Guarded by session.mu.
	off       int        // bytes delivered to the server
	received  bool       // every byte delivered
	answering bool       // the server's answer is being copied in
	version   bool       // a Tversion with a non-zero msize
	flushers  []*request // Tflush requests answered after this one
}

// answer is a chain ready for the used ring.
type answer struct {
	head    uint16
	written uint32
}

// session is one activation: a queue worker, a 9P server connection over
// an in-memory stream, and the table of outstanding requests.
type session struct {
	d    *Device
	a    *virtio.Activation
	q    *virtio.Queue
	log  *slog.Logger
	stop chan struct{}
	wg   sync.WaitGroup

	qmu sync.Mutex // serializes use of q (worker pops, answers push)

	mu         sync.Mutex
	cond       *sync.Cond          // inbox gained a request or closed
	reqs       map[uint16]*request // outstanding, by guest tag
	inbox      []*request          // forwarded, not yet fully read by the server
	closed     bool                // shutting down: EOF to the server, answers dropped
	broken     bool                // Fail was reported: answers dropped
	limit      uint32              // largest T-message accepted now
	negotiated uint32              // msize of the last Rversion
	versions   int                 // Tversions with the server, unanswered
}

func newSession(d *Device, a *virtio.Activation, q *virtio.Queue) *session {
	s := &session{
		d: d, a: a, q: q, log: d.log,
		stop:       make(chan struct{}),
		reqs:       make(map[uint16]*request),
		limit:      d.maxMsg,
		negotiated: d.maxMsg,
	}
	s.cond = sync.NewCond(&s.mu)
	return s
}

func (s *session) start() {
	s.wg.Add(2)
	go s.run()
	go func() {
		defer s.wg.Done()
		s.d.server.Handle(tstream{s}, &rstream{s: s})
		s.mu.Lock()
		stopping := s.closed
		s.mu.Unlock()
		if !stopping {
			s.fail(fmt.Errorf("%w: its stream ended while the device was active (see the debug log); the guest must reset the device", ErrServerStopped))
		}
	}()
}

// shutdown ends the session and joins its goroutines. In-flight Attacher
// calls finish first; their answers are dropped.
func (s *session) shutdown() {
	s.mu.Lock()
	s.closed = true
	s.cond.Broadcast()
	s.mu.Unlock()
	close(s.stop)
	if h := s.d.testHookShutdown; h != nil {
		h()
	}
	s.wg.Wait()
}

// fail marks the session broken; err (if not nil) goes to Activation.Fail.
func (s *session) fail(err error) {
	s.mu.Lock()
	done := s.broken || s.closed
	s.broken = true
	s.cond.Broadcast()
	s.mu.Unlock()
	if !done && err != nil && s.a.Fail != nil {
		s.a.Fail(err)
	}
}

func (s *session) isBroken() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.broken
}

// run is the queue worker: it pops chains, validates their framing and
// hands them to the server (or answers them itself).
func (s *session) run() {
	defer s.wg.Done()
	var ch virtio.Chain
	var ans []answer
	for {
		var batch []*request
		s.qmu.Lock()
		var qerr error
		for {
			ok, err := s.q.Pop(&ch)
			if err != nil {
				qerr = err
				break
			}
			if !ok {
				break
			}
			batch = append(batch, &request{ch: virtio.Chain{
				Head:     ch.Head,
				Readable: append([][]byte(nil), ch.Readable...),
				Writable: append([][]byte(nil), ch.Writable...),
			}})
		}
		idle := qerr != nil || s.q.Arm()
		s.qmu.Unlock()
		ans = ans[:0]
		for _, r := range batch {
			ans = s.submit(r, ans)
		}
		s.push(ans)
		if qerr != nil {
			// The queue reported its *virtio.QueueError through its Fail
			// callback already.
			s.log.Debug("p9: broken virtqueue", "err", qerr)
			s.fail(nil)
			return
		}
		if s.isBroken() {
			return
		}
		if idle {
			select {
			case <-s.stop:
				return
			case <-s.q.Kicks():
			}
		} else {
			select {
			case <-s.stop:
				return
			default:
			}
		}
	}
}

// push returns answered chains to the driver.
func (s *session) push(ans []answer) {
	if len(ans) == 0 {
		return
	}
	s.qmu.Lock()
	for _, a := range ans {
		s.q.Push(a.head, a.written)
	}
	s.q.Notify()
	s.qmu.Unlock()
}

// rlerror writes Rlerror(errno) under r's tag; a chain too small for it is
// returned empty.
func rlerror(r *request, errno uint32) answer {
	if r.wlen < rlerrorLen {
		return answer{r.ch.Head, 0}
	}
	var b [rlerrorLen]byte
	binary.LittleEndian.PutUint32(b[0:], rlerrorLen)
	b[4] = msgRlerror
	binary.LittleEndian.PutUint16(b[5:], r.tag)
	binary.LittleEndian.PutUint32(b[7:], errno)
	r.ch.CopyToGuest(0, b[:])
	return answer{r.ch.Head, rlerrorLen}
}

// rflush writes Rflush under r's tag (r has at least 7 writable bytes).
func rflush(r *request) answer {
	var b [hdrLen]byte
	binary.LittleEndian.PutUint32(b[0:], hdrLen)
	b[4] = msgRflush
	binary.LittleEndian.PutUint16(b[5:], r.tag)
	r.ch.CopyToGuest(0, b[:])
	return answer{r.ch.Head, hdrLen}
}

// submit validates r's framing and forwards it to the server, or appends
// the device's own answer to ans.
func (s *session) submit(r *request, ans []answer) []answer {
	rl := r.ch.ReadableLen()
	r.wlen = r.ch.WritableLen()
	if rl < hdrLen || r.wlen < hdrLen {
		s.log.Debug("p9: chain too short for a 9P message; returned empty", "readable", rl, "writable", r.wlen)
		return append(ans, answer{r.ch.Head, 0})
	}
	// Copy the header (and the first 4 body bytes) out of guest memory
	// once; everything below decides on this copy.
	var hdr [hdrLen + 4]byte
	n := r.ch.CopyFromGuest(hdr[:], 0)
	size := binary.LittleEndian.Uint32(hdr[0:])
	typ := hdr[4]
	r.tag = binary.LittleEndian.Uint16(hdr[5:])
	reject := func(errno uint32, why string) []answer {
		s.log.Debug("p9: request rejected", "why", why, "type", typ, "tag", r.tag, "size", size)
		return append(ans, rlerror(r, errno))
	}
	if size < hdrLen || uint64(size) > uint64(rl) {
		return reject(errnoEINVAL, fmt.Sprintf("size field outside 7..%d (the readable part)", rl))
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed || s.broken {
		return ans // dropped: the guest must reset the device
	}
	if size > s.limit {
		return reject(errnoEMSGSIZE, fmt.Sprintf("larger than msize %d", s.limit))
	}
	if r.tag == noTag && typ != msgTversion {
		return reject(errnoEINVAL, "NOTAG on a message other than Tversion")
	}
	if _, dup := s.reqs[r.tag]; dup {
		return reject(errnoEINVAL, "tag already outstanding")
	}
	switch typ {
	case msgTxattrwalk:
		// Extended attributes are not served: hugelgupf/p9 (v0.3.0)
		// answers every failed GetXattr, ENODATA included, with EINVAL,
		// and overlayfs takes an EINVAL from getxattr on a lower layer
		// as a failed lookup. EOPNOTSUPP is what Linux reads as "this
		// file system has no xattrs".
		return append(ans, rlerror(r, errnoEOPNOTSUPP))
	case msgTflush:
		if size < hdrLen+2 || n < hdrLen+2 {
			return reject(errnoEINVAL, "short Tflush")
		}
		if old := s.reqs[binary.LittleEndian.Uint16(hdr[7:])]; old != nil {
			old.flushers = append(old.flushers, r)
			s.reqs[r.tag] = r
			return ans
		}
		return append(ans, rflush(r))
	case msgTversion:
		if size >= hdrLen+4 && n >= hdrLen+4 {
			if m := binary.LittleEndian.Uint32(hdr[7:]); m != 0 {
				m = max(min(m, s.d.maxMsg), MinMessage)
				binary.LittleEndian.PutUint32(hdr[7:], m)
				r.version = true
				s.versions++
				s.limit = min(s.limit, m)
			}
			r.prefixLen = hdrLen + 4
		}
	}
	r.prefix = hdr
	if r.prefixLen == 0 {
		r.prefixLen = hdrLen
	}
	r.size = size
	s.reqs[r.tag] = r
	s.inbox = append(s.inbox, r)
	s.cond.Signal()
	return ans
}

// tstream is the T-message stream the server reads.
type tstream struct{ s *session }

// Read implements io.Reader: it blocks until a request is queued and
// returns bytes of one message at a time; io.EOF once the session ends.
func (t tstream) Read(p []byte) (int, error) {
	s := t.s
	if len(p) == 0 {
		return 0, nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for len(s.inbox) == 0 && !s.closed && !s.broken {
		s.cond.Wait()
	}
	if s.closed || s.broken {
		return 0, io.EOF
	}
	r := s.inbox[0]
	n := 0
	if r.off < r.prefixLen {
		n = copy(p, r.prefix[r.off:r.prefixLen])
		r.off += n
	}
	if k := min(len(p)-n, int(r.size)-r.off); k > 0 {
		got := r.ch.CopyFromGuest(p[n:n+k], r.off)
		if got < k {
			// Cannot happen (size <= readable length); keep the framing.
			clear(p[n+got : n+k])
		}
		n += k
		r.off += k
	}
	if r.off >= int(r.size) {
		r.received = true
		s.inbox[0] = nil
		s.inbox = s.inbox[1:]
	}
	return n, nil
}

// Close implements io.Closer; the session closes the stream itself.
func (tstream) Close() error { return nil }

// rstream is the R-message stream the server writes. The server writes
// one whole message at a time (under its send lock); rstream reassembles
// the header, finds the chain by tag and copies the rest straight into the
// chain's writable part.
type rstream struct {
	s *session

	mu   sync.Mutex
	hdr  [hdrLen + 4]byte // header and the first 4 body bytes
	n    int              // bytes of the current message seen
	size int
	typ  uint8
	req  *request // nil: drop the message
	fits bool     // the message fits req's writable part
	lost bool     // the stream lost its framing: drop everything
}

// Write implements io.Writer. It never blocks and never fails: answers for
// a closed or broken session are dropped.
func (w *rstream) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	total := len(p)
	for len(p) > 0 && !w.lost {
		if w.n < hdrLen {
			k := copy(w.hdr[w.n:hdrLen], p)
			w.n += k
			p = p[k:]
			if w.n == hdrLen {
				w.begin()
				if !w.lost && w.n >= w.size {
					w.finish()
				}
			}
			continue
		}
		k := min(len(p), w.size-w.n)
		if w.n < len(w.hdr) {
			copy(w.hdr[w.n:], p[:k])
		}
		if w.req != nil && w.fits {
			w.req.ch.CopyToGuest(w.n, p[:k])
		}
		w.n += k
		p = p[k:]
		if w.n >= w.size {
			w.finish()
		}
	}
	return total, nil
}

// Close implements io.Closer.
func (w *rstream) Close() error { return nil }

// begin looks up the chain for the message whose header is in w.hdr.
func (w *rstream) begin() {
	s := w.s
	size := binary.LittleEndian.Uint32(w.hdr[0:])
	w.typ = w.hdr[4]
	tag := binary.LittleEndian.Uint16(w.hdr[5:])
	w.req, w.fits = nil, false
	w.size = int(size)
	if size < hdrLen {
		// The server never writes this; the stream has no framing left.
		w.lost = true
		s.fail(fmt.Errorf("%w: it wrote an answer of %d bytes", ErrServerStopped, size))
		return
	}
	var failErr error
	s.mu.Lock()
	if !s.closed && !s.broken {
		switch {
		case tag != noTag || w.typ == msgRversion:
			if r := s.reqs[tag]; r != nil && r.received && !r.answering {
				w.req = r
			} else {
				s.log.Debug("p9: server answered a tag with no request; dropped", "tag", tag, "type", w.typ)
			}
		default:
			// An answer without a tag: the server could not decode a
			// message. It is the one request with the server and
			// unanswered, if there is exactly one.
			var cand *request
			count := 0
			for _, r := range s.reqs {
				if r.received && !r.answering {
					cand = r
					count++
				}
			}
			if count == 1 {
				w.req = cand
			} else {
				failErr = fmt.Errorf("%w: %d candidate requests; the guest must reset the device", ErrProtocol, count)
			}
		}
		if w.req != nil {
			w.req.answering = true
		}
	}
	s.mu.Unlock()
	if failErr != nil {
		s.fail(failErr)
		return
	}
	if w.req != nil && w.size <= w.req.wlen {
		w.fits = true
		var h [hdrLen]byte
		copy(h[:], w.hdr[:hdrLen])
		binary.LittleEndian.PutUint16(h[5:], w.req.tag)
		w.req.ch.CopyToGuest(0, h[:])
	}
}

// finish completes the current message: the chain and any Tflush waiting
// on it go to the used ring.
func (w *rstream) finish() {
	s, r := w.s, w.req
	w.n, w.req = 0, nil
	if r == nil {
		return
	}
	s.mu.Lock()
	if s.closed || s.broken {
		s.mu.Unlock()
		return
	}
	delete(s.reqs, r.tag)
	if r.version {
		s.versions--
		var m uint32
		if w.typ == msgRversion && w.size >= hdrLen+4 {
			m = binary.LittleEndian.Uint32(w.hdr[hdrLen:])
		}
		switch {
		case m != 0 && s.versions == 0:
			s.limit, s.negotiated = m, m
		case m != 0:
			s.limit, s.negotiated = min(s.limit, m), m
		case s.versions == 0:
			s.limit = s.negotiated
		}
	}
	// Tflush requests waiting on r (and on those, in turn).
	var doneBuf [1]*request
	done := append(doneBuf[:0], r)
	for i := 0; i < len(done); i++ {
		for _, f := range done[i].flushers {
			delete(s.reqs, f.tag)
			done = append(done, f)
		}
	}
	s.mu.Unlock()

	var ansBuf [1]answer
	ans := ansBuf[:0]
	if w.fits {
		ans = append(ans, answer{r.ch.Head, uint32(w.size)})
	} else {
		s.log.Debug("p9: answer larger than the chain's writable part; sent EMSGSIZE", "tag", r.tag, "size", w.size, "writable", r.wlen)
		ans = append(ans, rlerror(r, errnoEMSGSIZE))
	}
	for _, f := range done[1:] {
		ans = append(ans, rflush(f))
	}
	s.push(ans)
}
