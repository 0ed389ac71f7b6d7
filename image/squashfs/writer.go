package squashfs

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math"
	"runtime"
	"slices"
	"sort"
	"strings"
	"sync"

	"github.com/klauspost/compress/zlib"
)

// FileType is the kind of a file system object.
type FileType uint8

// File types a Writer can store.
const (
	TypeDir FileType = iota + 1
	TypeRegular
	TypeSymlink
	TypeBlockDev
	TypeCharDev
	TypeFIFO
	TypeSocket
)

func (t FileType) String() string {
	switch t {
	case TypeDir:
		return "directory"
	case TypeRegular:
		return "regular file"
	case TypeSymlink:
		return "symlink"
	case TypeBlockDev:
		return "block device"
	case TypeCharDev:
		return "character device"
	case TypeFIFO:
		return "fifo"
	case TypeSocket:
		return "socket"
	}
	return fmt.Sprintf("FileType(%d)", uint8(t))
}

// Limits enforced by the writer (and by the Linux SquashFS driver).
const (
	// MaxNameLen is the longest single path component.
	MaxNameLen = 256
	// MaxSymlinkLen is the longest symlink target accepted.
	MaxSymlinkLen = 4095
	// DefaultBlockSize is the data block size used unless WithBlockSize says otherwise.
	DefaultBlockSize = 128 << 10
)

// Errors returned by the writer. They are wrapped with the offending path;
// test with errors.Is.
var (
	// ErrInvalidPath means a path is empty, absolute, contains "." or ".."
	// components, a NUL byte, or a component longer than MaxNameLen.
	ErrInvalidPath = errors.New("squashfs: invalid path")
	// ErrExists means a path was added twice (two directories are merged
	// instead; this error is for every other combination).
	ErrExists = errors.New("squashfs: path already exists")
	// ErrNotDir means a path's parent is not a directory (for example a path
	// that goes through a symlink).
	ErrNotDir = errors.New("squashfs: parent is not a directory")
	// ErrLinkTarget means a hard link names a target that was not added
	// before it or that is a directory.
	ErrLinkTarget = errors.New("squashfs: bad hard link target")
	// ErrInvalidEntry means an entry's fields are unusable (unknown type,
	// symlink target too long, xattr namespace SquashFS cannot store, ...).
	ErrInvalidEntry = errors.New("squashfs: invalid entry")
	// ErrTooLarge means the image would exceed a format limit (more than
	// 65535 distinct uids/gids, more than 2^32-1 inodes, ...).
	ErrTooLarge = errors.New("squashfs: format limit exceeded")
	// ErrFinished means the Writer was used after Finish.
	ErrFinished = errors.New("squashfs: writer already finished")
)

// Entry describes one file system object to add.
type Entry struct {
	// Path is slash-separated and relative to the root ("usr/bin/env").
	// The empty string or "." names the root directory itself.
	Path string
	// Type is the kind of object.
	Type FileType
	// Mode holds the permission bits, including setuid, setgid and sticky
	// (fs.ModeSetuid, fs.ModeSetgid, fs.ModeSticky or the raw 0o7000 bits).
	Mode fs.FileMode
	// UID and GID are the numeric owners.
	UID, GID uint32
	// ModTime is the modification time in Unix seconds; values outside the
	// uint32 range are clamped.
	ModTime int64
	// Target is the symlink target (TypeSymlink only). It is stored
	// verbatim: it is resolved inside the guest, never on the host.
	Target string
	// Major and Minor are the device numbers (TypeCharDev, TypeBlockDev).
	Major, Minor uint32
	// Xattrs are extended attributes, keyed by full name ("user.foo",
	// "trusted.overlay.opaque", "security.capability").
	Xattrs map[string][]byte
}

// Option configures a Writer.
type Option func(*Writer) error

// WithBlockSize sets the data block size: a power of two from 4 KiB to 1 MiB.
func WithBlockSize(n int) Option {
	return func(w *Writer) error {
		if n < 4096 || n > 1<<20 || n&(n-1) != 0 {
			return fmt.Errorf("%w: block size %d is not a power of two between 4096 and 1048576", ErrInvalidEntry, n)
		}
		w.blockSize = n
		return nil
	}
}

