package image

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync/atomic"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"golang.org/x/sys/unix"
)

// Store is the content-addressed image cache. Several processes may use the
// same root at once: writers create files under tmp/ and rename them into
// place, per-blob flock(2) locks stop two processes converting the same layer
// twice, and a root lock keeps Prune and Remove from deleting what a
// concurrent Pull or Load is still writing.
//
// Layout under the root:
//
//	blobs/sha256/<hex>          manifests, configs, compressed layers (verified)
//	layers/sha256/<hex>.sqfs    one SquashFS image per layer, by diff_id
//	layers/sha256/<hex>.idx     the layer's index: paths and their kind
//	                            (directory, other, whiteout, opaque marker)
//	layers/chain/<hex>.sqfs     variant of a layer with opaque directories,
//	                            by ChainID: the diff_id image plus whiteouts
//	                            for what the layers below show in them
//	layers/chain/<hex>.none     empty marker: that layer's opaque directories
//	                            hide nothing, its diff_id image is used
//	index.json                  reference -> manifest digest
//	tmp/, locks/, gc.lock       scratch files and lock files
//
// A Store holds no goroutines or open files between calls; its only
// long-lived resource is its HTTP transport's idle connections, which Close
// releases.
type Store struct {
	root      string
	log       *slog.Logger
	transport http.RoundTripper
	ownedRT   *http.Transport // created by Open; idle connections closed by Close
	keychain  authn.Keychain
	jobs      int
	level     int
	closed    atomic.Bool
}

// StoreOption configures a Store.
type StoreOption func(*Store) error

// WithRoot sets the cache directory. The default is
// os.UserCacheDir()/gosandbox/images.
func WithRoot(dir string) StoreOption {
	return func(s *Store) error {
		if dir == "" {
			return errors.New("image: WithRoot: empty directory")
		}
		s.root = dir
		return nil
	}
}

// WithLogger sets the logger for debug messages. The default discards.
func WithLogger(l *slog.Logger) StoreOption {
	return func(s *Store) error {
		if l != nil {
			s.log = l
		}
		return nil
	}
}

// WithTransport sets the HTTP transport used to talk to registries (custom
// CA pool, proxy, test servers). The default is go-containerregistry's
// remote.DefaultTransport.
func WithTransport(rt http.RoundTripper) StoreOption {
	return func(s *Store) error { s.transport = rt; return nil }
}

// WithKeychain sets where registry credentials come from when a Pull gives
// none. The default is authn.DefaultKeychain (Docker config file and its
// credential helpers).
func WithKeychain(k authn.Keychain) StoreOption {
	return func(s *Store) error { s.keychain = k; return nil }
}

// WithJobs sets how many layers are downloaded and converted at once
// (default 4).
func WithJobs(n int) StoreOption {
	return func(s *Store) error {
		if n < 1 {
			return fmt.Errorf("image: WithJobs(%d): need at least 1", n)
		}
		s.jobs = n
		return nil
	}
}

// WithLayerCompression sets the zlib level (1..9) of the SquashFS layer
// images. The default, 1, converts about 1.5x faster than 6 for images
// about 7% larger (measured on a Debian python3 rootfs); conversion is on
// the cold-start path, so speed wins.
func WithLayerCompression(level int) StoreOption {
	return func(s *Store) error {
		if level < 1 || level > 9 {
			return fmt.Errorf("image: WithLayerCompression(%d): want 1..9", level)
		}
		s.level = level
		return nil
	}
}

