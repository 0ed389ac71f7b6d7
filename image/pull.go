package image

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"

	"io"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
	"github.com/gosandbox/sandbox/image/squashfs"
	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
	"golang.org/x/sys/unix"
)

// PullPolicy says when Pull contacts the registry.
type PullPolicy int

const (
	// PullIfMissing uses the cached image when the reference and all its
	// layers are present, and pulls otherwise. It is the default.
	PullIfMissing PullPolicy = iota
	// PullAlways resolves the reference at the registry every time
	// (layers already cached are not downloaded again).
	PullAlways
	// PullNever uses only the cache and fails with ErrNotPresent.
	PullNever
)

func (p PullPolicy) String() string {
	switch p {
	case PullIfMissing:
		return "if-missing"
	case PullAlways:
		return "always"
	case PullNever:
		return "never"
	}
	return fmt.Sprintf("PullPolicy(%d)", int(p))
}

// Progress reports one layer's download. Done and Total are bytes of the
// compressed blob; Total is 0 when unknown. Cached is true when the layer
// was already present and nothing was downloaded.
type Progress struct {
	Ref    string
	Layer  string // blob digest
	Done   int64
	Total  int64
	Cached bool
}

// PullOption configures one Pull.
type PullOption func(*pullOptions) error

type pullOptions struct {
	policy   PullPolicy
	auth     authn.Authenticator
	insecure bool
	progress func(Progress)
	platform v1.Platform
}

// WithPolicy sets the pull policy (default PullIfMissing).
func WithPolicy(p PullPolicy) PullOption {
	return func(o *pullOptions) error {
		if p < PullIfMissing || p > PullNever {
			return fmt.Errorf("image: unknown pull policy %d", int(p))
		}
		o.policy = p
		return nil
	}
}

// WithCredentials authenticates with a user name and password (or token)
// instead of the Store's keychain.
func WithCredentials(username, password string) PullOption {
	return func(o *pullOptions) error {
		o.auth = &authn.Basic{Username: username, Password: password}
		return nil
	}
}

// WithAuth authenticates with any go-containerregistry authenticator
// (bearer tokens, ...).
func WithAuth(a authn.Authenticator) PullOption {
	return func(o *pullOptions) error { o.auth = a; return nil }
}

// WithInsecure allows plain HTTP and unverified TLS for this pull's
// registry. Only set it for registries you control (loopback, lab).
func WithInsecure() PullOption {
	return func(o *pullOptions) error { o.insecure = true; return nil }
}

// WithProgress receives per-layer download progress. Calls are serialized
// (never concurrent), so fn may draw without locking; it must not block
// for long.
func WithProgress(fn func(Progress)) PullOption {
	return func(o *pullOptions) error { o.progress = fn; return nil }
}

// normalizeRef parses ref and returns its canonical form
// ("index.docker.io/library/busybox:latest", "host/repo@sha256:...").
// A bare "sha256:..." digest is returned as is.
func normalizeRef(ref string, insecure bool) (string, error) {
	if _, err := hexOf(ref); err == nil {
		return ref, nil
	}
	r, err := parseRef(ref, insecure)
	if err != nil {
		return "", err
	}
	return r.Name(), nil
}

func parseRef(ref string, insecure bool) (name.Reference, error) {
	var opts []name.Option
	if insecure {
		opts = append(opts, name.Insecure)
	}
	r, err := name.ParseReference(ref, opts...)
	if err != nil {
		return nil, fmt.Errorf("%w: %q: %v", ErrInvalidReference, ref, err)
	}
	return r, nil
}