// WithModTime sets the image modification time recorded in the superblock
// (Unix seconds). The default is 0, which keeps output deterministic.
func WithModTime(t int64) Option {
	return func(w *Writer) error { w.mkfsTime = clampTime(t); return nil }
}

// WithConcurrency sets how many goroutines compress data blocks (default
// GOMAXPROCS, at most 8). The output is the same for every value. The
// goroutines live only inside Add and Finish calls.
func WithConcurrency(n int) Option {
	return func(w *Writer) error {
		if n < 1 || n > 256 {
			return fmt.Errorf("%w: concurrency %d is not in 1..256", ErrInvalidEntry, n)
		}
		w.conc = n
		return nil
	}
}

// WithCompressionLevel sets the zlib level (1 fastest .. 9 smallest). The
// default is 6, like mksquashfs... except faster thanks to klauspost/compress.
func WithCompressionLevel(level int) Option {
	return func(w *Writer) error {
		if level < 1 || level > 9 {
			return fmt.Errorf("%w: zlib level %d is not in 1..9", ErrInvalidEntry, level)
		}
		w.level = level
		return nil
	}
}

type node struct {
	typ      FileType
	mode     uint16
	uid, gid uint32
	mtime    uint32
	target   string
	rdev     uint32
	xattrs   map[string][]byte

	// regular files
	start  uint64
	size   uint64
	sparse uint64
	blocks []uint32

	// directories
	children map[string]*node
	parent   *node

	nlink   uint32
	ino     uint32
	written bool
	ref     uint64 // inode reference: block<<16 | offset
	xidx    uint32
}

// Writer builds a SquashFS image. It is not safe for concurrent use.
type Writer struct {
	out       io.WriterAt
	off       int64
	blockSize int
	level     int
	mkfsTime  uint32
	root      *node
	finished  bool

	cbuf bytes.Buffer
	zw   *zlib.Writer

	conc    int
	batch   int
	queue   []pending
	free    [][]byte
	workers []*zworker

	nodes int
}

const superblockSize = 96

// NewWriter returns a Writer that writes an image to out, starting at offset
// 0. The superblock is written last, by Finish.
func NewWriter(out io.WriterAt, opts ...Option) (*Writer, error) {
	w := &Writer{
		out:       out,
		off:       superblockSize,
		blockSize: DefaultBlockSize,
		level:     6,
		root:      newDir(),
	}
	for _, o := range opts {
		if err := o(w); err != nil {
			return nil, err
		}
	}
	w.root.mode = 0o755
	if w.conc == 0 {
		w.conc = min(runtime.GOMAXPROCS(0), 8)
	}
	w.batch = 4 * w.conc
	zw, err := zlib.NewWriterLevel(&w.cbuf, w.level)
	if err != nil {
		return nil, fmt.Errorf("squashfs: zlib: %w", err)
	}
	w.zw = zw
	w.nodes = 1
	return w, nil
}

func newDir() *node {
	return &node{typ: TypeDir, children: map[string]*node{}, nlink: 2, mode: 0o755}
}

func clampTime(t int64) uint32 {
	if t < 0 {
		return 0
	}
	if t > math.MaxUint32 {
		return math.MaxUint32
	}
	return uint32(t)
}

func splitPath(p string) ([]string, error) {
	if p == "" || p == "." {
		return nil, nil
	}
	if strings.HasPrefix(p, "/") || strings.IndexByte(p, 0) >= 0 {
		return nil, fmt.Errorf("%w: %q", ErrInvalidPath, p)
	}
	parts := strings.Split(strings.TrimSuffix(p, "/"), "/")
	for _, c := range parts {
		if c == "" || c == "." || c == ".." || len(c) > MaxNameLen {
			return nil, fmt.Errorf("%w: %q", ErrInvalidPath, p)
		}
	}
	return parts, nil
}

// lookupParent returns the directory that holds the last component of parts,
// creating missing intermediate directories (mode 0755, owner 0:0).
func (w *Writer) lookupParent(p string, parts []string) (*node, error) {
	d := w.root
	for _, c := range parts[:len(parts)-1] {
		n, ok := d.children[c]
		if !ok {
			n = newDir()
			n.parent = d
			d.children[c] = n
			d.nlink++
			w.nodes++
			d = n
			continue
		}
		if n.typ != TypeDir {
			return nil, fmt.Errorf("%w: %q: %q is a %v", ErrNotDir, p, c, n.typ)
		}
		d = n
	}
	return d, nil
}

