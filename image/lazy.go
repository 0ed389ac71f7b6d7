package image

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"io/fs"
	"net/http"
	"os"
	"path"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/stargz-snapshotter/estargz"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
	godigest "github.com/opencontainers/go-digest"
)

// ErrNotLazy means an image cannot be opened lazily because a layer is not
// eStargz (no TOC digest annotation). Pull it instead.
var ErrNotLazy = errors.New("image: layer is not eStargz; use Pull")

// LazyImage is an eStargz image opened without downloading its layers:
// only each layer's table of contents (TOC) is fetched up front, and file
// contents are fetched on demand with HTTP range requests, verified chunk
// by chunk against the TOC (whose digest the manifest pins), and kept in a
// sparse scratch file in the cache. The view is the layers merged with OCI
// whiteout semantics, as overlayfs would show them.
//
// A LazyImage owns an HTTP client and one scratch file per layer; Close
// releases them. Its methods are safe for concurrent use.
type LazyImage struct {
	// Image describes the manifest and config (Layers[i].Path is empty:
	// nothing is converted).
	Image *Image

	layers []*lazyLayer // base first
	closed atomic.Bool
	// life bounds in-flight range requests: Close cancels it. It is the
	// LazyImage's own lifetime, not a caller's context.
	life   context.Context
	cancel context.CancelFunc
}

type lazyLayer struct {
	digest string
	blob   *rangeBlob
	r      *estargz.Reader
	ver    estargz.TOCEntryVerifier
}

// OpenLazy opens an eStargz image for lazy reading. It fetches the
// manifest, config and every layer's TOC; nothing else. Options are those
// of Pull (credentials, insecure); the pull policy is ignored.
func (s *Store) OpenLazy(ctx context.Context, ref string, opts ...PullOption) (*LazyImage, error) {
	if err := s.check(); err != nil {
		return nil, err
	}
	o := pullOptions{platform: v1.Platform{OS: "linux", Architecture: "amd64"}}
	for _, fn := range opts {
		if err := fn(&o); err != nil {
			return nil, err
		}
	}
	r, err := parseRef(ref, o.insecure)
	if err != nil {
		return nil, err
	}
	key := r.Name()
	rt := s.transport
	auth := o.auth
	if auth == nil {
		if auth, err = s.keychain.Resolve(r.Context()); err != nil {
			return nil, fmt.Errorf("image: credentials for %s: %w", key, err)
		}
	}
	desc, err := remote.Get(r, remote.WithContext(ctx), remote.WithPlatform(o.platform), remote.WithAuth(auth), remote.WithTransport(rt))
	if err != nil {
		return nil, remoteErr(key, err)
	}
	rimg, err := desc.Image()
	if err != nil {
		return nil, remoteErr(key, err)
	}
	rawManifest, err := rimg.RawManifest()
	if err != nil {
		return nil, remoteErr(key, err)
	}
	m, err := v1.ParseManifest(bytes.NewReader(rawManifest))
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrInvalidManifest, key, err)
	}
	rawConfig, err := rimg.RawConfigFile()
	if err != nil {
		return nil, remoteErr(key, err)
	}
	if got := digestOf(rawConfig); got != m.Config.Digest.String() {
		return nil, &DigestError{What: "config", Want: m.Config.Digest.String(), Got: got}
	}
	cfg, err := v1.ParseConfigFile(bytes.NewReader(rawConfig))
	if err != nil {
		return nil, fmt.Errorf("%w: config of %s: %v", ErrInvalidManifest, key, err)
	}
	img, err := assemble(key, digestOf(rawManifest), m, cfg)
	if err != nil {
		return nil, err
	}
	rt2, err := transport.NewWithContext(ctx, r.Context().Registry, auth, rt, []string{r.Context().Scope(transport.PullScope)})
	if err != nil {
		return nil, remoteErr(key, err)
	}
	life, cancel := context.WithCancel(context.Background())
	li := &LazyImage{Image: img, life: life, cancel: cancel}
	for i, l := range m.Layers {
		toc := l.Annotations[estargz.TOCJSONDigestAnnotation]
		if toc == "" {
			_ = li.Close()
			return nil, fmt.Errorf("%w: layer %d (%s) of %s", ErrNotLazy, i, l.Digest, key)
		}
		if l.Size <= 0 || l.Size > maxLazyBlob {
			_ = li.Close()
			return nil, fmt.Errorf("%w: layer %s claims %d bytes", ErrInvalidManifest, l.Digest, l.Size)
		}
		tocDigest, err := godigest.Parse(toc)
		if err != nil {
			_ = li.Close()
			return nil, fmt.Errorf("%w: TOC digest %q: %v", ErrInvalidManifest, toc, err)
		}
		u := fmt.Sprintf("%s://%s/v2/%s/blobs/%s", r.Context().Registry.Scheme(), r.Context().RegistryStr(), r.Context().RepositoryStr(), l.Digest)
		f, err := s.tempFile("lazy-*.blob")
		if err != nil {
			_ = li.Close()
			return nil, err
		}
		b := &rangeBlob{client: &http.Client{Transport: rt2}, url: u, size: l.Size, life: life, f: f,
			have: make([]bool, (l.Size+lazyPage-1)/lazyPage)}
		ll := &lazyLayer{digest: l.Digest.String(), blob: b}
		li.layers = append(li.layers, ll)
		if err := ctx.Err(); err != nil {
			_ = li.Close()
			return nil, err
		}
		er, err := estargz.Open(io.NewSectionReader(b, 0, l.Size))
		if err != nil {
			_ = li.Close()
			if errors.Is(err, ErrDigestMismatch) || errors.Is(err, ErrTruncated) || errors.Is(err, ErrNotFound) {
				return nil, err
			}
			return nil, fmt.Errorf("%w: layer %s: eStargz TOC: %v", ErrInvalidLayer, l.Digest, err)
		}
		ver, err := er.VerifyTOC(tocDigest)
		if err != nil {
			_ = li.Close()
			return nil, &DigestError{What: "eStargz TOC of layer " + l.Digest.String(), Want: toc, Got: er.TOCDigest().String()}
		}
		ll.r, ll.ver = er, ver
	}
	return li, nil
}

