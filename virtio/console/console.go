// Package console is the virtio console device (VIRTIO 1.2 section 5.3)
// with VIRTIO_CONSOLE_F_MULTIPORT: port 0 is the guest's hvc0, whose output
// goes to an io.Writer (the console log), and further named ports (e.g.
// "gosandbox.agent", visible in the guest as /dev/virtio-ports/<name>) are
// exposed on the host as io.ReadWriteCloser values with back-pressure.
//
// Guest-to-host data moves only as fast as the host reads it: the device
// takes the next transmit buffer from the guest only when the previous one
// has been read. Host-to-guest writes block until the guest has opened the
// port and posted receive buffers (Linux discards data that arrives on a
// port no process has open, so the device waits for the guest's PORT_OPEN).
// When the guest closes a port (its agent exited), Read returns io.EOF after
// the data written before the close, so a host protocol client sees the
// channel end as it would on a socket.
package console

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"sync"

	"github.com/gosandbox/sandbox/virtio"
)

// Feature bits (VIRTIO 1.2 5.3.3).
const (
	FeatureSize       = 1 << 0
	FeatureMultiport  = 1 << 1
	FeatureEmergWrite = 1 << 2
)

// Control events (struct virtio_console_control.event).
const (
	EventDeviceReady  = 0
	EventDeviceAdd    = 1
	EventDeviceRemove = 2
	EventPortReady    = 3
	EventConsolePort  = 4
	EventResize       = 5
	EventPortOpen     = 6
	EventPortName     = 7
)

const (
	// QueueSize is the size of every queue.
	QueueSize = 128
	// MaxPorts is the most ports a device has (port 0 included).
	MaxPorts = 32
	// MaxChunk caps the guest data held in host memory per port.
	MaxChunk = 64 << 10

	ctrlRx     = 2 // control receiveq (device to driver)
	ctrlTx     = 3 // control transmitq (driver to device)
	ctrlLen    = 8
	configSize = 12
)

// ErrPortClosed is returned by Port reads and writes after the port or the
// device was closed.
var ErrPortClosed = errors.New("console: port is closed")

// ErrOptions is matched by errors from New for invalid options.
var ErrOptions = errors.New("console: invalid options")

// Options configures a console device.
type Options struct {
	// Console receives what the guest writes to hvc0 (port 0). nil
	// discards it. It must not block for long: a guest reset waits for it.
	Console io.Writer
	// Ports names the ports after port 0 (ids 1, 2, ...), e.g.
	// "gosandbox.agent". Names are unique, non-empty, at most 127 bytes,
	// without '/' or NUL.
	Ports []string
	// Logger receives debug records (guest protocol errors). nil discards.
	Logger *slog.Logger
}

// Device is a multiport virtio console.
type Device struct {
	cons  io.Writer
	log   *slog.Logger
	ports []*Port // ports[0] is the console (hvc0)

	mu      sync.Mutex
	sess    *session
	changed chan struct{} // closed and replaced on any state change
	closed  bool
}

// session is one activation of the device.
type session struct {
	a      *virtio.Activation
	stop   chan struct{}
	wg     sync.WaitGroup // workers and host writers using the queues
	ready  bool           // the driver sent DEVICE_READY
	outbox [][]byte       // control messages waiting for control rx buffers
	notify chan struct{}  // outbox has messages
}

var _ virtio.Device = (*Device)(nil)

// New returns a console device.
func New(opts Options) (*Device, error) {
	if len(opts.Ports)+1 > MaxPorts {
		return nil, fmt.Errorf("%w: %d named ports, at most %d", ErrOptions, len(opts.Ports), MaxPorts-1)
	}
	d := &Device{cons: opts.Console, log: opts.Logger, changed: make(chan struct{})}
	if d.cons == nil {
		d.cons = io.Discard
	}
	if d.log == nil {
		d.log = slog.New(slog.DiscardHandler)
	}
	seen := map[string]bool{}
	d.ports = append(d.ports, newPort(d, 0, ""))
	for i, name := range opts.Ports {
		if name == "" || len(name) > 127 || seen[name] || containsAny(name, "/\x00") {
			return nil, fmt.Errorf("%w: port name %q (empty, duplicate, too long, or containing '/' or NUL)", ErrOptions, name)
		}
		seen[name] = true
		d.ports = append(d.ports, newPort(d, i+1, name))
	}
	return d, nil
}

func containsAny(s, chars string) bool {
	for i := range len(s) {
		for j := range len(chars) {
			if s[i] == chars[j] {
				return true
			}
		}
	}
	return false
}

