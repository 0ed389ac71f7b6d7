// Package blk is the virtio block device (VIRTIO 1.2 section 5.2) over a raw
// disk image: an *os.File or any io.ReaderAt (plus io.WriterAt for a
// writable disk). It supports read-only disks (VIRTIO_BLK_F_RO), flush
// (VIRTIO_BLK_F_FLUSH), GET_ID with a serial, and DISCARD and WRITE_ZEROES
// (with the unmap flag), which punch holes with fallocate(2) when the
// backing is a file so sparse images stay sparse. Every sector range is checked against the capacity.
package blk

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/gosandbox/sandbox/virtio"
)

// Feature bits (VIRTIO 1.2 5.2.3).
const (
	FeatureSegMax      = 1 << 2
	FeatureRO          = 1 << 5
	FeatureFlush       = 1 << 9
	FeatureDiscard     = 1 << 13
	FeatureWriteZeroes = 1 << 14
)

// Request types and status values (VIRTIO 1.2 5.2.6).
const (
	TypeIn          = 0
	TypeOut         = 1
	TypeFlush       = 4
	TypeGetID       = 8
	TypeDiscard     = 11
	TypeWriteZeroes = 13

	StatusOK     = 0
	StatusIOErr  = 1
	StatusUnsupp = 2
)

const (
	// SectorSize is the virtio block sector size.
	SectorSize = 512
	// QueueSize is the size of the request queue.
	QueueSize = 256
	// IDLen is the length of the GET_ID serial.
	IDLen = 20

	maxDiscardSectors = 1 << 22 // 2 GiB per segment
	maxDiscardSegs    = 32
	discardAlignment  = 8 // sectors (4 KiB)
	configSize        = 60
	segSize           = 16 // struct virtio_blk_discard_write_zeroes
	flagUnmap         = 1
)

// Options configures a block device.
type Options struct {
	// Size is the disk size in bytes; 0 means the size of the backing file
	// (required when the backing is not an *os.File). Bytes beyond the
	// last full 512-byte sector are not visible to the guest.
	Size int64
	// ReadOnly offers VIRTIO_BLK_F_RO and fails every write. A backing
	// without io.WriterAt must be ReadOnly.
	ReadOnly bool
	// Serial is returned by GET_ID (at most 20 bytes).
	Serial string
	// Logger receives debug records. nil discards.
	Logger *slog.Logger
}

// ErrOptions is matched by errors from New for invalid options.
var ErrOptions = errors.New("blk: invalid options")

// Device is a virtio block device.
type Device struct {
	r        io.ReaderAt
	w        io.WriterAt // nil when read-only
	file     *os.File    // non-nil for fallocate
	sectors  uint64
	readOnly bool
	serial   [IDLen]byte
	log      *slog.Logger
	workers  virtio.Workers

	mu     sync.Mutex
	closed bool
}

var _ virtio.Device = (*Device)(nil)

// New returns a block device over backing. The caller keeps ownership of
// backing: Close does not close it.
func New(backing io.ReaderAt, opts Options) (*Device, error) {
	if backing == nil {
		return nil, fmt.Errorf("%w: backing is nil", ErrOptions)
	}
	if len(opts.Serial) > IDLen {
		return nil, fmt.Errorf("%w: serial %q is longer than %d bytes", ErrOptions, opts.Serial, IDLen)
	}
	d := &Device{r: backing, readOnly: opts.ReadOnly, log: opts.Logger}
	if d.log == nil {
		d.log = slog.New(slog.DiscardHandler)
	}
	copy(d.serial[:], opts.Serial)
	d.file, _ = backing.(*os.File)
	size := opts.Size
	if size == 0 {
		if d.file == nil {
			return nil, fmt.Errorf("%w: Size is required when the backing is not an *os.File", ErrOptions)
		}
		st, err := d.file.Stat()
		if err != nil {
			return nil, fmt.Errorf("blk: stat backing file: %w", err)
		}
		size = st.Size()
	}
	if size < 0 {
		return nil, fmt.Errorf("%w: negative size %d", ErrOptions, size)
	}
	d.sectors = uint64(size) / SectorSize
	if !opts.ReadOnly {
		w, ok := backing.(io.WriterAt)
		if !ok {
			return nil, fmt.Errorf("%w: backing %T has no WriteAt; set ReadOnly", ErrOptions, backing)
		}
		d.w = w
	}
	return d, nil
}

