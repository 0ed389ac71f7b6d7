package image

import (
	"errors"
	"fmt"
)

// Sentinel errors. Every error this package returns for one of these causes
// wraps the sentinel, so callers test with errors.Is; *LayerError and
// *DigestError add detail for errors.As.
var (
	// ErrNotPresent means the image is not in the cache and the pull
	// policy is PullNever. Pull it first (PullIfMissing) or load it from
	// a tarball with Store.Load.
	ErrNotPresent = errors.New("image: not in the local cache and pull policy is never")
	// ErrNotFound means the registry or archive has no such image, or the
	// index has no linux/amd64 entry.
	ErrNotFound = errors.New("image: not found")
	// ErrDigestMismatch means downloaded or loaded content does not hash to
	// the digest its manifest or config promised. The content is
	// discarded; retry, and if it persists the registry or archive is
	// corrupt or tampered with.
	ErrDigestMismatch = errors.New("image: content does not match its digest")
	// ErrUnsafePath means a layer entry has an absolute path or a ".."
	// component. Such layers are rejected whole; nothing is written.
	ErrUnsafePath = errors.New("image: unsafe path in layer")
	// ErrLinkEscape means a hard link points outside the layer, at a path
	// not yet in the layer, or at a directory; or an entry's path goes
	// through a symlink or a non-directory.
	ErrLinkEscape = errors.New("image: link escapes the layer")
	// ErrDuplicateEntry means a layer lists the same non-directory path
	// twice, or both a file and its whiteout.
	ErrDuplicateEntry = errors.New("image: duplicate entry in layer")
	// ErrTruncated means a layer, blob or archive ended early.
	ErrTruncated = errors.New("image: truncated stream")
	// ErrInvalidLayer means a layer tar is malformed or exceeds a limit
	// (header size, name length, entry count, xattr size, unsupported
	// entry type).
	ErrInvalidLayer = errors.New("image: invalid layer")
	// ErrInvalidManifest means a manifest, index, config or archive
	// metadata file is malformed, unsupported or exceeds a size limit.
	ErrInvalidManifest = errors.New("image: invalid manifest")
	// ErrInvalidReference means an image reference could not be parsed.
	ErrInvalidReference = errors.New("image: invalid reference")
	// ErrNoCommand means neither the image nor the overrides give a
	// command to run: set Cmd or Entrypoint.
	ErrNoCommand = errors.New("image: no command: the image has no Entrypoint or Cmd and none was given")
	// ErrClosed means the Store was used after Close.
	ErrClosed = errors.New("image: store is closed")
)

// LayerError reports which layer entry was rejected and why. It wraps one
// of the sentinels above (ErrUnsafePath, ErrLinkEscape, ...).
type LayerError struct {
	// Path is the entry name as it appeared in the tar (may be hostile;
	// quote it when printing).
	Path string
	// Err is the cause.
	Err error
}

func (e *LayerError) Error() string { return fmt.Sprintf("layer entry %q: %v", e.Path, e.Err) }

// Unwrap returns the cause.
func (e *LayerError) Unwrap() error { return e.Err }

// DigestError reports a digest mismatch. It matches ErrDigestMismatch.
type DigestError struct {
	// What names the object: "layer", "config", "manifest", "diff_id".
	What string
	// Want is the promised digest, Got the computed one.
	Want, Got string
}

func (e *DigestError) Error() string {
	return fmt.Sprintf("image: %s digest mismatch: want %s, got %s (the content was discarded; the source is corrupt or was tampered with)", e.What, e.Want, e.Got)
}

// Is makes errors.Is(err, ErrDigestMismatch) true.
func (e *DigestError) Is(target error) bool { return target == ErrDigestMismatch }
