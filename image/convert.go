package image

import (
	"archive/tar"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"io/fs"
	"math"
	"path"
	"strings"

	"github.com/gosandbox/sandbox/image/squashfs"
)

// Limits applied to every layer tar (they bound memory, not data size).
const (
	// MaxLayerEntries is the most entries one layer may hold.
	MaxLayerEntries = 1 << 21
	// MaxPathLen is the longest entry path (Linux PATH_MAX).
	MaxPathLen = 4096
	// MaxXattrBytes is the most xattr name+value bytes one entry may carry.
	MaxXattrBytes = 64 << 10
	// MaxSparseExpansion bounds how many more bytes of file contents a
	// layer may produce than its tar stream holds (sparse-file holes). A
	// hostile sparse header could otherwise claim exabytes of zeros.
	MaxSparseExpansion = 1 << 30
)

const (
	whiteoutPrefix = ".wh."
	whiteoutMeta   = ".wh..wh."
	whiteoutOpaque = ".wh..wh..opq"
	paxXattr       = "SCHILY.xattr."
	// OverlayOpaqueXattr is set to "y" on directories that hide the
	// contents of lower layers (OCI ".wh..wh..opq").
	OverlayOpaqueXattr = "trusted.overlay.opaque"
)

// entryKind is what a tar entry means for the layer.
type entryKind uint8

const (
	kindFile entryKind = iota + 1
	kindDir
	kindSymlink
	kindHardlink
	kindCharDev
	kindBlockDev
	kindFIFO
	kindWhiteout // delete Path from lower layers
	kindOpaque   // hide lower contents of directory Path
)

// layerEntry is one validated tar entry. Path and LinkTarget are clean,
// relative, slash-separated; Path "" is the layer root.
type layerEntry struct {
	Kind         entryKind
	Path         string
	LinkTarget   string // symlink target (verbatim) or hard-link target (clean)
	Mode         fs.FileMode
	UID, GID     uint32
	ModTime      int64
	Major, Minor uint32
	Size         int64
	Xattrs       map[string][]byte
	// Dropped counts xattrs that were not kept (namespaces SquashFS cannot
	// store, or trusted.overlay.* forged by the layer).
	Dropped int
}

// cleanEntryPath validates a tar name and returns it clean and relative.
func cleanEntryPath(name string) (string, error) {
	if name == "" {
		return "", fmt.Errorf("%w: empty name", ErrInvalidLayer)
	}
	if len(name) > MaxPathLen {
		return "", fmt.Errorf("%w: name of %d bytes (max %d)", ErrInvalidLayer, len(name), MaxPathLen)
	}
	if strings.IndexByte(name, 0) >= 0 {
		return "", fmt.Errorf("%w: NUL byte in name", ErrInvalidLayer)
	}
	if strings.HasPrefix(name, "/") {
		return "", fmt.Errorf("%w: absolute path", ErrUnsafePath)
	}
	for _, c := range strings.Split(name, "/") {
		if c == ".." {
			return "", fmt.Errorf("%w: \"..\" component", ErrUnsafePath)
		}
		if len(c) > squashfs.MaxNameLen {
			return "", fmt.Errorf("%w: name component of %d bytes (max %d)", ErrInvalidLayer, len(c), squashfs.MaxNameLen)
		}
	}
	p := path.Clean(name)
	if p == "." {
		return "", nil
	}
	return p, nil
}

func idOf(v int) (uint32, error) {
	if v < 0 || int64(v) > math.MaxUint32 {
		return 0, fmt.Errorf("%w: uid/gid %d out of range", ErrInvalidLayer, v)
	}
	return uint32(v), nil
}

// walkTar reads an uncompressed layer tar and calls fn for every entry, in
// archive order, after validating and normalizing it. For kindFile, data
// reads the entry's contents. Errors are *LayerError wrapping a sentinel, or
// ErrTruncated / ErrInvalidLayer for a malformed stream, or ctx's error.
func walkTar(ctx context.Context, r io.Reader, fn func(e *layerEntry, data io.Reader) error) error {
	raw := &rawCounter{r: r}
	tr := tar.NewReader(raw)
	data := &ctxReader{ctx: ctx, r: tr, raw: raw}
	n := 0
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		hdr, err := tr.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return tarErr(err)
		}
		n++
		if n > MaxLayerEntries {
			return fmt.Errorf("%w: more than %d entries", ErrInvalidLayer, MaxLayerEntries)
		}
		e, skip, err := toEntry(hdr)
		if err != nil {
			return &LayerError{Path: hdr.Name, Err: err}
		}
		if skip {
			continue
		}
		var dr io.Reader
		if e.Kind == kindFile {
			dr = data
		}
		if err := fn(e, dr); err != nil {
			var le *LayerError
			if errors.As(err, &le) || errors.Is(err, ctx.Err()) && ctx.Err() != nil {
				return err
			}
			if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, tar.ErrHeader) {
				return tarErr(err)
			}
			return &LayerError{Path: hdr.Name, Err: err}
		}
	}
}