func (w *Writer) checkXattrs(p string, x map[string][]byte) error {
	for k, v := range x {
		if _, _, ok := xattrPrefix(k); !ok {
			return fmt.Errorf("%w: %q: xattr %q: only user., trusted. and security. xattrs can be stored", ErrInvalidEntry, p, k)
		}
		if len(v) > 65536 {
			return fmt.Errorf("%w: %q: xattr %q value of %d bytes", ErrInvalidEntry, p, k, len(v))
		}
	}
	return nil
}

// Add adds one entry. For TypeRegular, data supplies the file contents and is
// read to EOF (nil means an empty file); it is ignored for other types.
// Missing parent directories are created with mode 0755 and owner 0:0 and take
// the metadata of a later directory entry for the same path.
func (w *Writer) Add(e Entry, data io.Reader) error {
	if w.finished {
		return ErrFinished
	}
	parts, err := splitPath(e.Path)
	if err != nil {
		return err
	}
	if err := w.checkXattrs(e.Path, e.Xattrs); err != nil {
		return err
	}
	n := &node{
		typ:    e.Type,
		mode:   modeBits(e.Mode),
		uid:    e.UID,
		gid:    e.GID,
		mtime:  clampTime(e.ModTime),
		xattrs: cloneXattrs(e.Xattrs),
		nlink:  1,
	}
	switch e.Type {
	case TypeDir:
	case TypeRegular:
	case TypeSymlink:
		if len(e.Target) == 0 || len(e.Target) > MaxSymlinkLen || strings.IndexByte(e.Target, 0) >= 0 {
			return fmt.Errorf("%w: %q: symlink target of %d bytes", ErrInvalidEntry, e.Path, len(e.Target))
		}
		n.target = e.Target
	case TypeCharDev, TypeBlockDev:
		if e.Major > 0xfff || e.Minor > 0xfffff {
			return fmt.Errorf("%w: %q: device %d:%d out of range", ErrInvalidEntry, e.Path, e.Major, e.Minor)
		}
		n.rdev = (e.Minor & 0xff) | (e.Major << 8) | ((e.Minor &^ 0xff) << 12)
	case TypeFIFO, TypeSocket:
	default:
		return fmt.Errorf("%w: %q: unknown type %d", ErrInvalidEntry, e.Path, e.Type)
	}
	if len(parts) == 0 {
		if e.Type != TypeDir {
			return fmt.Errorf("%w: the root must be a directory, not a %v", ErrInvalidEntry, e.Type)
		}
		w.root.setMeta(n)
		return nil
	}
	parent, err := w.lookupParent(e.Path, parts)
	if err != nil {
		return err
	}
	name := parts[len(parts)-1]
	if old, ok := parent.children[name]; ok {
		if old.typ == TypeDir && e.Type == TypeDir {
			old.setMeta(n)
			return nil
		}
		return fmt.Errorf("%w: %q", ErrExists, e.Path)
	}
	if w.nodes == math.MaxUint32-1 {
		return fmt.Errorf("%w: too many inodes", ErrTooLarge)
	}
	if e.Type == TypeRegular && data != nil {
		if err := w.writeData(n, data); err != nil {
			return fmt.Errorf("squashfs: %q: %w", e.Path, err)
		}
	}
	if e.Type == TypeDir {
		n.children = map[string]*node{}
		n.nlink = 2
		parent.nlink++
	}
	n.parent = parent
	parent.children[name] = n
	w.nodes++
	return nil
}

func (n *node) setMeta(m *node) {
	n.mode, n.uid, n.gid, n.mtime, n.xattrs = m.mode, m.uid, m.gid, m.mtime, m.xattrs
}

// SetXattr sets one xattr on an existing path (used for overlayfs opaque
// directory markers, which arrive as a separate tar entry).
func (w *Writer) SetXattr(p, key string, value []byte) error {
	if w.finished {
		return ErrFinished
	}
	n, err := w.lookup(p)
	if err != nil {
		return err
	}
	if err := w.checkXattrs(p, map[string][]byte{key: value}); err != nil {
		return err
	}
	if n.xattrs == nil {
		n.xattrs = map[string][]byte{}
	}
	n.xattrs[key] = slices.Clone(value)
	return nil
}