// Close releases the scratch files and stops in-flight fetches. Safe to
// call twice.
func (li *LazyImage) Close() error {
	if li.closed.Swap(true) {
		return nil
	}
	li.cancel()
	for _, l := range li.layers {
		l.blob.close()
	}
	return nil
}

// FetchStats reports how much of the layer blobs was fetched so far.
type FetchStats struct {
	// Requests is the number of HTTP range requests made.
	Requests int64
	// Bytes is the number of blob bytes fetched.
	Bytes int64
	// Total is the size of all layer blobs.
	Total int64
}

// Stats returns the fetch counters.
func (li *LazyImage) Stats() FetchStats {
	var s FetchStats
	for _, l := range li.layers {
		s.Requests += l.blob.requests.Load()
		s.Bytes += l.blob.fetched.Load()
		s.Total += l.blob.size
	}
	return s
}

// Prefetch fetches, in one range request per layer, the files eStargz
// placed before the ".prefetch.landmark" entry (the files an image builder
// recorded as needed at startup). Layers without a landmark are skipped.
func (li *LazyImage) Prefetch(ctx context.Context) error {
	if li.closed.Load() {
		return ErrClosed
	}
	for _, l := range li.layers {
		if err := ctx.Err(); err != nil {
			return err
		}
		e, ok := l.r.Lookup(estargz.PrefetchLandmark)
		if !ok || e.Offset <= 0 {
			continue
		}
		if err := l.blob.ensure(0, e.Offset); err != nil {
			return err
		}
	}
	return nil
}

// LazyEntry describes one path of a LazyImage.
type LazyEntry struct {
	// Name is the base name ("" for the root).
	Name string
	// Type is the kind of object (squashfs.TypeDir, ... as FileType).
	Type string // "dir", "reg", "symlink", "char", "block", "fifo"
	// Mode holds the permission bits (with setuid/setgid/sticky).
	Mode fs.FileMode
	// UID and GID are the numeric owners.
	UID, GID int
	// Size is the file size in bytes (regular files).
	Size int64
	// ModTime is the modification time.
	ModTime time.Time
	// Target is the symlink target.
	Target string
	// Major and Minor are the device numbers.
	Major, Minor int
	// Xattrs are the extended attributes.
	Xattrs map[string][]byte
	// NumLink is the hard link count.
	NumLink int

	layer    *lazyLayer
	path     string
	dataName string // TOC name holding the data (the source of a hard link)
}

