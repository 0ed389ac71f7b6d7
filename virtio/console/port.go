package console

import (
	"context"
	"io"

	"github.com/gosandbox/sandbox/virtio"
)

// Port is the host side of a named console port: an io.ReadWriteCloser
// with back-pressure in both directions. Read and Write may be called
// concurrently with each other; concurrent Reads (or Writes) are
// serialized.
type Port struct {
	d    *Device
	id   int
	name string

	data chan []byte   // guest-to-host chunks, unbuffered; nil means hang-up
	done chan struct{} // closed by Close
	hup  chan struct{} // the guest closed the port (signal to guestTx)

	rmu     chan struct{} // read lock (a channel so it can be abandoned)
	pending []byte        // guarded by rmu
	wmu     chan struct{} // write lock

	// Guarded by d.mu.
	guestReady bool // the guest added the port (PORT_READY)
	guestOpen  bool // a guest process has the port open (PORT_OPEN)
	hostClosed bool
}

func newPort(d *Device, id int, name string) *Port {
	return &Port{
		d: d, id: id, name: name,
		data: make(chan []byte),
		done: make(chan struct{}),
		hup:  make(chan struct{}, 1),
		rmu:  make(chan struct{}, 1),
		wmu:  make(chan struct{}, 1),
	}
}

// Name returns the port name.
func (p *Port) Name() string { return p.name }

// ID returns the port number (1 and up).
func (p *Port) ID() int { return p.id }

// GuestOpen reports whether a guest process has the port open.
func (p *Port) GuestOpen() bool {
	p.d.mu.Lock()
	defer p.d.mu.Unlock()
	return p.guestOpen
}

// WaitGuestOpen blocks until the guest has the port open (open true) or
// closed (open false), the port is closed, or ctx is done.
func (p *Port) WaitGuestOpen(ctx context.Context, open bool) error {
	for {
		p.d.mu.Lock()
		state, closed, changed := p.guestOpen, p.hostClosed, p.d.changed
		p.d.mu.Unlock()
		if state == open {
			return nil
		}
		if closed {
			return ErrPortClosed
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// Read reads what the guest wrote to the port. It blocks until data comes
// or the port is closed (ErrPortClosed). When the guest closes its end
// (e.g. the agent process exits), Read returns io.EOF once everything the
// guest wrote before closing has been read; if the guest opens the port
// again, later Reads return its new data.
func (p *Port) Read(b []byte) (int, error) {
	select {
	case p.rmu <- struct{}{}:
	case <-p.done:
		return 0, ErrPortClosed
	}
	defer func() { <-p.rmu }()
	if len(b) == 0 {
		return 0, nil
	}
	if len(p.pending) == 0 {
		select {
		case c := <-p.data:
			if c == nil {
				return 0, io.EOF
			}
			p.pending = c
		case <-p.done:
			return 0, ErrPortClosed
		}
	}
	n := copy(b, p.pending)
	p.pending = p.pending[n:]
	return n, nil
}

// Write sends b to the guest. It blocks until a guest process has the
// port open and has posted receive buffers for all of b, or the port is
// closed (ErrPortClosed). Data written while the guest resets the device
// may be lost with the reset.
func (p *Port) Write(b []byte) (int, error) {
	select {
	case p.wmu <- struct{}{}:
	case <-p.done:
		return 0, ErrPortClosed
	}
	defer func() { <-p.wmu }()
	written := 0
	var ch virtio.Chain
	for written < len(b) {
		s, q, changed, err := p.writable()
		if err != nil {
			return written, err
		}
		if s == nil {
			select {
			case <-changed:
			case <-p.done:
				return written, ErrPortClosed
			}
			continue
		}
		// s.wg is held: the queue stays valid until Done.
		for written < len(b) {
			ok, err := q.PopOrArm(&ch)
			if err != nil {
				break // the device is broken until the guest resets it
			}
			if !ok {
				q.Notify()
				select {
				case <-q.Kicks():
					continue
				case <-s.stop:
				case <-p.done:
				case <-changed:
				}
				break
			}
			n := ch.CopyToGuest(0, b[written:])
			q.Push(ch.Head, uint32(n))
			written += n
		}
		q.Notify()
		if q.Err() != nil {
			// Wait for the reset that a broken device needs.
			select {
			case <-s.stop:
			case <-p.done:
			}
		}
		s.wg.Done()
	}
	return written, nil
}

// writable returns the current session and the port's receive queue when
// the guest can take data, registering the caller in the session's
// WaitGroup; otherwise a channel that changes with the device state.
func (p *Port) writable() (*session, *virtio.Queue, <-chan struct{}, error) {
	d := p.d
	d.mu.Lock()
	defer d.mu.Unlock()
	if p.hostClosed {
		return nil, nil, nil, ErrPortClosed
	}
	s := d.sess
	if s == nil || !p.guestOpen {
		return nil, nil, d.changed, nil
	}
	q := s.a.Queues[rxQueue(p.id)]
	if q == nil {
		return nil, nil, d.changed, nil
	}
	s.wg.Add(1)
	return s, q, d.changed, nil
}

// Close closes the host side: reads and writes return ErrPortClosed, and
// the guest is told the host end went away (its reads see end of file).
// It is safe to call more than once.
func (p *Port) Close() error {
	d := p.d
	d.mu.Lock()
	defer d.mu.Unlock()
	if p.hostClosed {
		return nil
	}
	if s := d.sess; s != nil && p.guestReady {
		d.sendLocked(s, p.id, EventPortOpen, 0, "")
	}
	p.closeLocked()
	return nil
}

func (p *Port) closeLocked() {
	if !p.hostClosed {
		p.hostClosed = true
		close(p.done)
		p.d.broadcastLocked()
	}
}

// guestTx moves guest output to Read, one chunk at a time: the next
// transmit buffer is taken only after the previous one was read. After the
// guest closes the port it drains the ring, then hands Read a hang-up.
func (p *Port) guestTx(s *session, q *virtio.Queue) {
	defer s.wg.Done()
	var ch virtio.Chain
	hangup := false
	for {
		for {
			ok, err := q.Pop(&ch)
			if err != nil {
				return
			}
			if !ok {
				break
			}
			total := ch.ReadableLen()
			for off := 0; off < total; {
				chunk := make([]byte, min(total-off, MaxChunk))
				ch.CopyFromGuest(chunk, off)
				off += len(chunk)
				if !p.deliver(s, chunk) {
					if s.isStopped() {
						return
					}
					off = total // nobody will read: drop
				}
			}
			q.Push(ch.Head, 0)
			q.Notify()
		}
		if hangup {
			hangup = false
			if !p.deliver(s, nil) && s.isStopped() {
				return
			}
		}
		if !q.Arm() {
			continue
		}
		select {
		case <-s.stop:
			return
		case <-q.Kicks():
		case <-p.hup:
			hangup = true
		}
	}
}

// deliver hands a chunk (nil: hang-up) to Read. It reports false when the
// port was closed or the session stopped first.
func (p *Port) deliver(s *session, chunk []byte) bool {
	select {
	case p.data <- chunk:
		return true
	case <-p.done:
		return false
	case <-s.stop:
		return false
	}
}

func (s *session) isStopped() bool {
	select {
	case <-s.stop:
		return true
	default:
		return false
	}
}