func tarErr(err error) error {
	switch {
	case errors.Is(err, io.ErrUnexpectedEOF):
		return fmt.Errorf("%w: layer tar ended in the middle of an entry", ErrTruncated)
	case errors.Is(err, tar.ErrHeader), errors.Is(err, tar.ErrFieldTooLong), errors.Is(err, tar.ErrInsecurePath):
		return fmt.Errorf("%w: %v", ErrInvalidLayer, err)
	case strings.HasPrefix(err.Error(), "archive/tar:"):
		return fmt.Errorf("%w: %v", ErrInvalidLayer, err)
	}
	return err
}

type rawCounter struct {
	r io.Reader
	n int64
}

func (c *rawCounter) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}

// ctxReader reads file contents, checking ctx now and then and bounding
// sparse expansion.
type ctxReader struct {
	ctx      context.Context
	r        io.Reader
	raw      *rawCounter
	calls    int
	produced int64
}

var errSparse = fmt.Errorf("%w: sparse files expand to more than %d bytes beyond the layer size", ErrInvalidLayer, int64(MaxSparseExpansion))

func (c *ctxReader) Read(p []byte) (int, error) {
	c.calls++
	if c.calls%64 == 0 {
		if err := c.ctx.Err(); err != nil {
			return 0, err
		}
	}
	if c.produced > c.raw.n+MaxSparseExpansion {
		return 0, errSparse
	}
	n, err := c.r.Read(p)
	c.produced += int64(n)
	return n, err
}

func toEntry(hdr *tar.Header) (*layerEntry, bool, error) {
	switch hdr.Typeflag {
	case tar.TypeXGlobalHeader, 'V':
		return nil, true, nil
	}
	p, err := cleanEntryPath(hdr.Name)
	if err != nil {
		return nil, false, err
	}
	e := &layerEntry{Path: p, Mode: fs.FileMode(hdr.Mode & 0o7777), ModTime: hdr.ModTime.Unix(), Size: hdr.Size}
	if e.UID, err = idOf(hdr.Uid); err != nil {
		return nil, false, err
	}
	if e.GID, err = idOf(hdr.Gid); err != nil {
		return nil, false, err
	}
	base := path.Base(p)
	if p != "" && strings.HasPrefix(base, whiteoutPrefix) {
		dir := path.Dir(p)
		if dir == "." {
			dir = ""
		}
		switch {
		case base == whiteoutOpaque:
			e.Kind, e.Path = kindOpaque, dir
		case strings.HasPrefix(base, whiteoutMeta):
			return nil, true, nil // AUFS bookkeeping (.wh..wh.plnk, .wh..wh.aufs)
		default:
			e.Kind, e.Path = kindWhiteout, path.Join(dir, base[len(whiteoutPrefix):])
			e.Mode, e.UID, e.GID = 0, 0, 0
		}
		return e, false, nil
	}
	if p == "" && hdr.Typeflag != tar.TypeDir {
		return nil, false, fmt.Errorf("%w: the layer root must be a directory", ErrInvalidLayer)
	}
	switch hdr.Typeflag {
	case tar.TypeReg, tar.TypeRegA, tar.TypeCont, tar.TypeGNUSparse:
		e.Kind = kindFile
		if hdr.Size < 0 {
			return nil, false, fmt.Errorf("%w: negative size", ErrInvalidLayer)
		}
	case tar.TypeDir:
		e.Kind = kindDir
	case tar.TypeSymlink:
		e.Kind = kindSymlink
		if hdr.Linkname == "" || len(hdr.Linkname) > squashfs.MaxSymlinkLen || strings.IndexByte(hdr.Linkname, 0) >= 0 {
			return nil, false, fmt.Errorf("%w: symlink target of %d bytes", ErrInvalidLayer, len(hdr.Linkname))
		}
		e.LinkTarget = hdr.Linkname
	case tar.TypeLink:
		e.Kind = kindHardlink
		t, err := cleanEntryPath(hdr.Linkname)
		if err != nil {
			return nil, false, fmt.Errorf("%w: hard link target %q: %v", ErrLinkEscape, hdr.Linkname, err)
		}
		if t == "" {
			return nil, false, fmt.Errorf("%w: hard link to the layer root", ErrLinkEscape)
		}
		e.LinkTarget = t
	case tar.TypeChar, tar.TypeBlock:
		e.Kind = kindCharDev
		if hdr.Typeflag == tar.TypeBlock {
			e.Kind = kindBlockDev
		}
		if hdr.Devmajor < 0 || hdr.Devmajor > 0xfff || hdr.Devminor < 0 || hdr.Devminor > 0xfffff {
			return nil, false, fmt.Errorf("%w: device number %d:%d out of range", ErrInvalidLayer, hdr.Devmajor, hdr.Devminor)
		}
		e.Major, e.Minor = uint32(hdr.Devmajor), uint32(hdr.Devminor)
	case tar.TypeFifo:
		e.Kind = kindFIFO
	default:
		return nil, false, fmt.Errorf("%w: unsupported tar entry type %q", ErrInvalidLayer, hdr.Typeflag)
	}
	total := 0
	for k, v := range hdr.PAXRecords {
		name, ok := strings.CutPrefix(k, paxXattr)
		if !ok {
			continue
		}
		total += len(name) + len(v)
		if total > MaxXattrBytes {
			return nil, false, fmt.Errorf("%w: more than %d bytes of xattrs", ErrInvalidLayer, MaxXattrBytes)
		}
		// SquashFS stores only these namespaces, and overlayfs control
		// xattrs must come from whiteout entries, never from the layer
		// itself (a forged trusted.overlay.redirect could reach outside
		// the intended lower directory).
		if !(strings.HasPrefix(name, "user.") || strings.HasPrefix(name, "security.") ||
			strings.HasPrefix(name, "trusted.") && !strings.HasPrefix(name, "trusted.overlay.")) {
			e.Dropped++
			continue
		}
		if e.Xattrs == nil {
			e.Xattrs = map[string][]byte{}
		}
		e.Xattrs[name] = []byte(v)
	}
	return e, false, nil
}