// Exists reports whether p was added (or created as an implicit parent).
func (w *Writer) Exists(p string) bool {
	_, err := w.lookup(p)
	return err == nil
}

func (w *Writer) lookup(p string) (*node, error) {
	parts, err := splitPath(p)
	if err != nil {
		return nil, err
	}
	n := w.root
	for _, c := range parts {
		if n.typ != TypeDir {
			return nil, fmt.Errorf("%w: %q", ErrNotDir, p)
		}
		c2, ok := n.children[c]
		if !ok {
			return nil, fmt.Errorf("%w: %q does not exist", ErrLinkTarget, p)
		}
		n = c2
	}
	return n, nil
}

// Link adds a hard link at p to the non-directory target, which must have
// been added before.
func (w *Writer) Link(p, target string) error {
	if w.finished {
		return ErrFinished
	}
	parts, err := splitPath(p)
	if err != nil {
		return err
	}
	if len(parts) == 0 {
		return fmt.Errorf("%w: cannot replace the root with a hard link", ErrInvalidPath)
	}
	t, err := w.lookup(target)
	if err != nil {
		return fmt.Errorf("%w: %q -> %q: %v", ErrLinkTarget, p, target, err)
	}
	if t.typ == TypeDir {
		return fmt.Errorf("%w: %q -> %q is a directory", ErrLinkTarget, p, target)
	}
	parent, err := w.lookupParent(p, parts)
	if err != nil {
		return err
	}
	name := parts[len(parts)-1]
	if _, ok := parent.children[name]; ok {
		return fmt.Errorf("%w: %q", ErrExists, p)
	}
	if t.nlink == math.MaxUint32 {
		return fmt.Errorf("%w: too many links to %q", ErrTooLarge, target)
	}
	t.nlink++
	parent.children[name] = t
	return nil
}

func modeBits(m fs.FileMode) uint16 {
	b := uint16(m.Perm())
	if m&fs.ModeSetuid != 0 {
		b |= 0o4000
	}
	if m&fs.ModeSetgid != 0 {
		b |= 0o2000
	}
	if m&fs.ModeSticky != 0 {
		b |= 0o1000
	}
	// Raw Unix bits passed as a plain number (fs.FileMode(0o4755)).
	b |= uint16(m) & 0o7000
	return b
}

func cloneXattrs(x map[string][]byte) map[string][]byte {
	if len(x) == 0 {
		return nil
	}
	c := make(map[string][]byte, len(x))
	for k, v := range x {
		c[k] = slices.Clone(v)
	}
	return c
}

const uncompressedBit = 1 << 24

// compress compresses b into w.cbuf and reports whether that is smaller.
func (w *Writer) compress(b []byte) (bool, error) {
	w.cbuf.Reset()
	w.zw.Reset(&w.cbuf)
	if _, err := w.zw.Write(b); err != nil {
		return false, err
	}
	if err := w.zw.Close(); err != nil {
		return false, err
	}
	return w.cbuf.Len() < len(b), nil
}

func isZero(b []byte) bool {
	for len(b) >= 8 {
		if binary.LittleEndian.Uint64(b) != 0 {
			return false
		}
		b = b[8:]
	}
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// pending is a data block read but not yet compressed and written. Blocks
// are queued across files and compressed in parallel batches; they are
// written strictly in queue order, so the output does not depend on the
// number of workers.
type pending struct {
	n     *node
	first bool // first block of n
	data  []byte
	zero  bool
	out   []byte // compressed form, when smaller
}

// zworker is per-worker compression state, reused across batches.
type zworker struct {
	zw  *zlib.Writer
	buf bytes.Buffer
}

func (w *Writer) writeData(n *node, r io.Reader) error {
	first := true
	for {
		buf := w.getBuf()
		k, err := io.ReadFull(r, buf)
		if k > 0 {
			blk := buf[:k]
			n.size += uint64(k)
			w.queue = append(w.queue, pending{n: n, first: first, data: blk, zero: isZero(blk)})
			first = false
			if len(w.queue) >= w.batch {
				if ferr := w.flushData(); ferr != nil {
					return ferr
				}
			}
		} else {
			w.putBuf(buf)
		}
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			if first { // empty file: no blocks
				w.queue = append(w.queue, pending{n: n, first: true, zero: true, data: nil})
			}
			return nil
		}
		if err != nil {
			return err
		}
	}
}