// Open opens (creating if needed) an image cache.
func Open(opts ...StoreOption) (*Store, error) {
	s := &Store{
		log:      slog.New(slog.DiscardHandler),
		keychain: authn.DefaultKeychain,
		jobs:     4,
		level:    1,
	}
	for _, o := range opts {
		if err := o(s); err != nil {
			return nil, err
		}
	}
	if s.transport == nil {
		if t, ok := remote.DefaultTransport.(*http.Transport); ok {
			s.ownedRT = t.Clone()
			s.transport = s.ownedRT
		} else {
			s.transport = remote.DefaultTransport
		}
	}
	if s.root == "" {
		dir, err := os.UserCacheDir()
		if err != nil {
			return nil, fmt.Errorf("image: no user cache directory (set $XDG_CACHE_HOME or $HOME, or use WithRoot): %w", err)
		}
		s.root = filepath.Join(dir, "gosandbox", "images")
	}
	for _, d := range []string{"blobs/sha256", "layers/sha256", "layers/chain", "tmp", "locks"} {
		if err := os.MkdirAll(filepath.Join(s.root, d), 0o755); err != nil {
			return nil, fmt.Errorf("image: create cache directory: %w", err)
		}
	}
	return s, nil
}

// Root returns the cache directory.
func (s *Store) Root() string { return s.root }

// Close marks the store closed (later calls fail with ErrClosed) and closes
// the idle registry connections of the HTTP transport Open created. It is
// safe to call twice.
func (s *Store) Close() error {
	if s.closed.Swap(true) {
		return nil
	}
	if s.ownedRT != nil {
		s.ownedRT.CloseIdleConnections()
	}
	return nil
}

func (s *Store) check() error {
	if s.closed.Load() {
		return ErrClosed
	}
	return nil
}

// Image is an image in the cache.
type Image struct {
	// Ref is the normalized reference the image was pulled or loaded as
	// ("index.docker.io/library/busybox:latest"); empty when looked up by
	// digest only.
	Ref string
	// Digest is the manifest digest ("sha256:...").
	Digest string
	// Manifest is the parsed image manifest.
	Manifest *v1.Manifest
	// Config is the parsed image config (Entrypoint, Cmd, Env, ...).
	Config *v1.ConfigFile
	// Layers lists the layers, base layer first.
	Layers []Layer
}

// Layer is one layer of a cached image.
type Layer struct {
	// Digest is the digest of the layer blob as stored in the registry.
	Digest string
	// DiffID is the digest of the uncompressed tar.
	DiffID string
	// Size is the blob size in bytes.
	Size int64
	// MediaType is the blob media type.
	MediaType string
	// ChainID is the OCI ChainID of the image's layers up to this one
	// (base first); it names this layer's variant image.
	ChainID string
	// Path is the SquashFS image of this layer; attach it read-only as a
	// block device (see the package doc). It is the layer's shared image
	// (layers/sha256/<diff_id>.sqfs) or, for a layer with opaque
	// directories that hide something below, its variant for this stack
	// of layers (layers/chain/<ChainID>.sqfs).
	Path string
}

// LayerPaths returns the SquashFS images top layer first, the order
// overlayfs wants for lowerdir. Opaque directories in them work without
// the trusted.overlay.opaque xattr (see the package doc).
func (img *Image) LayerPaths() []string {
	out := make([]string, 0, len(img.Layers))
	for i := len(img.Layers) - 1; i >= 0; i-- {
		out = append(out, img.Layers[i].Path)
	}
	return out
}

func hexOf(d string) (string, error) {
	h, ok := strings.CutPrefix(d, "sha256:")
	if !ok || len(h) != 64 {
		return "", fmt.Errorf("%w: unsupported digest %q (only sha256)", ErrInvalidManifest, d)
	}
	if _, err := hex.DecodeString(h); err != nil || strings.ToLower(h) != h {
		return "", fmt.Errorf("%w: malformed digest %q", ErrInvalidManifest, d)
	}
	return h, nil
}

func (s *Store) blobPath(d string) (string, error) {
	h, err := hexOf(d)
	if err != nil {
		return "", err
	}
	return filepath.Join(s.root, "blobs", "sha256", h), nil
}

func (s *Store) layerPath(diffID string) (string, error) {
	h, err := hexOf(diffID)
	if err != nil {
		return "", err
	}
	return filepath.Join(s.root, "layers", "sha256", h+".sqfs"), nil
}