// ConsoleInput returns a writer whose bytes the guest reads from hvc0 (for
// example keystrokes for a shell on the console). Writes block until the
// guest has set up hvc0 and posted receive buffers; they fail with
// ErrPortClosed after Close.
func (d *Device) ConsoleInput() io.Writer { return d.ports[0] }

// Port returns the named port, or nil.
func (d *Device) Port(name string) *Port {
	for _, p := range d.ports[1:] {
		if p.name == name {
			return p
		}
	}
	return nil
}

// Type implements virtio.Device.
func (d *Device) Type() virtio.DeviceType { return virtio.TypeConsole }

// Features implements virtio.Device.
func (d *Device) Features() uint64 { return FeatureMultiport }

// QueueSizes implements virtio.Device: two queues per port plus the two
// control queues (after port 0's).
func (d *Device) QueueSizes() []uint16 {
	s := make([]uint16, 2*(len(d.ports)+1))
	for i := range s {
		s[i] = QueueSize
	}
	return s
}

// ConfigSize implements virtio.Device.
func (d *Device) ConfigSize() int { return configSize }

// ReadConfig implements virtio.Device: cols, rows, max_nr_ports, emerg_wr.
func (d *Device) ReadConfig(off int, p []byte) {
	var c [configSize]byte
	binary.LittleEndian.PutUint32(c[4:], uint32(len(d.ports)))
	virtio.ReadConfigAt(c[:], off, p)
}

// WriteConfig implements virtio.Device (emerg_wr is not offered).
func (d *Device) WriteConfig(int, []byte) {}

func rxQueue(id int) int {
	if id == 0 {
		return 0
	}
	return 2 + 2*id
}

func txQueue(id int) int { return rxQueue(id) + 1 }

// broadcastLocked wakes every waiter on device state.
func (d *Device) broadcastLocked() {
	close(d.changed)
	d.changed = make(chan struct{})
}

// Activate implements virtio.Device.
func (d *Device) Activate(a *virtio.Activation) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return virtio.ErrClosed
	}
	if a.Features&FeatureMultiport == 0 {
		// Without multiport only port 0 exists; named ports never open.
		s := &session{a: a, stop: make(chan struct{}), notify: make(chan struct{}, 1)}
		d.sess = s
		if q := a.Queues[1]; q != nil {
			s.wg.Add(1)
			go d.consoleTx(s, q)
		}
		d.broadcastLocked()
		return nil
	}
	s := &session{a: a, stop: make(chan struct{}), notify: make(chan struct{}, 1)}
	d.sess = s
	if q := a.Queues[1]; q != nil {
		s.wg.Add(1)
		go d.consoleTx(s, q)
	}
	if a.Queues[ctrlRx] != nil && a.Queues[ctrlTx] != nil {
		s.wg.Add(1)
		go d.control(s, a.Queues[ctrlRx], a.Queues[ctrlTx])
	}
	for _, p := range d.ports[1:] {
		select {
		case <-p.hup: // from a previous session
		default:
		}
		if q := a.Queues[txQueue(p.id)]; q != nil {
			s.wg.Add(1)
			go p.guestTx(s, q)
		}
	}
	d.broadcastLocked()
	return nil
}

// Reset implements virtio.Device.
func (d *Device) Reset() {
	d.mu.Lock()
	s := d.stopLocked()
	d.mu.Unlock()
	if s != nil {
		s.wg.Wait()
	}
}

func (d *Device) stopLocked() *session {
	s := d.sess
	if s == nil {
		return nil
	}
	d.sess = nil
	close(s.stop)
	for _, p := range d.ports {
		p.guestOpen = false
		p.guestReady = false
	}
	d.broadcastLocked()
	return s
}

// Close implements virtio.Device: it stops the device and closes every
// port (their reads and writes return ErrPortClosed).
func (d *Device) Close() error {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return nil
	}
	d.closed = true
	s := d.stopLocked()
	for _, p := range d.ports {
		p.closeLocked()
	}
	d.mu.Unlock()
	if s != nil {
		s.wg.Wait()
	}
	return nil
}

// consoleTx copies hvc0 output to the console writer.
func (d *Device) consoleTx(s *session, q *virtio.Queue) {
	defer s.wg.Done()
	var ch virtio.Chain
	for q.Wait(s.stop) {
		for {
			ok, err := q.Pop(&ch)
			if err != nil || !ok {
				break
			}
			for _, b := range ch.Readable {
				if _, err := d.cons.Write(b); err != nil {
					d.log.Debug("console: writer", "err", err)
				}
			}
			q.Push(ch.Head, 0)
		}
		q.Notify()
	}
}