func (w *Writer) getBuf() []byte {
	if k := len(w.free); k > 0 {
		b := w.free[k-1]
		w.free = w.free[:k-1]
		return b[:w.blockSize]
	}
	return make([]byte, w.blockSize)
}

func (w *Writer) putBuf(b []byte) { w.free = append(w.free, b[:cap(b)]) }

// flushData compresses the queued blocks (in parallel when there are
// several workers), writes them in order and records their sizes.
func (w *Writer) flushData() error {
	q := w.queue
	if len(q) == 0 {
		return nil
	}
	for len(w.workers) < w.conc {
		zw, err := zlib.NewWriterLevel(io.Discard, w.level)
		if err != nil {
			return err
		}
		w.workers = append(w.workers, &zworker{zw: zw})
	}
	errs := make([]error, len(w.workers))
	outs := make([][]byte, len(q))
	work := func(wi int) {
		z := w.workers[wi]
		for i := wi; i < len(q); i += len(w.workers) {
			if q[i].zero {
				continue
			}
			start := z.buf.Len()
			z.zw.Reset(&z.buf)
			if _, err := z.zw.Write(q[i].data); err != nil {
				errs[wi] = err
				return
			}
			if err := z.zw.Close(); err != nil {
				errs[wi] = err
				return
			}
			if z.buf.Len()-start < len(q[i].data) {
				outs[i] = z.buf.Bytes()[start:z.buf.Len():z.buf.Len()]
			} else {
				z.buf.Truncate(start)
			}
		}
	}
	for _, z := range w.workers {
		z.buf.Reset()
	}
	if len(w.workers) == 1 || len(q) == 1 {
		for wi := range w.workers {
			work(wi)
		}
	} else {
		var wg sync.WaitGroup
		for wi := range w.workers {
			wg.Add(1)
			go func() { defer wg.Done(); work(wi) }()
		}
		wg.Wait()
	}
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	for i := range q {
		p := &q[i]
		if p.first {
			p.n.start = uint64(w.off)
		}
		if p.data == nil {
			continue
		}
		switch {
		case p.zero:
			p.n.blocks = append(p.n.blocks, 0)
			p.n.sparse += uint64(len(p.data))
		default:
			out, sz := p.data, uint32(len(p.data))|uncompressedBit
			if outs[i] != nil {
				out, sz = outs[i], uint32(len(outs[i]))
			}
			if _, err := w.out.WriteAt(out, w.off); err != nil {
				return err
			}
			w.off += int64(len(out))
			p.n.blocks = append(p.n.blocks, sz)
		}
		w.putBuf(p.data)
		q[i] = pending{}
	}
	w.queue = q[:0]
	return nil
}

// metaWriter accumulates a metadata table: 8 KiB blocks, each stored with a
// 2-byte header and compressed when that helps.
type metaWriter struct {
	w      *Writer
	out    bytes.Buffer
	cur    []byte
	starts []uint64 // offset in out of every block written
}

const metaSize = 8192

func (m *metaWriter) pos() (uint64, uint16) { return uint64(m.out.Len()), uint16(len(m.cur)) }

func (m *metaWriter) write(b []byte) error {
	m.cur = append(m.cur, b...)
	for len(m.cur) >= metaSize {
		if err := m.flushBlock(m.cur[:metaSize]); err != nil {
			return err
		}
		m.cur = append(m.cur[:0], m.cur[metaSize:]...)
	}
	return nil
}

func (m *metaWriter) flushBlock(b []byte) error {
	m.starts = append(m.starts, uint64(m.out.Len()))
	smaller, err := m.w.compress(b)
	if err != nil {
		return err
	}
	var hdr [2]byte
	if smaller {
		binary.LittleEndian.PutUint16(hdr[:], uint16(m.w.cbuf.Len()))
		m.out.Write(hdr[:])
		m.out.Write(m.w.cbuf.Bytes())
	} else {
		binary.LittleEndian.PutUint16(hdr[:], uint16(len(b))|0x8000)
		m.out.Write(hdr[:])
		m.out.Write(b)
	}
	return nil
}