func exists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// lock takes a flock(2) lock on path, polling so that ctx can cancel the
// wait. The returned function releases it.
func lock(ctx context.Context, path string, how int) (func(), error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, fmt.Errorf("image: lock %s: %w", path, err)
	}
	delay := time.Millisecond
	for {
		err := unix.Flock(int(f.Fd()), how|unix.LOCK_NB)
		if err == nil {
			return func() { _ = f.Close() }, nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) && !errors.Is(err, unix.EINTR) {
			_ = f.Close()
			return nil, fmt.Errorf("image: lock %s: %w", path, err)
		}
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			_ = f.Close()
			return nil, ctx.Err()
		case <-t.C:
		}
		if delay < 100*time.Millisecond {
			delay *= 2
		}
	}
}

// gcLock is held shared by writers and exclusive by Prune/Remove.
func (s *Store) gcLock(ctx context.Context, exclusive bool) (func(), error) {
	how := unix.LOCK_SH
	if exclusive {
		how = unix.LOCK_EX
	}
	return lock(ctx, filepath.Join(s.root, "gc.lock"), how)
}

// tempFile creates a scratch file in the cache's tmp directory (same file
// system as its final place, so rename is atomic).
func (s *Store) tempFile(pattern string) (*os.File, error) {
	return os.CreateTemp(filepath.Join(s.root, "tmp"), pattern)
}

// commit syncs f and renames it to dst, or removes it.
func commit(f *os.File, dst string) error {
	if err := syncFile(f); err != nil {
		_ = f.Close()
		_ = os.Remove(f.Name())
		return err
	}
	if err := f.Close(); err != nil {
		_ = os.Remove(f.Name())
		return err
	}
	if err := os.Rename(f.Name(), dst); err != nil {
		_ = os.Remove(f.Name())
		return err
	}
	return nil
}

func discard(f *os.File) {
	_ = f.Close()
	_ = os.Remove(f.Name())
}

// putBlob stores small verified content (manifest, config) by digest.
func (s *Store) putBlob(d string, data []byte) error {
	p, err := s.blobPath(d)
	if err != nil {
		return err
	}
	if got := digestOf(data); got != d {
		return &DigestError{What: "blob", Want: d, Got: got}
	}
	if exists(p) {
		return nil
	}
	f, err := s.tempFile("blob-*")
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		discard(f)
		return err
	}
	return commit(f, p)
}

func digestOf(b []byte) string {
	sum := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(sum[:])
}

const maxMetaBlob = 4 << 20

// readBlob reads a small blob (manifest, config) and checks its digest.
func (s *Store) readBlob(d string) ([]byte, error) {
	p, err := s.blobPath(d)
	if err != nil {
		return nil, err
	}
	f, err := os.Open(p)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxMetaBlob+1))
	if err != nil {
		return nil, err
	}
	if len(b) > maxMetaBlob {
		return nil, fmt.Errorf("%w: blob %s larger than %d bytes", ErrInvalidManifest, d, maxMetaBlob)
	}
	if got := digestOf(b); got != d {
		return nil, &DigestError{What: "cached blob", Want: d, Got: got}
	}
	return b, nil
}

// index maps references to manifest digests.
type index struct {
	Refs map[string]indexEntry `json:"refs"`
}

type indexEntry struct {
	Digest string    `json:"digest"`
	Time   time.Time `json:"time"`
}

func (s *Store) readIndex() (*index, error) {
	ix := &index{Refs: map[string]indexEntry{}}
	b, err := os.ReadFile(filepath.Join(s.root, "index.json"))
	if errors.Is(err, fs.ErrNotExist) {
		return ix, nil
	}
	if err != nil {
		return nil, err
	}
	if err := json.Unmarshal(b, ix); err != nil {
		return nil, fmt.Errorf("image: cache index %s is corrupt (remove it and pull again): %w", filepath.Join(s.root, "index.json"), err)
	}
	if ix.Refs == nil {
		ix.Refs = map[string]indexEntry{}
	}
	return ix, nil
}

