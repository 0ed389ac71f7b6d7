package image

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"hash"
	"io"
	"os"
	"sort"
	"strings"
)

// A layer index lists what one layer tar holds, in archive order, so that
// the whiteouts an opaque directory needs can be computed from the layers
// below it without decompressing them again (see opaqueWhiteouts).
//
// Format (all of it written in one streaming pass):
//
//	"GSBXLIX1"                                  magic, 8 bytes
//	records: kind byte, uvarint shared, uvarint n, n bytes
//	    path = previous path[:shared] + the n bytes
//	    kind: 'd' directory, 'f' any non-directory, 'w' whiteout,
//	          'o' opaque directory marker
//	u32 records, u32 opaque markers (little endian)
//	sha256 of everything before it, 32 bytes
const (
	indexMagic     = "GSBXLIX1"
	indexFooterLen = 8 + sha256.Size

	idxDir      byte = 'd'
	idxFile     byte = 'f'
	idxWhiteout byte = 'w'
	idxOpaque   byte = 'o'
)

// errIndex is wrapped by every index parsing error.
var errIndex = fmt.Errorf("%w: corrupt layer index in the cache (Remove the image, Prune, and pull again)", ErrInvalidLayer)

// indexWriter writes a layer index.
type indexWriter struct {
	w       *bufio.Writer
	dst     io.Writer
	h       hash.Hash
	prev    string
	records uint32
	opaque  uint32
	err     error
	buf     []byte
}

func newIndexWriter(w io.Writer) *indexWriter {
	h := sha256.New()
	iw := &indexWriter{w: bufio.NewWriterSize(io.MultiWriter(w, h), 64<<10), dst: w, h: h}
	_, iw.err = iw.w.WriteString(indexMagic)
	return iw
}

func (iw *indexWriter) add(kind byte, p string) {
	if iw.err != nil {
		return
	}
	shared := 0
	for shared < len(p) && shared < len(iw.prev) && p[shared] == iw.prev[shared] {
		shared++
	}
	b := append(iw.buf[:0], kind)
	b = binary.AppendUvarint(b, uint64(shared))
	b = binary.AppendUvarint(b, uint64(len(p)-shared))
	b = append(b, p[shared:]...)
	iw.buf = b
	_, iw.err = iw.w.Write(b)
	iw.prev = p
	iw.records++
	if kind == idxOpaque {
		iw.opaque++
	}
}

// finish writes the footer and flushes.
func (iw *indexWriter) finish() error {
	if iw.err != nil {
		return iw.err
	}
	var f [8]byte
	binary.LittleEndian.PutUint32(f[0:], iw.records)
	binary.LittleEndian.PutUint32(f[4:], iw.opaque)
	if _, err := iw.w.Write(f[:]); err != nil {
		return err
	}
	if err := iw.w.Flush(); err != nil {
		return err
	}
	// The checksum covers everything before it; it goes straight to the
	// destination, not through the hash.
	_, err := iw.dst.Write(iw.h.Sum(nil))
	return err
}

// indexOpaqueCount reads the footer of the index file at p and returns how
// many opaque directory markers the layer has. It checks the magic and the
// file's size, not the checksum (readIndexFile does).
func indexOpaqueCount(p string) (int, error) {
	f, err := os.Open(p)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return 0, err
	}
	if fi.Size() < int64(len(indexMagic)+indexFooterLen) {
		return 0, fmt.Errorf("%w: %s is %d bytes", errIndex, p, fi.Size())
	}
	var m [len(indexMagic)]byte
	if _, err := f.ReadAt(m[:], 0); err != nil {
		return 0, fmt.Errorf("%w: %s: %v", errIndex, p, err)
	}
	var foot [8]byte
	if _, err := f.ReadAt(foot[:], fi.Size()-indexFooterLen); err != nil {
		return 0, fmt.Errorf("%w: %s: %v", errIndex, p, err)
	}
	records := binary.LittleEndian.Uint32(foot[0:])
	opaque := binary.LittleEndian.Uint32(foot[4:])
	if string(m[:]) != indexMagic || records > MaxLayerEntries || opaque > records {
		return 0, fmt.Errorf("%w: %s: bad header or footer", errIndex, p)
	}
	return int(opaque), nil
}