// Capacity returns the disk size in sectors.
func (d *Device) Capacity() uint64 { return d.sectors }

// Type implements virtio.Device.
func (d *Device) Type() virtio.DeviceType { return virtio.TypeBlock }

// Features implements virtio.Device.
func (d *Device) Features() uint64 {
	f := uint64(FeatureSegMax | FeatureFlush)
	if d.readOnly {
		f |= FeatureRO
	} else {
		f |= FeatureDiscard | FeatureWriteZeroes
	}
	return f
}

// QueueSizes implements virtio.Device: one request queue.
func (d *Device) QueueSizes() []uint16 { return []uint16{QueueSize} }

// ConfigSize implements virtio.Device.
func (d *Device) ConfigSize() int { return configSize }

// ReadConfig implements virtio.Device.
func (d *Device) ReadConfig(off int, p []byte) {
	var c [configSize]byte
	le := binary.LittleEndian
	le.PutUint64(c[0:], d.sectors)
	le.PutUint32(c[12:], QueueSize-2) // seg_max
	le.PutUint16(c[34:], 1)           // num_queues
	if !d.readOnly {
		le.PutUint32(c[36:], maxDiscardSectors)
		le.PutUint32(c[40:], maxDiscardSegs)
		le.PutUint32(c[44:], discardAlignment)
		le.PutUint32(c[48:], maxDiscardSectors)
		le.PutUint32(c[52:], maxDiscardSegs)
		c[56] = 1 // write_zeroes_may_unmap
	}
	virtio.ReadConfigAt(c[:], off, p)
}

// WriteConfig implements virtio.Device: the config is read-only.
func (d *Device) WriteConfig(int, []byte) {}

// Activate implements virtio.Device.
func (d *Device) Activate(a *virtio.Activation) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return virtio.ErrClosed
	}
	if q := a.Queues[0]; q != nil {
		d.workers.Go(func(stop <-chan struct{}) { d.serve(q, stop) })
	}
	return nil
}

// Reset implements virtio.Device.
func (d *Device) Reset() { d.workers.Stop() }

// Close implements virtio.Device. It does not close the backing.
func (d *Device) Close() error {
	d.mu.Lock()
	d.closed = true
	d.mu.Unlock()
	d.workers.Stop()
	return nil
}

func (d *Device) serve(q *virtio.Queue, stop <-chan struct{}) {
	var ch virtio.Chain
	r := &request{d: d}
	for q.Wait(stop) {
		for {
			ok, err := q.Pop(&ch)
			if err != nil || !ok {
				break
			}
			q.Push(ch.Head, r.handle(&ch))
		}
		q.Notify()
	}
}

// request holds per-worker scratch space.
type request struct {
	d    *Device
	segs [][]byte
	zero []byte
}

// handle executes one request and returns the used length: the whole
// writable part, whose last byte is the status (as QEMU does; drivers read
// the status byte, not the length).
func (r *request) handle(ch *virtio.Chain) uint32 {
	wlen := ch.WritableLen()
	if wlen < 1 {
		return 0 // nowhere to put a status: drop it
	}
	status, _ := r.exec(ch, wlen-1)
	ch.CopyToGuest(wlen-1, []byte{status})
	return uint32(min(wlen, 1<<31))
}