func (m *metaWriter) finish() error {
	if len(m.cur) > 0 {
		if err := m.flushBlock(m.cur); err != nil {
			return err
		}
		m.cur = m.cur[:0]
	}
	return nil
}

type le struct{ b []byte }

func (l *le) u16(v uint16) { l.b = binary.LittleEndian.AppendUint16(l.b, v) }
func (l *le) u32(v uint32) { l.b = binary.LittleEndian.AppendUint32(l.b, v) }
func (l *le) u64(v uint64) { l.b = binary.LittleEndian.AppendUint64(l.b, v) }

// Inode type numbers on disk.
const (
	itDir = 1 + iota
	itFile
	itSymlink
	itBlk
	itChr
	itFifo
	itSock
	itXDir
	itXFile
	itXSymlink
	itXBlk
	itXChr
	itXFifo
	itXSock
)

func basicType(t FileType) uint16 {
	switch t {
	case TypeDir:
		return itDir
	case TypeRegular:
		return itFile
	case TypeSymlink:
		return itSymlink
	case TypeBlockDev:
		return itBlk
	case TypeCharDev:
		return itChr
	case TypeFIFO:
		return itFifo
	default:
		return itSock
	}
}

const noXattr = 0xFFFFFFFF

type finisher struct {
	w      *Writer
	inodes metaWriter
	dirs   metaWriter
	ids    []uint32
	idIdx  map[uint32]uint16
	xkv    metaWriter
	xids   []byte // 16-byte xattr id entries
	xdedup map[string]uint32
	nextNo uint32
}

// Finish writes the metadata tables and the superblock and returns the image
// size in bytes (padded to a multiple of 4096). The Writer cannot be used
// afterwards.
func (w *Writer) Finish() (int64, error) {
	if w.finished {
		return 0, ErrFinished
	}
	w.finished = true
	if err := w.flushData(); err != nil {
		return 0, err
	}
	w.free, w.workers = nil, nil
	f := &finisher{w: w, idIdx: map[uint32]uint16{}, xdedup: map[string]uint32{}}
	f.inodes.w, f.dirs.w, f.xkv.w = w, w, w
	f.number(w.root)
	w.root.parent = nil
	if err := f.writeNode(w.root, f.nextNo+1); err != nil {
		return 0, err
	}
	if err := f.inodes.finish(); err != nil {
		return 0, err
	}
	if err := f.dirs.finish(); err != nil {
		return 0, err
	}
	if len(f.ids) > 65535 {
		return 0, fmt.Errorf("%w: %d distinct uids/gids (max 65535)", ErrTooLarge, len(f.ids))
	}

	off := uint64(w.off)
	put := func(b []byte) error {
		if _, err := w.out.WriteAt(b, int64(off)); err != nil {
			return err
		}
		off += uint64(len(b))
		return nil
	}
	inodeStart := off
	if err := put(f.inodes.out.Bytes()); err != nil {
		return 0, err
	}
	dirStart := off
	if err := put(f.dirs.out.Bytes()); err != nil {
		return 0, err
	}
	fragStart := off

	// id table
	var idm metaWriter
	idm.w = w
	var idb le
	for _, id := range f.ids {
		idb.u32(id)
	}
	if err := idm.write(idb.b); err != nil {
		return 0, err
	}
	if err := idm.finish(); err != nil {
		return 0, err
	}
	idMetaStart := off
	if err := put(idm.out.Bytes()); err != nil {
		return 0, err
	}
	idStart := off
	var idx le
	for _, s := range idm.starts {
		idx.u64(idMetaStart + s)
	}
	if err := put(idx.b); err != nil {
		return 0, err
	}

	xattrStart := uint64(math.MaxUint64)
	flags := uint16(0x10) // no fragments
	if len(f.xids) > 0 {
		if err := f.xkv.finish(); err != nil {
			return 0, err
		}
		kvStart := off
		if err := put(f.xkv.out.Bytes()); err != nil {
			return 0, err
		}
		var xm metaWriter
		xm.w = w
		if err := xm.write(f.xids); err != nil {
			return 0, err
		}
		if err := xm.finish(); err != nil {
			return 0, err
		}
		xmStart := off
		if err := put(xm.out.Bytes()); err != nil {
			return 0, err
		}
		xattrStart = off
		var h le
		h.u64(kvStart)
		h.u32(uint32(len(f.xids) / 16))
		h.u32(0)
		for _, s := range xm.starts {
			h.u64(xmStart + s)
		}
		if err := put(h.b); err != nil {
			return 0, err
		}
	} else {
		flags |= 0x200 // no xattrs
	}
	bytesUsed := off

	var sb le
	sb.u32(0x73717368)
	sb.u32(f.nextNo)
	sb.u32(w.mkfsTime)
	sb.u32(uint32(w.blockSize))
	sb.u32(0) // fragments
	sb.u16(1) // zlib
	sb.u16(uint16(bitsLen(w.blockSize)))
	sb.u16(flags)
	sb.u16(uint16(len(f.ids)))
	sb.u16(4)
	sb.u16(0)
	sb.u64(w.root.ref)
	sb.u64(bytesUsed)
	sb.u64(idStart)
	sb.u64(xattrStart)
	sb.u64(inodeStart)
	sb.u64(dirStart)
	sb.u64(fragStart)
	sb.u64(math.MaxUint64) // no export table
	if _, err := w.out.WriteAt(sb.b, 0); err != nil {
		return 0, err
	}
	// Pad to 4 KiB so the image can back a block device directly.
	size := int64((bytesUsed + 4095) &^ 4095)
	if pad := size - int64(bytesUsed); pad > 0 {
		if _, err := w.out.WriteAt(make([]byte, pad), int64(bytesUsed)); err != nil {
			return 0, err
		}
	}
	return size, nil
}