// readIndex parses an index from r, calling fn for every record in order.
// Every path is validated (clean, relative, at most MaxPathLen bytes); the
// checksum and record counts are checked at the end, so fn may have seen
// records of a corrupt index when readIndex fails: callers discard what
// they built in that case.
func readIndex(r io.Reader, fn func(kind byte, p string) error) error {
	h := sha256.New()
	// The footer (counts and checksum) is held back by tr; the records
	// are parsed from what comes before it.
	tr := &tailReader{r: r, keep: indexFooterLen, buf: make([]byte, 0, indexFooterLen+64<<10)}
	rd := bufio.NewReaderSize(io.TeeReader(tr, h), 64<<10)
	var m [len(indexMagic)]byte
	if _, err := io.ReadFull(rd, m[:]); err != nil || string(m[:]) != indexMagic {
		return fmt.Errorf("%w: bad magic", errIndex)
	}
	var prev []byte
	var records, opaque uint64
	for {
		kind, err := rd.ReadByte()
		if err == io.EOF {
			break
		}
		if err != nil {
			return fmt.Errorf("%w: %v", errIndex, err)
		}
		if records == MaxLayerEntries {
			return fmt.Errorf("%w: more than %d records", errIndex, MaxLayerEntries)
		}
		switch kind {
		case idxDir, idxFile, idxWhiteout, idxOpaque:
		default:
			return fmt.Errorf("%w: record %d: unknown kind %#x", errIndex, records, kind)
		}
		shared, err := binary.ReadUvarint(rd)
		if err != nil {
			return fmt.Errorf("%w: record %d: %v", errIndex, records, err)
		}
		n, err := binary.ReadUvarint(rd)
		if err != nil {
			return fmt.Errorf("%w: record %d: %v", errIndex, records, err)
		}
		if shared > uint64(len(prev)) || n > MaxPathLen || shared+n > MaxPathLen {
			return fmt.Errorf("%w: record %d: bad path length", errIndex, records)
		}
		p := make([]byte, shared+n)
		copy(p, prev[:shared])
		if _, err := io.ReadFull(rd, p[shared:]); err != nil {
			return fmt.Errorf("%w: record %d: %v", errIndex, records, err)
		}
		prev = p
		ps := string(p)
		if !validIndexPath(ps) {
			return fmt.Errorf("%w: record %d: invalid path %q", errIndex, records, ps)
		}
		records++
		if kind == idxOpaque {
			opaque++
		}
		if err := fn(kind, ps); err != nil {
			return err
		}
	}
	if len(tr.buf) != indexFooterLen {
		return fmt.Errorf("%w: no footer", errIndex)
	}
	counts, sum := tr.buf[:8], tr.buf[8:]
	h.Write(counts)
	if !bytes.Equal(h.Sum(nil), sum) {
		return fmt.Errorf("%w: checksum mismatch", errIndex)
	}
	if uint64(binary.LittleEndian.Uint32(counts[0:])) != records || uint64(binary.LittleEndian.Uint32(counts[4:])) != opaque {
		return fmt.Errorf("%w: record counts do not match the footer", errIndex)
	}
	return nil
}

// tailReader passes through everything but the last keep bytes of r,
// which stay in buf once r reaches EOF.
type tailReader struct {
	r    io.Reader
	keep int
	buf  []byte // cap > keep
	eof  bool
}

func (t *tailReader) Read(p []byte) (int, error) {
	for !t.eof && len(t.buf) <= t.keep {
		n, err := t.r.Read(t.buf[len(t.buf):cap(t.buf)])
		t.buf = t.buf[:len(t.buf)+n]
		if err == io.EOF {
			t.eof = true
		} else if err != nil {
			return 0, err
		}
	}
	avail := len(t.buf) - t.keep
	if avail <= 0 {
		return 0, io.EOF
	}
	n := copy(p, t.buf[:avail])
	rest := copy(t.buf, t.buf[n:])
	t.buf = t.buf[:rest]
	return n, nil
}

// validIndexPath accepts "" (the root) and clean relative paths.
func validIndexPath(p string) bool {
	if p == "" {
		return true
	}
	if strings.HasPrefix(p, "/") || strings.HasSuffix(p, "/") || strings.IndexByte(p, 0) >= 0 {
		return false
	}
	for _, c := range strings.Split(p, "/") {
		if c == "" || c == "." || c == ".." || len(c) > 256 {
			return false
		}
	}
	return true
}

func splitIndexPath(p string) []string {
	if p == "" {
		return nil
	}
	return strings.Split(p, "/")
}