// updateIndex applies fn to the index under an exclusive lock and writes it
// back atomically.
func (s *Store) updateIndex(ctx context.Context, fn func(*index) error) error {
	unlock, err := lock(ctx, filepath.Join(s.root, "index.lock"), unix.LOCK_EX)
	if err != nil {
		return err
	}
	defer unlock()
	ix, err := s.readIndex()
	if err != nil {
		return err
	}
	if err := fn(ix); err != nil {
		return err
	}
	b, err := json.MarshalIndent(ix, "", "  ")
	if err != nil {
		return err
	}
	f, err := s.tempFile("index-*")
	if err != nil {
		return err
	}
	if _, err := f.Write(b); err != nil {
		discard(f)
		return err
	}
	return commit(f, filepath.Join(s.root, "index.json"))
}

// imageByDigest assembles an Image from cached blobs; ok is false when
// something is missing.
func (s *Store) imageByDigest(ref, d string) (*Image, bool, error) {
	mb, err := s.readBlob(d)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, err
	}
	m, err := v1.ParseManifest(strings.NewReader(string(mb)))
	if err != nil {
		return nil, false, fmt.Errorf("%w: manifest %s: %v", ErrInvalidManifest, d, err)
	}
	cb, err := s.readBlob(m.Config.Digest.String())
	if errors.Is(err, fs.ErrNotExist) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, err
	}
	cfg, err := v1.ParseConfigFile(strings.NewReader(string(cb)))
	if err != nil {
		return nil, false, fmt.Errorf("%w: config %s: %v", ErrInvalidManifest, m.Config.Digest, err)
	}
	img, err := assemble(ref, d, m, cfg)
	if err != nil {
		return nil, false, err
	}
	for i := range img.Layers {
		l := &img.Layers[i]
		if l.Path, err = s.layerPath(l.DiffID); err != nil {
			return nil, false, err
		}
		bp, err := s.blobPath(l.Digest)
		if err != nil {
			return nil, false, err
		}
		if !exists(l.Path) || !exists(bp) {
			return img, false, nil
		}
	}
	_, missing, err := s.selectPaths(img)
	if errors.Is(err, fs.ErrNotExist) || err == nil && len(missing) > 0 {
		return img, false, nil
	}
	if err != nil {
		return nil, false, err
	}
	return img, true, nil
}

func assemble(ref, d string, m *v1.Manifest, cfg *v1.ConfigFile) (*Image, error) {
	if len(m.Layers) != len(cfg.RootFS.DiffIDs) {
		return nil, fmt.Errorf("%w: manifest has %d layers but config lists %d diff_ids", ErrInvalidManifest, len(m.Layers), len(cfg.RootFS.DiffIDs))
	}
	img := &Image{Ref: ref, Digest: d, Manifest: m, Config: cfg}
	for i, l := range m.Layers {
		if _, err := hexOf(l.Digest.String()); err != nil {
			return nil, err
		}
		if _, err := hexOf(cfg.RootFS.DiffIDs[i].String()); err != nil {
			return nil, err
		}
		if l.Size < 0 {
			return nil, fmt.Errorf("%w: layer %s has negative size", ErrInvalidManifest, l.Digest)
		}
		img.Layers = append(img.Layers, Layer{
			Digest:    l.Digest.String(),
			DiffID:    cfg.RootFS.DiffIDs[i].String(),
			Size:      l.Size,
			MediaType: string(l.MediaType),
		})
	}
	return img, nil
}

// Get returns a cached image by reference (as given to Pull or Load) or by
// manifest digest. It fails with ErrNotPresent if the image or any of its
// layers is missing.
func (s *Store) Get(ctx context.Context, ref string) (*Image, error) {
	if err := s.check(); err != nil {
		return nil, err
	}
	key, err := normalizeRef(ref, false)
	if err != nil {
		return nil, err
	}
	return s.get(key)
}