// ID returns a number that identifies the underlying file: equal for hard
// links to one file, different otherwise (a hash of the layer digest and
// the file's name in that layer). 9P servers use it as the QID path.
func (e *LazyEntry) ID() uint64 {
	h := fnv.New64a()
	h.Write([]byte(e.layer.digest))
	h.Write([]byte{0})
	h.Write([]byte(e.dataName))
	return h.Sum64()
}

// Path returns the entry's clean path in the merged tree ("" for the root).
func (e *LazyEntry) Path() string { return e.path }

func cleanLazyPath(p string) (string, error) {
	if strings.IndexByte(p, 0) >= 0 {
		return "", fmt.Errorf("%w: NUL in path", ErrUnsafePath)
	}
	p = path.Clean("/" + p)
	return strings.TrimPrefix(p, "/"), nil
}

// hides reports whether layer l hides p (and everything below it) from
// lower layers: a whiteout of p or of an ancestor, an opaque ancestor, or
// a non-directory ancestor.
func (l *lazyLayer) hides(p string) bool {
	parts := strings.Split(p, "/")
	cur := ""
	for i, c := range parts {
		if c == "" {
			continue
		}
		if _, ok := l.r.Lookup(path.Join(cur, whiteoutPrefix+c)); ok {
			return true
		}
		if _, ok := l.r.Lookup(path.Join(cur, whiteoutOpaque)); ok {
			return true
		}
		next := path.Join(cur, c)
		if i < len(parts)-1 {
			if e, ok := l.r.Lookup(next); ok && e.Type != "dir" {
				return true
			}
		}
		cur = next
	}
	return false
}

func isHiddenName(dir, base string) bool {
	if strings.HasPrefix(base, whiteoutPrefix) {
		return true
	}
	return dir == "" && (base == estargz.PrefetchLandmark || base == estargz.NoPrefetchLandmark || base == estargz.TOCTarName)
}

func toLazyEntry(l *lazyLayer, p string, e *estargz.TOCEntry) *LazyEntry {
	le := &LazyEntry{
		Name: path.Base(p), Type: e.Type, Mode: fs.FileMode(e.Mode & 0o777),
		UID: e.UID, GID: e.GID, Size: e.Size, ModTime: e.ModTime(), Target: e.LinkName,
		Major: e.DevMajor, Minor: e.DevMinor, Xattrs: e.Xattrs, NumLink: e.NumLink,
		layer: l, path: p, dataName: e.Name,
	}
	if p == "" {
		le.Name = ""
	}
	if le.ModTime.IsZero() { // directories the TOC made up
		le.ModTime = time.Unix(0, 0)
	}
	if e.Mode&0o4000 != 0 {
		le.Mode |= fs.ModeSetuid
	}
	if e.Mode&0o2000 != 0 {
		le.Mode |= fs.ModeSetgid
	}
	if e.Mode&0o1000 != 0 {
		le.Mode |= fs.ModeSticky
	}
	if le.Type == "hardlink" {
		le.Type = "reg"
	}
	return le
}

// Lookup returns the entry at p in the merged view, or an error matching
// fs.ErrNotExist.
func (li *LazyImage) Lookup(p string) (*LazyEntry, error) {
	if li.closed.Load() {
		return nil, ErrClosed
	}
	p, err := cleanLazyPath(p)
	if err != nil {
		return nil, err
	}
	if dir := path.Dir(p); p != "" && isHiddenName(strings.TrimPrefix(dir, "."), path.Base(p)) {
		return nil, &fs.PathError{Op: "lookup", Path: p, Err: fs.ErrNotExist}
	}
	for i := len(li.layers) - 1; i >= 0; i-- {
		l := li.layers[i]
		if e, ok := l.r.Lookup(p); ok {
			return toLazyEntry(l, p, e), nil
		}
		if p != "" && l.hides(p) {
			break
		}
	}
	return nil, &fs.PathError{Op: "lookup", Path: p, Err: fs.ErrNotExist}
}