// mnode is a directory tree of names only: enough to know what a merged
// overlay view shows.
type mnode struct {
	dir   bool
	layer int // for non-directories: the layer that put it there
	kids  map[string]*mnode
}

func newMDir() *mnode { return &mnode{dir: true} }

func (n *mnode) lookup(parts []string) *mnode {
	for _, c := range parts {
		if n == nil || !n.dir {
			return nil
		}
		n = n.kids[c]
	}
	return n
}

// ensureDir makes every component of parts a directory, replacing
// non-directories (an upper directory hides a lower non-directory).
func (n *mnode) ensureDir(parts []string) *mnode {
	for _, c := range parts {
		k := n.kids[c]
		if k == nil || !k.dir {
			k = newMDir()
			if n.kids == nil {
				n.kids = map[string]*mnode{}
			}
			n.kids[c] = k
		}
		n = k
	}
	return n
}

// setFile puts a non-directory at parts (whatever was there is hidden).
func (n *mnode) setFile(parts []string, layer int) {
	if len(parts) == 0 {
		return
	}
	d := n.ensureDir(parts[:len(parts)-1])
	if d.kids == nil {
		d.kids = map[string]*mnode{}
	}
	d.kids[parts[len(parts)-1]] = &mnode{layer: layer}
}

// remove deletes parts and everything under it.
func (n *mnode) remove(parts []string) {
	if len(parts) == 0 {
		n.kids = nil
		return
	}
	if d := n.lookup(parts[:len(parts)-1]); d != nil && d.dir {
		delete(d.kids, parts[len(parts)-1])
	}
}

// ptrie holds the opaque directories whose lower contents matter.
type ptrie struct {
	opaque bool
	kids   map[string]*ptrie
}

func (t *ptrie) add(parts []string) {
	for _, c := range parts {
		if t.kids == nil {
			t.kids = map[string]*ptrie{}
		}
		k := t.kids[c]
		if k == nil {
			k = &ptrie{}
			t.kids[c] = k
		}
		t = k
	}
	t.opaque = true
}

// descend follows parts down from t. It reports whether the walk passes
// an opaque directory before the last component (opaque above), and
// otherwise the node at parts, nil where parts leaves the trie.
func (t *ptrie) descend(parts []string) (end *ptrie, opaqueAbove bool) {
	for _, c := range parts {
		if t.opaque {
			return nil, true
		}
		if t = t.kids[c]; t == nil {
			return nil, false
		}
	}
	return t, false
}

// relevant reports whether parts is an opaque directory, under one, or an
// ancestor of one: only such paths can change what an opaque directory
// hides.
func (t *ptrie) relevant(parts []string) bool {
	end, above := t.descend(parts)
	return above || end != nil
}

// under reports whether parts is an opaque directory or under one.
func (t *ptrie) under(parts []string) bool {
	end, above := t.descend(parts)
	return above || end != nil && end.opaque
}

// maxExtraWhiteouts bounds the whiteouts added to one layer variant.
const maxExtraWhiteouts = MaxLayerEntries

// layerSource opens one layer's index for reading (it may be called more
// than once per layer).
type layerSource func() (io.ReadCloser, error)

func eachRecord(open layerSource, fn func(kind byte, parts []string, p string) error) error {
	rc, err := open()
	if err != nil {
		return err
	}
	defer rc.Close()
	return readIndex(rc, func(kind byte, p string) error { return fn(kind, splitIndexPath(p), p) })
}

// applyLayer applies one layer's index to the merged view m, keeping only
// paths relevant to trie: whiteouts and opaque markers first (they act on
// the layers below), then what the layer adds.
func applyLayer(m *mnode, trie *ptrie, open layerSource, layer int) error {
	if err := eachRecord(open, func(kind byte, parts []string, _ string) error {
		if !trie.relevant(parts) {
			return nil
		}
		switch kind {
		case idxWhiteout:
			m.remove(parts)
		case idxOpaque:
			if d := m.lookup(parts); d != nil && d.dir {
				d.kids = nil
			}
		}
		return nil
	}); err != nil {
		return err
	}
	return eachRecord(open, func(kind byte, parts []string, _ string) error {
		if !trie.relevant(parts) {
			return nil
		}
		switch kind {
		case idxDir:
			m.ensureDir(parts)
		case idxFile:
			m.setFile(parts, layer)
		case idxOpaque:
			// The converter makes the directory unless the layer itself
			// put a non-directory there (then the marker is moot).
			if k := m.lookup(parts); k == nil || k.dir || k.layer != layer {
				m.ensureDir(parts)
			}
		}
		return nil
	})
}