func (s *Store) get(key string) (*Image, error) {
	d := ""
	if strings.HasPrefix(key, "sha256:") {
		d = key
		key = ""
	} else if i := strings.Index(key, "@"); i >= 0 {
		d = key[i+1:]
	} else {
		ix, err := s.readIndex()
		if err != nil {
			return nil, err
		}
		e, ok := ix.Refs[key]
		if !ok {
			return nil, fmt.Errorf("%w: %s", ErrNotPresent, key)
		}
		d = e.Digest
	}
	img, ok, err := s.imageByDigest(key, d)
	if err != nil {
		return nil, err
	}
	if !ok {
		return nil, fmt.Errorf("%w: %s (some content is missing)", ErrNotPresent, key)
	}
	return img, nil
}

// Summary describes one cached reference.
type Summary struct {
	// Ref is the normalized reference.
	Ref string
	// Digest is the manifest digest.
	Digest string
	// Time is when the reference was last pulled or loaded.
	Time time.Time
	// Size is the total of the layer blobs and their SquashFS images on
	// disk, in bytes (shared layers are counted in every image).
	Size int64
}

// List returns the cached references, sorted.
func (s *Store) List(ctx context.Context) ([]Summary, error) {
	if err := s.check(); err != nil {
		return nil, err
	}
	ix, err := s.readIndex()
	if err != nil {
		return nil, err
	}
	var out []Summary
	for ref, e := range ix.Refs {
		sum := Summary{Ref: ref, Digest: e.Digest, Time: e.Time}
		if img, _, err := s.imageByDigest(ref, e.Digest); err == nil && img != nil {
			for _, l := range img.Layers {
				if fi, err := os.Stat(l.Path); err == nil {
					sum.Size += fi.Size()
				}
				if bp, err := s.blobPath(l.Digest); err == nil {
					if fi, err := os.Stat(bp); err == nil {
						sum.Size += fi.Size()
					}
				}
			}
		}
		out = append(out, sum)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Ref < out[j].Ref })
	return out, nil
}

// Remove forgets a reference. Its blobs, layer images, layer indexes and
// chain variants stay until Prune (another reference may share them).
func (s *Store) Remove(ctx context.Context, ref string) error {
	if err := s.check(); err != nil {
		return err
	}
	key, err := normalizeRef(ref, false)
	if err != nil {
		return err
	}
	unlock, err := s.gcLock(ctx, true)
	if err != nil {
		return err
	}
	defer unlock()
	return s.updateIndex(ctx, func(ix *index) error {
		if _, ok := ix.Refs[key]; !ok {
			return fmt.Errorf("%w: %s", ErrNotPresent, key)
		}
		delete(ix.Refs, key)
		return nil
	})
}

// PruneReport says what Prune deleted.
type PruneReport struct {
	// Files is the number of blobs, layer images, layer indexes, chain
	// variants and stale scratch files removed.
	Files int
	// Bytes is their total size.
	Bytes int64
}