// Pull makes the image ref available in the cache and returns it: resolves
// a multi-platform index to linux/amd64, downloads the layers in parallel,
// verifies each against its digest and the config's diff_id, and converts
// each to a SquashFS image once (cached by diff_id).
func (s *Store) Pull(ctx context.Context, ref string, opts ...PullOption) (*Image, error) {
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
	if o.policy != PullAlways {
		img, err := s.get(key)
		if err == nil {
			return img, nil
		}
		if !errors.Is(err, ErrNotPresent) {
			return nil, err
		}
		if o.policy == PullNever {
			return nil, err
		}
	}

	unlock, err := s.gcLock(ctx, false)
	if err != nil {
		return nil, err
	}
	defer unlock()

	ropts := []remote.Option{
		remote.WithContext(ctx),
		remote.WithPlatform(o.platform),
		remote.WithUserAgent("gosandbox"),
	}
	if o.auth != nil {
		ropts = append(ropts, remote.WithAuth(o.auth))
	} else {
		ropts = append(ropts, remote.WithAuthFromKeychain(s.keychain))
	}
	rt := s.transport
	if o.insecure {
		if t, ok := rt.(*http.Transport); ok {
			t = t.Clone()
			if t.TLSClientConfig == nil {
				t.TLSClientConfig = &tls.Config{}
			}
			t.TLSClientConfig.InsecureSkipVerify = true //nolint:gosec // only when asked
			rt = t
		}
	}
	ropts = append(ropts, remote.WithTransport(rt))

	desc, err := remote.Get(r, ropts...)
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
	if len(rawManifest) > maxMetaBlob {
		return nil, fmt.Errorf("%w: manifest larger than %d bytes", ErrInvalidManifest, maxMetaBlob)
	}
	mdigest := digestOf(rawManifest)
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
	img, err := assemble(key, mdigest, m, cfg)
	if err != nil {
		return nil, err
	}

	fetch := func(ctx context.Context, l *Layer) (io.ReadCloser, error) {
		h, err := v1.NewHash(l.Digest)
		if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrInvalidManifest, err)
		}
		rl, err := rimg.LayerByDigest(h)
		if err != nil {
			return nil, remoteErr(key, err)
		}
		rc, err := rl.Compressed()
		if err != nil {
			return nil, remoteErr(key, err)
		}
		return rc, nil
	}
	if err := s.importLayers(ctx, key, img, o.progress, fetch); err != nil {
		return nil, err
	}
	if err := s.putBlob(m.Config.Digest.String(), rawConfig); err != nil {
		return nil, err
	}
	if err := s.putBlob(mdigest, rawManifest); err != nil {
		return nil, err
	}
	if err := s.updateIndex(ctx, func(ix *index) error {
		ix.Refs[key] = indexEntry{Digest: mdigest, Time: time.Now().UTC()}
		return nil
	}); err != nil {
		return nil, err
	}
	s.log.DebugContext(ctx, "image pulled", "ref", key, "digest", mdigest, "layers", len(img.Layers))
	return img, nil
}