// opaqueWhiteouts computes, for every layer (base first) that has opaque
// directories and is listed in want, the whiteouts that make those
// directories opaque without the trusted.overlay.opaque xattr: in each
// opaque directory D of layer i, and in each directory under D that layer
// i also has, one whiteout for every name the merged view of layers
// 0..i-1 shows there and layer i does not list itself. Indexes are read
// through open; opaque[i] is the opaque marker count of layer i. The
// result maps a layer position to its sorted whiteout paths (empty when
// nothing below needs hiding).
func opaqueWhiteouts(open []layerSource, opaque []int, want map[int]bool) (map[int][]string, error) {
	top := -1
	for i := range open {
		if want[i] && opaque[i] > 0 {
			top = i
		}
	}
	out := map[int][]string{}
	if top < 0 {
		return out, nil
	}
	// Pass 1: the opaque directories of the layers that need variants.
	trie := &ptrie{}
	own := map[int]*ptrie{}
	for i := 0; i <= top; i++ {
		if !want[i] || opaque[i] == 0 {
			continue
		}
		t := &ptrie{}
		if err := eachRecord(open[i], func(kind byte, parts []string, _ string) error {
			if kind == idxOpaque {
				t.add(parts)
				trie.add(parts)
			}
			return nil
		}); err != nil {
			return nil, err
		}
		own[i] = t
	}
	// Pass 2: merge bottom-up; before applying a wanted layer, compare its
	// own opaque subtrees with the merged view of the layers below.
	m := newMDir()
	for i := 0; i <= top; i++ {
		if t := own[i]; t != nil {
			w, err := layerWhiteouts(m, t, open[i])
			if err != nil {
				return nil, err
			}
			out[i] = w
		}
		if i < top {
			if err := applyLayer(m, trie, open[i], i); err != nil {
				return nil, err
			}
		}
	}
	return out, nil
}

// layerWhiteouts builds the layer's own tree under its opaque directories
// (trie t) and lists the lower names it must hide.
func layerWhiteouts(lower *mnode, t *ptrie, open layerSource) ([]string, error) {
	self := newMDir()
	var dirs [][]string
	if err := eachRecord(open, func(kind byte, parts []string, _ string) error {
		if !t.under(parts) {
			return nil
		}
		switch kind {
		case idxDir:
			self.ensureDir(parts)
		case idxFile, idxWhiteout:
			self.setFile(parts, 0)
		case idxOpaque:
			if k := self.lookup(parts); k == nil || k.dir {
				self.ensureDir(parts)
				dirs = append(dirs, parts)
			}
		}
		return nil
	}); err != nil {
		return nil, err
	}
	seen := map[string]bool{}
	var out []string
	var visit func(prefix string, s, l *mnode) error
	visit = func(prefix string, s, l *mnode) error {
		if l == nil || !l.dir || s == nil || !s.dir {
			return nil
		}
		for name, lk := range l.kids {
			p := name
			if prefix != "" {
				p = prefix + "/" + name
			}
			sk := s.kids[name]
			if sk == nil {
				if !seen[p] {
					seen[p] = true
					out = append(out, p)
					if len(out) > maxExtraWhiteouts {
						return fmt.Errorf("%w: an opaque directory hides more than %d lower entries", ErrInvalidLayer, maxExtraWhiteouts)
					}
				}
				continue
			}
			if err := visit(p, sk, lk); err != nil {
				return err
			}
		}
		return nil
	}
	for _, d := range dirs {
		if err := visit(strings.Join(d, "/"), self.lookup(d), lower.lookup(d)); err != nil {
			return nil, err
		}
	}
	sort.Strings(out)
	return out, nil
}

// chainIDs returns the OCI ChainIDs of diff IDs listed base first:
// ChainID(L0) = DiffID(L0), ChainID(Ln) = sha256(ChainID(Ln-1) + " " +
// DiffID(Ln)).
func chainIDs(diffIDs []string) []string {
	out := make([]string, len(diffIDs))
	for i, d := range diffIDs {
		if i == 0 {
			out[i] = d
			continue
		}
		s := sha256.Sum256([]byte(out[i-1] + " " + d))
		out[i] = "sha256:" + hex.EncodeToString(s[:])
	}
	return out
}