// ReadDir lists the merged directory p, sorted by name.
func (li *LazyImage) ReadDir(p string) ([]*LazyEntry, error) {
	d, err := li.Lookup(p)
	if err != nil {
		return nil, err
	}
	if d.Type != "dir" {
		return nil, &fs.PathError{Op: "readdir", Path: p, Err: errors.New("not a directory")}
	}
	p = d.path
	seen := map[string]bool{}
	var out []*LazyEntry
	for i := len(li.layers) - 1; i >= 0; i-- {
		l := li.layers[i]
		de, ok := l.r.Lookup(p)
		if ok && de.Type == "dir" {
			de.ForeachChild(func(base string, e *estargz.TOCEntry) bool {
				if seen[base] {
					return true
				}
				seen[base] = true
				if strings.HasPrefix(base, whiteoutPrefix) {
					if !strings.HasPrefix(base, whiteoutMeta) {
						seen[base[len(whiteoutPrefix):]] = true // hide it in lower layers
					}
					return true
				}
				if isHiddenName(p, base) {
					return true
				}
				cp := path.Join(p, base)
				if e.Type == "hardlink" {
					src, ok := l.r.Lookup(cp)
					if !ok {
						return true
					}
					e = src
				}
				out = append(out, toLazyEntry(l, cp, e))
				return true
			})
			if _, opq := l.r.Lookup(path.Join(p, whiteoutOpaque)); opq {
				break
			}
		}
		if p != "" && l.hides(p) {
			break
		}
		if ok && de.Type != "dir" {
			break
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

// ReadFile returns the contents of the regular file p, fetching and
// verifying the chunks it needs.
func (li *LazyImage) ReadFile(ctx context.Context, p string) ([]byte, error) {
	f, err := li.Open(ctx, p)
	if err != nil {
		return nil, err
	}
	buf := make([]byte, f.Size())
	n, err := f.ReadAt(buf, 0)
	if err == io.EOF && int64(n) == f.Size() {
		err = nil
	}
	return buf[:n], err
}

// LazyFile reads one regular file of a LazyImage. Every chunk is checked
// against its digest in the TOC before any byte of it is returned.
type LazyFile struct {
	li   *LazyImage
	l    *lazyLayer
	name string
	size int64
	sr   *io.SectionReader

	mu    sync.Mutex
	cOff  int64
	cData []byte
}

// Open opens the regular file p for reading.
func (li *LazyImage) Open(ctx context.Context, p string) (*LazyFile, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	e, err := li.Lookup(p)
	if err != nil {
		return nil, err
	}
	if e.Type != "reg" {
		return nil, &fs.PathError{Op: "open", Path: p, Err: fmt.Errorf("not a regular file (%s)", e.Type)}
	}
	sr, err := e.layer.r.OpenFile(e.dataName)
	if err != nil {
		return nil, fmt.Errorf("image: open %q: %w", p, err)
	}
	return &LazyFile{li: li, l: e.layer, name: e.dataName, size: e.Size, sr: sr, cOff: -1}, nil
}

// Size returns the file size.
func (f *LazyFile) Size() int64 { return f.size }

// ReadAt implements io.ReaderAt.
func (f *LazyFile) ReadAt(p []byte, off int64) (int, error) {
	if f.li.closed.Load() {
		return 0, ErrClosed
	}
	n := 0
	for n < len(p) {
		if off >= f.size {
			return n, io.EOF
		}
		data, start, err := f.chunk(off)
		if err != nil {
			return n, err
		}
		k := copy(p[n:], data[off-start:])
		n += k
		off += int64(k)
	}
	return n, nil
}

// chunk returns the verified chunk holding off and its file offset.
func (f *LazyFile) chunk(off int64) ([]byte, int64, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.cOff >= 0 && off >= f.cOff && off < f.cOff+int64(len(f.cData)) {
		return f.cData, f.cOff, nil
	}
	ce, ok := f.l.r.ChunkEntryForOffset(f.name, off)
	if !ok {
		return nil, 0, fmt.Errorf("%w: no chunk for offset %d of %q", ErrInvalidLayer, off, f.name)
	}
	size := ce.ChunkSize
	if size <= 0 || ce.ChunkOffset+size > f.size {
		size = f.size - ce.ChunkOffset
	}
	if size > 64<<20 {
		return nil, 0, fmt.Errorf("%w: chunk of %d bytes in %q", ErrInvalidLayer, size, f.name)
	}
	buf := make([]byte, size)
	if _, err := f.sr.ReadAt(buf, ce.ChunkOffset); err != nil && err != io.EOF {
		return nil, 0, err
	}
	v, err := f.l.ver.Verifier(ce)
	if err != nil {
		return nil, 0, fmt.Errorf("%w: %q: %v", ErrDigestMismatch, f.name, err)
	}
	_, _ = v.Write(buf)
	if !v.Verified() {
		return nil, 0, &DigestError{What: fmt.Sprintf("chunk at %d of %q", ce.ChunkOffset, f.name), Want: ce.ChunkDigest, Got: digestOf(buf)}
	}
	f.cOff, f.cData = ce.ChunkOffset, buf
	return buf, ce.ChunkOffset, nil
}

const (
	lazyPage = 256 << 10
	// maxRunPages bounds one range request (and its buffer) to 16 MiB.
	maxRunPages = 64
	// maxLazyBlob bounds the blob size a manifest may claim (1 TiB).
	maxLazyBlob = 1 << 40
)

// rangeBlob is an io.ReaderAt over a registry blob: missing pages are
// fetched with HTTP range requests and kept in a sparse scratch file.
type rangeBlob struct {
	client *http.Client
	url    string
	size   int64
	life   context.Context

	mu   sync.Mutex
	f    *os.File
	have []bool

	requests atomic.Int64
	fetched  atomic.Int64
}

func (b *rangeBlob) close() {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.f != nil {
		discard(b.f)
		b.f = nil
	}
}

// ReadAt implements io.ReaderAt.
func (b *rangeBlob) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, errors.New("image: negative offset")
	}
	if off >= b.size {
		return 0, io.EOF
	}
	end := min(off+int64(len(p)), b.size)
	if err := b.ensure(off, end); err != nil {
		return 0, err
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.f == nil {
		return 0, ErrClosed
	}
	n, err := b.f.ReadAt(p[:end-off], off)
	if err == nil && end-off < int64(len(p)) {
		err = io.EOF
	}
	return n, err
}

// ensure fetches every missing page of [off, end).
func (b *rangeBlob) ensure(off, end int64) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.f == nil {
		return ErrClosed
	}
	first, last := off/lazyPage, (end-1)/lazyPage
	for pg := first; pg <= last; {
		if b.have[pg] {
			pg++
			continue
		}
		run := pg
		for run+1 <= last && !b.have[run+1] && run-pg < maxRunPages-1 {
			run++
		}
		if err := b.fetch(pg, run); err != nil {
			return err
		}
		pg = run + 1
	}
	return nil
}

func (b *rangeBlob) fetch(first, last int64) error {
	start := first * lazyPage
	end := min((last+1)*lazyPage, b.size) // exclusive
	req, err := http.NewRequestWithContext(b.life, http.MethodGet, b.url, nil)
	if err != nil {
		return err
	}
	req.Header.Set("Range", fmt.Sprintf("bytes=%d-%d", start, end-1))
	b.requests.Add(1)
	resp, err := b.client.Do(req)
	if err != nil {
		return fmt.Errorf("image: lazy fetch: %w", err)
	}
	defer resp.Body.Close()
	var body io.Reader = resp.Body
	switch resp.StatusCode {
	case http.StatusPartialContent:
		var s, e, total int64
		if _, err := fmt.Sscanf(resp.Header.Get("Content-Range"), "bytes %d-%d/%d", &s, &e, &total); err != nil || s != start || e != end-1 || total != b.size {
			return fmt.Errorf("%w: registry answered range %q for bytes=%d-%d of a %d-byte blob", ErrInvalidManifest, resp.Header.Get("Content-Range"), start, end-1, b.size)
		}
	case http.StatusOK: // no range support: skip to start
		if _, err := io.CopyN(io.Discard, body, start); err != nil {
			return fmt.Errorf("%w: %v", ErrTruncated, err)
		}
	case http.StatusNotFound:
		return fmt.Errorf("%w: blob %s", ErrNotFound, b.url)
	default:
		return fmt.Errorf("image: lazy fetch %s: HTTP %d", b.url, resp.StatusCode)
	}
	buf := make([]byte, end-start)
	if _, err := io.ReadFull(body, buf); err != nil {
		return fmt.Errorf("%w: range %d-%d: %v", ErrTruncated, start, end-1, err)
	}
	if _, err := b.f.WriteAt(buf, start); err != nil {
		return err
	}
	b.fetched.Add(int64(len(buf)))
	for pg := first; pg <= last; pg++ {
		b.have[pg] = true
	}
	return nil
}

var _ io.ReaderAt = (*rangeBlob)(nil)
var _ io.ReaderAt = (*LazyFile)(nil)