// Prune deletes every blob, layer image, layer index and chain variant no
// reference uses, and scratch files older than an hour (left by crashed
// processes). It waits for
// running Pulls and Loads (in any process) to finish first.
func (s *Store) Prune(ctx context.Context) (PruneReport, error) {
	var rep PruneReport
	if err := s.check(); err != nil {
		return rep, err
	}
	unlock, err := s.gcLock(ctx, true)
	if err != nil {
		return rep, err
	}
	defer unlock()
	ix, err := s.readIndex()
	if err != nil {
		return rep, err
	}
	keepBlobs := map[string]bool{}
	keepLayers := map[string]bool{}
	keepChains := map[string]bool{}
	for ref, e := range ix.Refs {
		h, err := hexOf(e.Digest)
		if err != nil {
			continue
		}
		keepBlobs[h] = true
		img, _, err := s.imageByDigest(ref, e.Digest)
		if err != nil || img == nil {
			continue
		}
		if h, err := hexOf(img.Manifest.Config.Digest.String()); err == nil {
			keepBlobs[h] = true
		}
		setChainIDs(img)
		for _, l := range img.Layers {
			lh, _ := hexOf(l.Digest)
			dh, _ := hexOf(l.DiffID)
			ch, _ := hexOf(l.ChainID)
			keepBlobs[lh] = true
			keepLayers[dh+".sqfs"] = true
			keepLayers[dh+".idx"] = true
			keepChains[ch+".sqfs"] = true
			keepChains[ch+".none"] = true
		}
	}
	sweep := func(dir string, keep func(string) bool) error {
		ents, err := os.ReadDir(dir)
		if err != nil {
			return err
		}
		for _, e := range ents {
			if keep(e.Name()) {
				continue
			}
			p := filepath.Join(dir, e.Name())
			fi, err := os.Lstat(p)
			if err != nil {
				continue
			}
			if err := os.Remove(p); err == nil {
				rep.Files++
				rep.Bytes += fi.Size()
			}
		}
		return nil
	}
	if err := sweep(filepath.Join(s.root, "blobs", "sha256"), func(n string) bool { return keepBlobs[n] }); err != nil {
		return rep, err
	}
	if err := sweep(filepath.Join(s.root, "layers", "sha256"), func(n string) bool { return keepLayers[n] }); err != nil {
		return rep, err
	}
	if err := sweep(filepath.Join(s.root, "layers", "chain"), func(n string) bool { return keepChains[n] }); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return rep, err
	}
	cutoff := time.Now().Add(-time.Hour)
	err = sweep(filepath.Join(s.root, "tmp"), func(n string) bool {
		fi, err := os.Stat(filepath.Join(s.root, "tmp", n))
		return err == nil && fi.ModTime().After(cutoff)
	})
	return rep, err
}

// Command applies the image config and overrides (see CommandFor).
func (img *Image) Command(ov Overrides) (Command, error) {
	if img.Config == nil {
		return CommandFor(nil, ov)
	}
	return CommandFor(&img.Config.Config, ov)
}

// Verify re-checks a cached image: every layer blob must hash to its digest,
// every layer image (chain variants included) must be a SquashFS file and
// every layer index must pass its checksum. It reports the first problem as
// a *DigestError, ErrNotPresent or ErrInvalidLayer; Remove and pull again
// to repair.
func (s *Store) Verify(ctx context.Context, ref string) error {
	img, err := s.Get(ctx, ref)
	if err != nil {
		return err
	}
	for _, l := range img.Layers {
		if err := ctx.Err(); err != nil {
			return err
		}
		bp, err := s.blobPath(l.Digest)
		if err != nil {
			return err
		}
		f, err := os.Open(bp)
		if err != nil {
			return fmt.Errorf("%w: layer blob %s: %v", ErrNotPresent, l.Digest, err)
		}
		got, _, err := hashReader(f)
		_ = f.Close()
		if err != nil {
			return err
		}
		if got != l.Digest {
			return &DigestError{What: "cached layer " + l.Digest, Want: l.Digest, Got: got}
		}
		lf, err := os.Open(l.Path)
		if err != nil {
			return fmt.Errorf("%w: layer image %s: %v", ErrNotPresent, l.Path, err)
		}
		var magic [4]byte
		_, err = io.ReadFull(lf, magic[:])
		_ = lf.Close()
		if err != nil || string(magic[:]) != "hsqs" {
			return fmt.Errorf("%w: %s is not a SquashFS image (remove the image and pull again)", ErrInvalidLayer, l.Path)
		}
		ip, err := s.indexPath(l.DiffID)
		if err != nil {
			return err
		}
		xf, err := os.Open(ip)
		if err != nil {
			return fmt.Errorf("%w: layer index %s: %v", ErrNotPresent, ip, err)
		}
		err = readIndex(xf, func(byte, string) error { return nil })
		_ = xf.Close()
		if err != nil {
			return fmt.Errorf("%s: %w", ip, err)
		}
	}
	return nil
}

var syncFile = func(f *os.File) error { return f.Sync() }