// estargzMeta are the root entries eStargz adds to a layer (its TOC and
// prefetch landmarks). They are build metadata, not image content, so they
// are left out of the file system, as stargz-snapshotter does; DiffID still
// covers them.
var estargzMeta = map[string]bool{
	"stargz.index.json":     true,
	".prefetch.landmark":    true,
	".no.prefetch.landmark": true,
}

// LayerStats describes one converted layer.
type LayerStats struct {
	// DiffID is the sha256 digest of the uncompressed tar stream
	// ("sha256:<hex>"), as the image config's rootfs.diff_ids lists it.
	DiffID string
	// TarBytes is the length of the uncompressed tar stream.
	TarBytes int64
	// ImageBytes is the size of the SquashFS image written.
	ImageBytes int64
	// Entries counts tar entries turned into file system objects
	// (whiteouts and opaque markers included).
	Entries int
	// DroppedXattrs counts xattrs left out: namespaces SquashFS cannot
	// hold (system.*, e.g. POSIX ACLs) and trusted.overlay.* set by the
	// layer itself.
	DroppedXattrs int
	// OpaqueDirs counts opaque directory markers (".wh..wh..opq"). A
	// layer with any needs a per-image variant of its SquashFS image for
	// guest kernels without SquashFS xattrs (see the package doc).
	OpaqueDirs int
}

type countHash struct {
	h hash.Hash
	n int64
}

func (c *countHash) Write(p []byte) (int, error) { c.n += int64(len(p)); return c.h.Write(p) }

// ConvertLayer turns one uncompressed OCI layer tar, read from r, into a
// SquashFS (zlib) image written to out, and returns its statistics. r is
// read to EOF so that DiffID covers the whole stream.
//
// The layer is untrusted: absolute paths and ".." components fail with
// ErrUnsafePath, hard links to paths outside the layer (or not yet in it) and
// paths through symlinks with ErrLinkEscape, repeated non-directory paths with
// ErrDuplicateEntry, malformed or oversized headers with ErrInvalidLayer, and a
// short stream with ErrTruncated. Nothing is written except to out. OCI
// whiteouts become overlayfs whiteouts: ".wh.NAME" a character device 0/0
// named NAME, ".wh..wh..opq" the xattr trusted.overlay.opaque=y on its
// directory. A guest kernel without SquashFS xattrs needs more for opaque
// directories: Store adds it per image (see the package doc).
//
// opts tune the SquashFS writer (block size, zlib level, concurrency).
func ConvertLayer(ctx context.Context, r io.Reader, out io.WriterAt, opts ...squashfs.Option) (LayerStats, error) {
	return convertLayer(ctx, r, out, convConfig{sq: opts})
}

