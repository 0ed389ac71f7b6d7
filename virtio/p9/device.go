package p9

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"

	ninep "github.com/hugelgupf/p9/p9"

	"github.com/gosandbox/sandbox/virtio"
)

// FeatureMountTag is VIRTIO_9P_MOUNT_TAG: the config space holds the tag.
const FeatureMountTag = 1 << 0

const (
	// QueueSize is the size of the request queue: the most requests in
	// flight at once.
	QueueSize = 128
	// MaxTagLen is the longest mount tag.
	MaxTagLen = 32
	// DefaultMaxMessage is the msize cap when Options.MaxMessage is 0. It is
	// above what Linux's virtio transport uses by default (512000).
	DefaultMaxMessage = 512 << 10
	// MinMessage is the smallest MaxMessage (and msize) the device accepts.
	MinMessage = 4096
	// MaxMessageLimit is the largest MaxMessage: the most hugelgupf/p9's
	// server handles.
	MaxMessageLimit = 4 << 20
)

// 9P message types and errnos this package needs to frame answers.
const (
	hdrLen     = 7  // size[4] type[1] tag[2]
	rlerrorLen = 11 // header + ecode[4]
	noTag      = 0xffff

	msgRlerror    = 7
	msgTversion   = 100
	msgRversion   = 101
	msgTflush     = 108
	msgRflush     = 109
	msgTxattrwalk = 30

	errnoEOPNOTSUPP = 95

	errnoEINVAL   = 22
	errnoEPROTO   = 71
	errnoEMSGSIZE = 90
)

// ErrOptions is matched by errors from New for invalid options.
var ErrOptions = errors.New("p9: invalid options")

// ErrProtocol is matched by the error the device reports through
// Activation.Fail when the guest broke the 9P transport in a way that
// cannot be answered on a chain (an undecodable message while several
// requests were in flight). The guest must reset the device; a Linux guest
// never does this.
var ErrProtocol = errors.New("p9: guest broke the 9P transport (undecodable message with several requests in flight)")

// ErrServerStopped is matched by the error reported through
// Activation.Fail when the 9P server stopped serving the device's stream
// on its own (for example after a guest renegotiated msize below a message
// already queued). The guest must reset the device.
var ErrServerStopped = errors.New("p9: the 9P server stopped serving the device")

// Options configures a 9P device.
type Options struct {
	// Tag is the mount tag the guest names in mount(8): 1 to 32 bytes,
	// without NUL.
	Tag string
	// Attacher serves the file tree. Required.
	Attacher ninep.Attacher
	// MaxMessage caps msize, the largest 9P message, in bytes: the guest's
	// Tversion msize is lowered to it. 0 means DefaultMaxMessage; otherwise
	// MinMessage..MaxMessageLimit.
	MaxMessage uint32
	// Logger receives debug records (guest protocol errors, the 9P
	// server's own log). nil discards.
	Logger *slog.Logger
}

// Device is a virtio 9P transport device.
type Device struct {
	tag    []byte
	maxMsg uint32
	log    *slog.Logger
	server *ninep.Server

	resetMu sync.Mutex // held across a whole Reset, so Close waits for one in progress
	mu      sync.Mutex
	sess    *session
	closed  bool

	// testHookShutdown, if set, runs in Reset once the session stopped
	// taking answers and before it waits for in-flight requests.
	testHookShutdown func()
}

var _ virtio.Device = (*Device)(nil)

// New validates opts and returns a device.
func New(opts Options) (*Device, error) {
	if opts.Tag == "" || len(opts.Tag) > MaxTagLen || strings.IndexByte(opts.Tag, 0) >= 0 {
		return nil, fmt.Errorf("%w: mount tag %q must be 1 to %d bytes without NUL", ErrOptions, opts.Tag, MaxTagLen)
	}
	if opts.Attacher == nil {
		return nil, fmt.Errorf("%w: Attacher is nil; pass the p9.Attacher serving the tree (e.g. lazy9p.New or localfs.Attacher)", ErrOptions)
	}
	maxMsg := opts.MaxMessage
	if maxMsg == 0 {
		maxMsg = DefaultMaxMessage
	}
	if maxMsg < MinMessage || maxMsg > MaxMessageLimit {
		return nil, fmt.Errorf("%w: MaxMessage %d is outside %d..%d", ErrOptions, maxMsg, MinMessage, MaxMessageLimit)
	}
	d := &Device{tag: []byte(opts.Tag), maxMsg: maxMsg, log: opts.Logger}
	if d.log == nil {
		d.log = slog.New(slog.DiscardHandler)
	}
	d.server = ninep.NewServer(opts.Attacher, ninep.WithServerLogger(serverLog{d.log}))
	return d, nil
}

// serverLog adapts the 9P server's logger to slog at debug level.
type serverLog struct{ l *slog.Logger }

// Printf implements ulog.Logger.
func (s serverLog) Printf(format string, v ...any) {
	if s.l.Enabled(context.Background(), slog.LevelDebug) {
		s.l.Debug("p9 server: " + fmt.Sprintf(format, v...))
	}
}

// Tag returns the mount tag.
func (d *Device) Tag() string { return string(d.tag) }

// Type implements virtio.Device.
func (d *Device) Type() virtio.DeviceType { return virtio.Type9P }

// Features implements virtio.Device.
func (d *Device) Features() uint64 { return FeatureMountTag }

// QueueSizes implements virtio.Device: one request queue.
func (d *Device) QueueSizes() []uint16 { return []uint16{QueueSize} }

// ConfigSize implements virtio.Device: tag_len[2] then the tag.
func (d *Device) ConfigSize() int { return 2 + len(d.tag) }

// ReadConfig implements virtio.Device.
func (d *Device) ReadConfig(off int, p []byte) {
	c := binary.LittleEndian.AppendUint16(make([]byte, 0, 2+len(d.tag)), uint16(len(d.tag)))
	c = append(c, d.tag...)
	virtio.ReadConfigAt(c, off, p)
}

// WriteConfig implements virtio.Device: the config is read-only.
func (d *Device) WriteConfig(int, []byte) {}

// Activate implements virtio.Device: it starts the queue worker and a 9P
// server connection for this activation.
func (d *Device) Activate(a *virtio.Activation) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return virtio.ErrClosed
	}
	if d.sess != nil {
		return nil // already active; the transport resets before re-activating
	}
	if len(a.Queues) == 0 || a.Queues[0] == nil {
		return nil
	}
	s := newSession(d, a, a.Queues[0])
	d.sess = s
	s.start()
	return nil
}

// Reset implements virtio.Device: it stops the worker and the server
// connection and waits for both; answers still in progress are dropped.
func (d *Device) Reset() {
	d.resetMu.Lock()
	defer d.resetMu.Unlock()
	d.mu.Lock()
	s := d.sess
	d.sess = nil
	d.mu.Unlock()
	if s != nil {
		s.shutdown()
	}
}

// Close implements virtio.Device. It does not close the Attacher's
// resources (an image, a directory); it is safe to call more than once.
func (d *Device) Close() error {
	d.mu.Lock()
	d.closed = true
	d.mu.Unlock()
	d.Reset()
	return nil
}