// send queues a control message for the driver.
func (d *Device) sendLocked(s *session, id int, event, value uint16, extra string) {
	if s == nil || !s.ready {
		return
	}
	m := make([]byte, ctrlLen+len(extra))
	binary.LittleEndian.PutUint32(m[0:], uint32(id))
	binary.LittleEndian.PutUint16(m[4:], event)
	binary.LittleEndian.PutUint16(m[6:], value)
	copy(m[ctrlLen:], extra)
	s.outbox = append(s.outbox, m)
	select {
	case s.notify <- struct{}{}:
	default:
	}
}

// control runs the control queues: it handles driver messages and delivers
// queued device messages as the driver posts receive buffers.
func (d *Device) control(s *session, rx, tx *virtio.Queue) {
	defer s.wg.Done()
	var ch virtio.Chain
	for {
		// Driver to device.
		for {
			ok, err := tx.Pop(&ch)
			if err != nil {
				return
			}
			if !ok {
				break
			}
			var m [ctrlLen]byte
			n := ch.CopyFromGuest(m[:], 0)
			tx.Push(ch.Head, 0)
			if n == ctrlLen {
				d.handleControl(s, binary.LittleEndian.Uint32(m[0:]),
					binary.LittleEndian.Uint16(m[4:]), binary.LittleEndian.Uint16(m[6:]))
			} else {
				d.log.Debug("console: short control message", "len", n)
			}
		}
		tx.Notify()
		// Device to driver.
		for {
			d.mu.Lock()
			if len(s.outbox) == 0 {
				d.mu.Unlock()
				break
			}
			ok, err := rx.Pop(&ch)
			if err != nil {
				d.mu.Unlock()
				return
			}
			if !ok {
				d.mu.Unlock()
				break
			}
			m := s.outbox[0]
			s.outbox = s.outbox[1:]
			d.mu.Unlock()
			n := ch.CopyToGuest(0, m)
			rx.Push(ch.Head, uint32(n))
		}
		rx.Notify()
		if rx.Err() != nil || tx.Err() != nil {
			return
		}
		idle := tx.Arm()
		d.mu.Lock()
		pendingOut := len(s.outbox) > 0
		d.mu.Unlock()
		if pendingOut && !rx.Arm() {
			idle = false
		}
		if !idle {
			continue
		}
		select {
		case <-s.stop:
			return
		case <-tx.Kicks():
		case <-rx.Kicks():
		case <-s.notify:
		}
	}
}

func (d *Device) handleControl(s *session, id uint32, event, value uint16) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.sess != s {
		return
	}
	if event == EventDeviceReady {
		if value != 1 {
			d.log.Debug("console: driver failed to initialize")
			return
		}
		if s.ready {
			return
		}
		s.ready = true
		for _, p := range d.ports {
			d.sendLocked(s, p.id, EventDeviceAdd, 0, "")
		}
		return
	}
	if id >= uint32(len(d.ports)) {
		d.log.Debug("console: control message for unknown port", "id", id, "event", event)
		return
	}
	p := d.ports[id]
	switch event {
	case EventPortReady:
		if value != 1 {
			d.log.Debug("console: guest failed to add port", "id", id)
			return
		}
		if p.guestReady {
			return
		}
		p.guestReady = true
		if p.id == 0 {
			d.sendLocked(s, 0, EventConsolePort, 1, "")
			return
		}
		d.sendLocked(s, p.id, EventPortName, 0, p.name)
		if !p.hostClosed {
			d.sendLocked(s, p.id, EventPortOpen, 1, "")
		}
	case EventPortOpen:
		open := value == 1
		if p.guestOpen != open {
			p.guestOpen = open
			if !open && p.id != 0 {
				// Tell the reader once the data sent before the close
				// has been delivered.
				select {
				case p.hup <- struct{}{}:
				default:
				}
			}
			d.broadcastLocked()
		}
	default:
		d.log.Debug("console: unexpected control event", "id", id, "event", event)
	}
}

// String describes the device's state for diagnosing a stalled port: each
// named port's guest-side state (added, open) and host side (closed).
func (d *Device) String() string {
	d.mu.Lock()
	defer d.mu.Unlock()
	var b strings.Builder
	fmt.Fprintf(&b, "virtio-console: active %v, closed %v", d.sess != nil, d.closed)
	if d.sess != nil {
		fmt.Fprintf(&b, ", driver ready %v, %d control messages queued", d.sess.ready, len(d.sess.outbox))
	}
	for _, p := range d.ports[1:] {
		fmt.Fprintf(&b, "; port %d %q: guest ready %v, guest open %v, host closed %v", p.id, p.name, p.guestReady, p.guestOpen, p.hostClosed)
	}
	return b.String()
}