// convConfig holds what the Store adds to ConvertLayer.
type convConfig struct {
	sq []squashfs.Option
	// index, when set, receives the layer index (see index.go).
	index io.Writer
	// whiteouts are extra whiteouts (clean relative paths) to add to the
	// image: the variant of a layer with opaque directories. When set, the
	// image gets no trusted.overlay.opaque xattrs: the whiteouts express
	// the opaque directories fully, and a kernel that honours the xattr
	// would not merge such a directory and so would list the whiteouts in
	// it as entries that do not exist (readdir shows them, stat fails).
	whiteouts []string
}

func indexKind(k entryKind) byte {
	switch k {
	case kindDir:
		return idxDir
	case kindWhiteout:
		return idxWhiteout
	case kindOpaque:
		return idxOpaque
	}
	return idxFile
}

func convertLayer(ctx context.Context, r io.Reader, out io.WriterAt, cc convConfig) (LayerStats, error) {
	var st LayerStats
	ch := &countHash{h: sha256.New()}
	tee := io.TeeReader(r, ch)
	w, err := squashfs.NewWriter(out, cc.sq...)
	if err != nil {
		return st, err
	}
	var iw *indexWriter
	if cc.index != nil {
		iw = newIndexWriter(cc.index)
	}
	var opaque []string
	err = walkTar(ctx, tee, func(e *layerEntry, data io.Reader) error {
		if estargzMeta[e.Path] {
			return nil
		}
		if iw != nil {
			iw.add(indexKind(e.Kind), e.Path)
		}
		st.Entries++
		st.DroppedXattrs += e.Dropped
		se := squashfs.Entry{Path: e.Path, Mode: e.Mode, UID: e.UID, GID: e.GID, ModTime: e.ModTime, Xattrs: e.Xattrs}
		var err error
		switch e.Kind {
		case kindFile:
			se.Type = squashfs.TypeRegular
			err = w.Add(se, data)
		case kindDir:
			se.Type = squashfs.TypeDir
			err = w.Add(se, nil)
		case kindSymlink:
			se.Type, se.Target = squashfs.TypeSymlink, e.LinkTarget
			err = w.Add(se, nil)
		case kindHardlink:
			err = w.Link(e.Path, e.LinkTarget)
		case kindCharDev, kindWhiteout:
			se.Type, se.Major, se.Minor = squashfs.TypeCharDev, e.Major, e.Minor
			err = w.Add(se, nil)
		case kindBlockDev:
			se.Type, se.Major, se.Minor = squashfs.TypeBlockDev, e.Major, e.Minor
			err = w.Add(se, nil)
		case kindFIFO:
			se.Type = squashfs.TypeFIFO
			err = w.Add(se, nil)
		case kindOpaque:
			if e.Path != "" && !w.Exists(e.Path) {
				err = w.Add(squashfs.Entry{Path: e.Path, Type: squashfs.TypeDir, Mode: 0o755}, nil)
			}
			opaque = append(opaque, e.Path)
		}
		return mapWriterErr(err)
	})
	if err != nil {
		return st, err
	}
	// Drain the tar padding so DiffID covers the whole stream.
	if _, err := io.Copy(io.Discard, tee); err != nil {
		return st, tarErr(err)
	}
	for _, p := range opaque {
		if len(cc.whiteouts) > 0 {
			break
		}
		if err := w.SetXattr(p, OverlayOpaqueXattr, []byte("y")); err != nil {
			return st, &LayerError{Path: p, Err: mapWriterErr(err)}
		}
	}
	st.OpaqueDirs = len(opaque)
	for _, p := range cc.whiteouts {
		if w.Exists(p) {
			continue
		}
		if err := w.Add(squashfs.Entry{Path: p, Type: squashfs.TypeCharDev}, nil); err != nil {
			return st, &LayerError{Path: p, Err: mapWriterErr(err)}
		}
	}
	if iw != nil {
		if err := iw.finish(); err != nil {
			return st, err
		}
	}
	size, err := w.Finish()
	if err != nil {
		return st, mapWriterErr(err)
	}
	st.ImageBytes = size
	st.TarBytes = ch.n
	st.DiffID = "sha256:" + hex.EncodeToString(ch.h.Sum(nil))
	return st, nil
}

func mapWriterErr(err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, squashfs.ErrExists):
		return fmt.Errorf("%w: %v", ErrDuplicateEntry, err)
	case errors.Is(err, squashfs.ErrNotDir), errors.Is(err, squashfs.ErrLinkTarget):
		return fmt.Errorf("%w: %v", ErrLinkEscape, err)
	case errors.Is(err, squashfs.ErrInvalidPath):
		return fmt.Errorf("%w: %v", ErrUnsafePath, err)
	case errors.Is(err, squashfs.ErrInvalidEntry), errors.Is(err, squashfs.ErrTooLarge):
		return fmt.Errorf("%w: %v", ErrInvalidLayer, err)
	}
	return err
}
