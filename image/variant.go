package image

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/gosandbox/sandbox/image/squashfs"
	"golang.org/x/sys/unix"
)

// Opaque directories without xattrs.
//
// The default guest kernel has no CONFIG_SQUASHFS_XATTR, so its overlayfs
// never sees trusted.overlay.opaque. A layer with opaque directories
// therefore gets, per image, a variant of its SquashFS image that also holds
// a whiteout for every name the layers below show in each opaque directory
// (opaqueWhiteouts). The variant depends on those layers, so it is named by
// the layer's OCI ChainID: layers/chain/<hex>.sqfs. When nothing below needs
// hiding, an empty marker layers/chain/<hex>.none says so and the layer's
// shared diff_id image is used as is.

func (s *Store) indexPath(diffID string) (string, error) {
	h, err := hexOf(diffID)
	if err != nil {
		return "", err
	}
	return filepath.Join(s.root, "layers", "sha256", h+".idx"), nil
}

// chainPaths returns the variant image and the "no variant needed" marker
// of a chain ID.
func (s *Store) chainPaths(chainID string) (variant, same string, err error) {
	h, err := hexOf(chainID)
	if err != nil {
		return "", "", err
	}
	dir := filepath.Join(s.root, "layers", "chain")
	return filepath.Join(dir, h+".sqfs"), filepath.Join(dir, h+".none"), nil
}

// setChainIDs fills in every layer's ChainID.
func setChainIDs(img *Image) {
	diffs := make([]string, len(img.Layers))
	for i, l := range img.Layers {
		diffs[i] = l.DiffID
	}
	for i, c := range chainIDs(diffs) {
		img.Layers[i].ChainID = c
	}
}

// selectPaths sets ChainID and Path of every layer: the diff_id image, or
// the chain variant for a layer with opaque directories. missing lists the
// positions of layers with opaque directories whose variant (or marker) is
// not in the cache yet. A missing or corrupt index is reported as
// fs.ErrNotExist (the layer must be converted again).
func (s *Store) selectPaths(img *Image) (opaque []int, missing map[int]bool, err error) {
	setChainIDs(img)
	missing = map[int]bool{}
	opaque = make([]int, len(img.Layers))
	for i := range img.Layers {
		l := &img.Layers[i]
		if l.Path, err = s.layerPath(l.DiffID); err != nil {
			return nil, nil, err
		}
		ip, err := s.indexPath(l.DiffID)
		if err != nil {
			return nil, nil, err
		}
		n, err := indexOpaqueCount(ip)
		if err != nil {
			return nil, nil, fmt.Errorf("layer %s: %w", l.DiffID, fs.ErrNotExist)
		}
		opaque[i] = n
		if n == 0 {
			continue
		}
		v, same, err := s.chainPaths(l.ChainID)
		if err != nil {
			return nil, nil, err
		}
		switch {
		case exists(v):
			l.Path = v
		case exists(same):
		default:
			missing[i] = true
		}
	}
	return opaque, missing, nil
}

// makeVariants builds the chain variants img needs and sets every layer's
// ChainID and Path. The caller holds the gc lock shared and has imported
// every layer (blob, diff_id image and index).
func (s *Store) makeVariants(ctx context.Context, img *Image) error {
	opaque, missing, err := s.selectPaths(img)
	if err != nil {
		return err
	}
	if len(missing) == 0 {
		return nil
	}
	open := make([]layerSource, len(img.Layers))
	for i, l := range img.Layers {
		ip, err := s.indexPath(l.DiffID)
		if err != nil {
			return err
		}
		open[i] = func() (io.ReadCloser, error) { return os.Open(ip) }
	}
	wh, err := opaqueWhiteouts(open, opaque, missing)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Join(s.root, "layers", "chain"), 0o755); err != nil {
		return fmt.Errorf("image: create cache directory: %w", err)
	}
	for i := range img.Layers {
		if !missing[i] {
			continue
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := s.buildVariant(ctx, &img.Layers[i], wh[i]); err != nil {
			return err
		}
	}
	_, missing, err = s.selectPaths(img)
	if err != nil {
		return err
	}
	if len(missing) > 0 {
		return fmt.Errorf("image: layer variants missing after building them (was the cache pruned meanwhile?)")
	}
	s.log.DebugContext(ctx, "opaque layer variants", "ref", img.Ref, "layers", len(wh))
	return nil
}

// buildVariant writes the chain variant of layer l (or its marker when
// whiteouts is empty), converting the cached blob again with the extra
// whiteouts. The blob's digest and diff_id are checked again on the way.
func (s *Store) buildVariant(ctx context.Context, l *Layer, whiteouts []string) error {
	v, same, err := s.chainPaths(l.ChainID)
	if err != nil {
		return err
	}
	ch, _ := hexOf(l.ChainID)
	unlock, err := lock(ctx, filepath.Join(s.root, "locks", "chain-"+ch), unix.LOCK_EX)
	if err != nil {
		return err
	}
	defer unlock()
	if exists(v) || exists(same) {
		return nil
	}
	if len(whiteouts) == 0 {
		f, err := s.tempFile("chain-*")
		if err != nil {
			return err
		}
		return commit(f, same)
	}
	blob, err := s.blobPath(l.Digest)
	if err != nil {
		return err
	}
	src, err := os.Open(blob)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("%w: layer blob %s (pull again)", ErrNotPresent, l.Digest)
		}
		return err
	}
	defer src.Close()
	dig := sha256.New()
	in := io.TeeReader(src, dig)
	sq, err := s.tempFile("chain-*.sqfs")
	if err != nil {
		return err
	}
	st, err := convertCompressed(ctx, in, sq, nil, convConfig{
		sq:        []squashfs.Option{squashfs.WithCompressionLevel(s.level)},
		whiteouts: whiteouts,
	})
	if err == nil {
		_, err = io.Copy(io.Discard, in)
	}
	if err != nil {
		discard(sq)
		return fmt.Errorf("layer %s: %w", l.Digest, err)
	}
	if got := "sha256:" + hex.EncodeToString(dig.Sum(nil)); got != l.Digest {
		discard(sq)
		return &DigestError{What: "cached layer " + l.Digest, Want: l.Digest, Got: got}
	}
	if st.DiffID != l.DiffID {
		discard(sq)
		return &DigestError{What: "diff_id of cached layer " + l.Digest, Want: l.DiffID, Got: st.DiffID}
	}
	return commit(sq, v)
}