func remoteErr(ref string, err error) error {
	var te *transport.Error
	if errors.As(err, &te) {
		for _, d := range te.Errors {
			switch d.Code {
			case transport.ManifestUnknownErrorCode, transport.NameUnknownErrorCode, transport.BlobUnknownErrorCode:
				return fmt.Errorf("%w: %s: %v", ErrNotFound, ref, err)
			}
		}
		if te.StatusCode == http.StatusNotFound {
			return fmt.Errorf("%w: %s: %v", ErrNotFound, ref, err)
		}
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	if s := err.Error(); bytes.Contains([]byte(s), []byte("no child with platform")) {
		return fmt.Errorf("%w: %s has no linux/amd64 image: %v", ErrNotFound, ref, err)
	}
	return fmt.Errorf("image: pull %s: %w", ref, err)
}

// importLayers makes sure every layer's blob, SquashFS image and index are
// in the cache, fetching missing ones with fetch, s.jobs at a time, and then
// that every layer with opaque directories has its variant for this image
// (makeVariants), which sets the layers' ChainID and Path.
func (s *Store) importLayers(ctx context.Context, ref string, img *Image, progress func(Progress), fetch func(context.Context, *Layer) (io.ReadCloser, error)) error {
	var pmu sync.Mutex
	report := func(p Progress) {
		if progress == nil {
			return
		}
		pmu.Lock()
		defer pmu.Unlock()
		p.Ref = ref
		progress(p)
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	sem := make(chan struct{}, s.jobs)
	var wg sync.WaitGroup
	var emu sync.Mutex
	var first error
	for i := range img.Layers {
		l := &img.Layers[i]
		var err error
		if l.Path, err = s.layerPath(l.DiffID); err != nil {
			return err
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			select {
			case sem <- struct{}{}:
			case <-ctx.Done():
				return
			}
			defer func() { <-sem }()
			if err := s.importLayer(ctx, l, report, fetch); err != nil {
				emu.Lock()
				if first == nil {
					first = err
					cancel()
				}
				emu.Unlock()
			}
		}()
	}
	wg.Wait()
	if first != nil {
		return first
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	return s.makeVariants(ctx, img)
}

func (s *Store) importLayer(ctx context.Context, l *Layer, report func(Progress), fetch func(context.Context, *Layer) (io.ReadCloser, error)) error {
	blob, err := s.blobPath(l.Digest)
	if err != nil {
		return err
	}
	idx, err := s.indexPath(l.DiffID)
	if err != nil {
		return err
	}
	cached := func() bool {
		if !exists(blob) || !exists(l.Path) {
			return false
		}
		// The whole index is read (about 12 bytes per entry), so a damaged
		// one is rebuilt from the blob rather than failing makeVariants.
		f, err := os.Open(idx)
		if err != nil {
			return false
		}
		defer f.Close()
		return readIndex(f, func(byte, string) error { return nil }) == nil
	}
	if cached() {
		report(Progress{Layer: l.Digest, Done: l.Size, Total: l.Size, Cached: true})
		return nil
	}
	dh, _ := hexOf(l.DiffID)
	unlock, err := lock(ctx, filepath.Join(s.root, "locks", dh), unix.LOCK_EX)
	if err != nil {
		return err
	}
	defer unlock()
	if cached() { // another process finished it
		report(Progress{Layer: l.Digest, Done: l.Size, Total: l.Size, Cached: true})
		return nil
	}

	var src io.ReadCloser
	fromCache := exists(blob)
	if fromCache {
		src, err = os.Open(blob)
	} else {
		src, err = fetch(ctx, l)
	}
	if err != nil {
		return err
	}
	defer src.Close()

	var blobTmp *os.File
	var in io.Reader = src
	pr := &progressReader{r: src, report: report, p: Progress{Layer: l.Digest, Total: l.Size}}
	in = pr
	dig := sha256.New()
	in = io.TeeReader(in, dig)
	if !fromCache {
		if blobTmp, err = s.tempFile("blob-*"); err != nil {
			return err
		}
		defer func() {
			if blobTmp != nil {
				discard(blobTmp)
			}
		}()
		in = io.TeeReader(in, blobTmp)
	}
	sq, err := s.tempFile("layer-*.sqfs")
	if err != nil {
		return err
	}
	sqDone := false
	defer func() {
		if !sqDone {
			discard(sq)
		}
	}()
	ix, err := s.tempFile("index-*")
	if err != nil {
		return err
	}
	ixDone := false
	defer func() {
		if !ixDone {
			discard(ix)
		}
	}()

	abort := func() { _ = src.Close() } // unblocks a stalled download when conversion fails
	st, convErr := convertCompressed(ctx, in, sq, abort, convConfig{
		sq:    []squashfs.Option{squashfs.WithCompressionLevel(s.level)},
		index: ix,
	})
	// Read what the converter left (compressed trailers) so the digest
	// covers the whole blob.
	if convErr == nil {
		if _, err := io.Copy(io.Discard, in); err != nil {
			convErr = err
		}
	}
	got := "sha256:" + hex.EncodeToString(dig.Sum(nil))
	if got != l.Digest && (convErr == nil || pr.n >= l.Size) {
		// A short or corrupt blob often fails in decompression first;
		// report the digest, which is the root cause.
		return &DigestError{What: "layer " + l.Digest, Want: l.Digest, Got: got}
	}
	if convErr != nil {
		if errors.Is(convErr, io.ErrUnexpectedEOF) {
			return fmt.Errorf("%w: layer %s: %v", ErrTruncated, l.Digest, convErr)
		}
		return fmt.Errorf("layer %s: %w", l.Digest, convErr)
	}
	if l.Size > 0 && pr.n != l.Size {
		return fmt.Errorf("%w: layer %s is %d bytes, manifest says %d", ErrInvalidManifest, l.Digest, pr.n, l.Size)
	}
	if st.DiffID != l.DiffID {
		return &DigestError{What: "diff_id of layer " + l.Digest, Want: l.DiffID, Got: st.DiffID}
	}
	if blobTmp != nil {
		f := blobTmp
		blobTmp = nil
		if err := commit(f, blob); err != nil {
			return err
		}
	}
	ixDone = true
	if err := commit(ix, idx); err != nil {
		return err
	}
	sqDone = true
	if err := commit(sq, l.Path); err != nil {
		return err
	}
	pr.flush()
	return nil
}

type progressReader struct {
	r      io.Reader
	report func(Progress)
	p      Progress
	n      int64
	last   int64
}

func (p *progressReader) Read(b []byte) (int, error) {
	n, err := p.r.Read(b)
	p.n += int64(n)
	if p.n-p.last >= 1<<20 {
		p.flush()
	}
	return n, err
}

func (p *progressReader) flush() {
	p.last = p.n
	p.p.Done = p.n
	p.report(p.p)
}

// convertCompressed detects gzip, zstd or plain tar by magic number and
// converts the layer.
func convertCompressed(ctx context.Context, r io.Reader, out io.WriterAt, abort func(), cc convConfig) (LayerStats, error) {
	br := bufio.NewReaderSize(r, 64<<10)
	magic, _ := br.Peek(4)
	switch {
	case len(magic) >= 2 && magic[0] == 0x1f && magic[1] == 0x8b:
		zr, err := gzip.NewReader(br)
		if err != nil {
			return LayerStats{}, fmt.Errorf("%w: gzip: %v", ErrInvalidLayer, err)
		}
		defer zr.Close()
		pr, stop := decouple(zr)
		st, err := convertLayer(ctx, pr, out, cc)
		if err != nil && abort != nil {
			abort()
		}
		if serr := stop(); err == nil && serr != nil {
			err = serr
		}
		if err == nil {
			_, err = io.Copy(io.Discard, br)
		}
		return st, decompErr(err)
	case len(magic) == 4 && bytes.Equal(magic, []byte{0x28, 0xb5, 0x2f, 0xfd}):
		zr, err := zstd.NewReader(br, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxMemory(1<<30))
		if err != nil {
			return LayerStats{}, fmt.Errorf("%w: zstd: %v", ErrInvalidLayer, err)
		}
		defer zr.Close()
		pr, stop := decouple(zr)
		st, err := convertLayer(ctx, pr, out, cc)
		if err != nil && abort != nil {
			abort()
		}
		if serr := stop(); err == nil && serr != nil {
			err = serr
		}
		return st, decompErr(err)
	default:
		return convertLayer(ctx, br, out, cc)
	}
}

var errStopped = errors.New("image: reader stopped")

// decouple reads r (download, hashing, decompression) in its own goroutine
// so that it overlaps with conversion. stop closes the pipe, waits for the
// goroutine and returns its error (nil if it reached EOF or was stopped).
func decouple(r io.Reader) (io.Reader, func() error) {
	pr, pw := io.Pipe()
	done := make(chan error, 1)
	go func() {
		buf := make([]byte, 256<<10)
		_, err := io.CopyBuffer(pw, r, buf)
		pw.CloseWithError(err)
		done <- err
	}()
	return pr, func() error {
		pr.CloseWithError(errStopped)
		err := <-done
		if errors.Is(err, errStopped) || errors.Is(err, io.ErrClosedPipe) {
			return nil
		}
		return err
	}
}

func decompErr(err error) error {
	if err == nil {
		return nil
	}
	switch {
	case errors.Is(err, gzip.ErrChecksum), errors.Is(err, gzip.ErrHeader):
		return fmt.Errorf("%w: %v", ErrInvalidLayer, err)
	case errors.Is(err, io.ErrUnexpectedEOF):
		return fmt.Errorf("%w: %v", ErrTruncated, err)
	}
	return err
}