func bitsLen(n int) int {
	b := 0
	for n > 1 {
		n >>= 1
		b++
	}
	return b
}

func sortedNames(d *node) []string {
	names := make([]string, 0, len(d.children))
	for k := range d.children {
		names = append(names, k)
	}
	sort.Strings(names)
	return names
}

// number assigns inode numbers depth first, children in name order, so that
// entries of one directory get nearby numbers; the root gets the highest.
func (f *finisher) number(d *node) {
	for _, name := range sortedNames(d) {
		c := d.children[name]
		if c.typ == TypeDir {
			f.number(c)
			continue
		}
		if c.ino == 0 {
			f.nextNo++
			c.ino = f.nextNo
		}
	}
	f.nextNo++
	d.ino = f.nextNo
}

func (f *finisher) id(v uint32) uint16 {
	if i, ok := f.idIdx[v]; ok {
		return i
	}
	i := uint16(len(f.ids))
	f.ids = append(f.ids, v)
	f.idIdx[v] = i
	return i
}

func xattrPrefix(k string) (uint16, string, bool) {
	switch {
	case strings.HasPrefix(k, "user.") && len(k) > 5:
		return 0, k[5:], true
	case strings.HasPrefix(k, "trusted.") && len(k) > 8:
		return 1, k[8:], true
	case strings.HasPrefix(k, "security.") && len(k) > 9:
		return 2, k[9:], true
	}
	return 0, "", false
}