// exec returns the status and the data bytes written to the guest.
func (r *request) exec(ch *virtio.Chain, dataIn int) (uint8, int) {
	var hdr [16]byte
	if ch.CopyFromGuest(hdr[:], 0) < len(hdr) {
		return StatusIOErr, 0
	}
	typ := binary.LittleEndian.Uint32(hdr[0:])
	sector := binary.LittleEndian.Uint64(hdr[8:])
	dataOut := ch.ReadableLen() - len(hdr)
	d := r.d
	switch typ {
	case TypeIn:
		if !d.inRange(sector, uint64(dataIn)) {
			return StatusIOErr, 0
		}
		r.segs = virtio.Segments(r.segs[:0], ch.Writable, 0, dataIn)
		off := int64(sector * SectorSize)
		for _, s := range r.segs {
			if n, err := d.r.ReadAt(s, off); n < len(s) {
				d.log.Debug("blk: read", "sector", sector, "err", err)
				return StatusIOErr, 0
			}
			off += int64(len(s))
		}
		return StatusOK, dataIn
	case TypeOut:
		if d.w == nil {
			return StatusIOErr, 0
		}
		if !d.inRange(sector, uint64(dataOut)) {
			return StatusIOErr, 0
		}
		r.segs = virtio.Segments(r.segs[:0], ch.Readable, len(hdr), dataOut)
		off := int64(sector * SectorSize)
		for _, s := range r.segs {
			if _, err := d.w.WriteAt(s, off); err != nil {
				d.log.Debug("blk: write", "sector", sector, "err", err)
				return StatusIOErr, 0
			}
			off += int64(len(s))
		}
		return StatusOK, 0
	case TypeFlush:
		if s, ok := d.r.(interface{ Sync() error }); ok && d.w != nil {
			if err := s.Sync(); err != nil {
				d.log.Debug("blk: flush", "err", err)
				return StatusIOErr, 0
			}
		}
		return StatusOK, 0
	case TypeGetID:
		n := min(dataIn, IDLen)
		ch.CopyToGuest(0, d.serial[:n])
		return StatusOK, n
	case TypeDiscard, TypeWriteZeroes:
		if d.w == nil {
			return StatusIOErr, 0
		}
		if dataOut <= 0 || dataOut%segSize != 0 || dataOut/segSize > maxDiscardSegs {
			return StatusUnsupp, 0
		}
		for i := range dataOut / segSize {
			var seg [segSize]byte
			ch.CopyFromGuest(seg[:], len(hdr)+i*segSize)
			st := r.zeroRange(typ, binary.LittleEndian.Uint64(seg[0:]),
				binary.LittleEndian.Uint32(seg[8:]), binary.LittleEndian.Uint32(seg[12:]))
			if st != StatusOK {
				return st, 0
			}
		}
		return StatusOK, 0
	default:
		return StatusUnsupp, 0
	}
}

// inRange reports whether n bytes (a multiple of 512) at sector fit.
func (d *Device) inRange(sector, n uint64) bool {
	if n%SectorSize != 0 {
		return false
	}
	count := n / SectorSize
	return sector <= d.sectors && count <= d.sectors-sector
}

// zeroRange handles one DISCARD or WRITE_ZEROES segment.
func (r *request) zeroRange(typ uint32, sector uint64, count, flags uint32) uint8 {
	d := r.d
	if flags&^flagUnmap != 0 || (typ == TypeDiscard && flags != 0) || count > maxDiscardSectors {
		return StatusUnsupp
	}
	if !d.inRange(sector, uint64(count)*SectorSize) {
		return StatusIOErr
	}
	off, n := int64(sector*SectorSize), int64(count)*SectorSize
	if n == 0 {
		return StatusOK
	}
	if d.file != nil {
		// DISCARD and WRITE_ZEROES with the unmap flag punch a hole: the
		// range reads back as zeros and a sparse image stays sparse.
		// WRITE_ZEROES without it must keep the space allocated, so it
		// zeroes the range in place.
		mode := uint32(unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_KEEP_SIZE)
		if typ == TypeWriteZeroes && flags&flagUnmap == 0 {
			mode = unix.FALLOC_FL_ZERO_RANGE | unix.FALLOC_FL_KEEP_SIZE
		}
		err := unix.Fallocate(int(d.file.Fd()), mode, off, n)
		if err == nil {
			return StatusOK
		}
		d.log.Debug("blk: fallocate", "sector", sector, "err", err)
	}
	if typ == TypeDiscard {
		return StatusOK // discard is a hint
	}
	if r.zero == nil {
		r.zero = make([]byte, 64<<10)
	}
	for n > 0 {
		k := min(n, int64(len(r.zero)))
		if _, err := d.w.WriteAt(r.zero[:k], off); err != nil {
			return StatusIOErr
		}
		off += k
		n -= k
	}
	return StatusOK
}