func (f *finisher) xattr(x map[string][]byte) (uint32, error) {
	if len(x) == 0 {
		return noXattr, nil
	}
	keys := make([]string, 0, len(x))
	for k := range x {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var kv le
	total := uint32(0)
	for _, k := range keys {
		t, name, _ := xattrPrefix(k)
		kv.u16(t)
		kv.u16(uint16(len(name)))
		kv.b = append(kv.b, name...)
		kv.u32(uint32(len(x[k])))
		kv.b = append(kv.b, x[k]...)
		total += uint32(len(k)) + 1
	}
	if i, ok := f.xdedup[string(kv.b)]; ok {
		return i, nil
	}
	blk, off := f.xkv.pos()
	if err := f.xkv.write(kv.b); err != nil {
		return 0, err
	}
	i := uint32(len(f.xids) / 16)
	var e le
	e.u64(blk<<16 | uint64(off))
	e.u32(uint32(len(keys)))
	e.u32(total)
	f.xids = append(f.xids, e.b...)
	f.xdedup[string(kv.b)] = i
	return i, nil
}

func (f *finisher) header(l *le, n *node, t uint16) {
	l.u16(t)
	l.u16(n.mode)
	l.u16(f.id(n.uid))
	l.u16(f.id(n.gid))
	l.u32(n.mtime)
	l.u32(n.ino)
}

// writeNode writes n's inode (and, for a directory, its children first and
// then its listing), recording n.ref.
func (f *finisher) writeNode(n *node, parentIno uint32) error {
	if n.written {
		return nil
	}
	xidx, err := f.xattr(n.xattrs)
	if err != nil {
		return err
	}
	n.xidx = xidx
	if n.typ == TypeDir {
		names := sortedNames(n)
		for _, name := range names {
			if err := f.writeNode(n.children[name], n.ino); err != nil {
				return err
			}
		}
		listBlk, listOff := f.dirs.pos()
		size, err := f.writeListing(n, names)
		if err != nil {
			return err
		}
		blk, off := f.inodes.pos()
		n.ref = blk<<16 | uint64(off)
		var l le
		if size+3 <= 0xFFFF && xidx == noXattr {
			f.header(&l, n, itDir)
			l.u32(uint32(listBlk))
			l.u32(n.nlink)
			l.u16(uint16(size + 3))
			l.u16(listOff)
			l.u32(parentIno)
		} else {
			f.header(&l, n, itXDir)
			l.u32(n.nlink)
			l.u32(uint32(size + 3))
			l.u32(uint32(listBlk))
			l.u32(parentIno)
			l.u16(0) // no directory index
			l.u16(listOff)
			l.u32(xidx)
		}
		n.written = true
		return f.inodes.write(l.b)
	}

	blk, off := f.inodes.pos()
	n.ref = blk<<16 | uint64(off)
	n.written = true
	var l le
	switch n.typ {
	case TypeRegular:
		if n.start <= math.MaxUint32 && n.size <= math.MaxUint32 && n.nlink == 1 && xidx == noXattr && n.sparse == 0 {
			f.header(&l, n, itFile)
			l.u32(uint32(n.start))
			l.u32(0xFFFFFFFF) // no fragment
			l.u32(0)
			l.u32(uint32(n.size))
		} else {
			f.header(&l, n, itXFile)
			l.u64(n.start)
			l.u64(n.size)
			l.u64(n.sparse)
			l.u32(n.nlink)
			l.u32(0xFFFFFFFF)
			l.u32(0)
			l.u32(xidx)
		}
		for _, b := range n.blocks {
			l.u32(b)
		}
	case TypeSymlink:
		if xidx == noXattr {
			f.header(&l, n, itSymlink)
		} else {
			f.header(&l, n, itXSymlink)
		}
		l.u32(n.nlink)
		l.u32(uint32(len(n.target)))
		l.b = append(l.b, n.target...)
		if xidx != noXattr {
			l.u32(xidx)
		}
	case TypeBlockDev, TypeCharDev:
		t := basicType(n.typ)
		if xidx != noXattr {
			t += 7
		}
		f.header(&l, n, t)
		l.u32(n.nlink)
		l.u32(n.rdev)
		if xidx != noXattr {
			l.u32(xidx)
		}
	default: // fifo, socket
		t := basicType(n.typ)
		if xidx != noXattr {
			t += 7
		}
		f.header(&l, n, t)
		l.u32(n.nlink)
		if xidx != noXattr {
			l.u32(xidx)
		}
	}
	return f.inodes.write(l.b)
}

// writeListing writes a directory's entries to the directory table and
// returns the listing size in bytes.
func (f *finisher) writeListing(d *node, names []string) (int, error) {
	var l le
	i := 0
	for i < len(names) {
		first := d.children[names[i]]
		blk := uint32(first.ref >> 16)
		base := first.ino
		j := i
		for j < len(names) && j-i < 256 {
			c := d.children[names[j]]
			diff := int64(c.ino) - int64(base)
			if uint32(c.ref>>16) != blk || diff < math.MinInt16 || diff > math.MaxInt16 {
				break
			}
			j++
		}
		l.u32(uint32(j - i - 1))
		l.u32(blk)
		l.u32(base)
		for k := i; k < j; k++ {
			c := d.children[names[k]]
			l.u16(uint16(c.ref & 0xFFFF))
			l.u16(uint16(int16(int64(c.ino) - int64(base))))
			l.u16(basicType(c.typ))
			l.u16(uint16(len(names[k]) - 1))
			l.b = append(l.b, names[k]...)
		}
		i = j
	}
	return len(l.b), f.dirs.write(l.b)
}
