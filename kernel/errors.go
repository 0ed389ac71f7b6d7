package kernel

import (
	"errors"
	"fmt"
	"strings"
)

var (
	// ErrKernelNotFound reports that the default kernel is in no local
	// cache and no configured source could provide it.
	ErrKernelNotFound = errors.New("default guest kernel not found")
	// ErrChecksum is matched by every *ChecksumError.
	ErrChecksum = errors.New("kernel module checksum mismatch")
	// ErrDownload is matched by every *DownloadError.
	ErrDownload = errors.New("kernel module download failed")
)

// ChecksumError reports module files whose h1: hash differs from the pinned
// one: a corrupt or tampered module cache entry or proxy response. It
// matches ErrChecksum.
type ChecksumError struct {
	Module string // module@version
	Path   string // directory, zip file or URL that was checked
	Source Source // where Path came from
	Want   string // pinned hash
	Got    string // hash of what was found
}

func (e *ChecksumError) Error() string {
	s := fmt.Sprintf("kernel: %s in %s is corrupt: its hash is %s, the pinned hash is %s", e.Module, e.Path, e.Got, e.Want)
	switch e.Source {
	case SourceModCache:
		s += fmt.Sprintf("; remove it (go clean -modcache, or chmod -R u+w %s && rm -rf %s) and try again", e.Path, e.Path)
	case SourceModCacheZip:
		s += fmt.Sprintf("; remove it (go clean -modcache, or rm %s) and try again", e.Path)
	case SourceProxy:
		s += "; the proxy served a different file: set GOPROXY to a proxy you trust, or pass your own kernel file (kernel.FromFile)"
	}
	return s
}

// Is makes errors.Is(err, ErrChecksum) true.
func (e *ChecksumError) Is(target error) bool { return target == ErrChecksum }

// DownloadError reports a failed download from a module proxy. It matches
// ErrDownload and unwraps to the network error, if any.
type DownloadError struct {
	URL    string
	Status int   // HTTP status, 0 if no response
	Err    error // network error, nil for a bad status
}

func (e *DownloadError) Error() string {
	var why string
	if e.Err != nil {
		why = e.Err.Error()
	} else {
		why = fmt.Sprintf("HTTP status %d", e.Status)
	}
	return fmt.Sprintf("kernel: download %s: %s: check network access, set GOPROXY to a reachable Go module proxy, run `go mod download %s@%s`, or pass your own kernel file (kernel.FromFile)",
		e.URL, why, Module, Version)
}

// Is makes errors.Is(err, ErrDownload) true.
func (e *DownloadError) Is(target error) bool { return target == ErrDownload }

// Unwrap returns the network error.
func (e *DownloadError) Unwrap() error { return e.Err }

// NotFoundError reports that no source had the module. It matches
// ErrKernelNotFound and unwraps to the errors of the sources tried.
type NotFoundError struct {
	Module string   // module@version
	Tried  []string // what was looked at, in order
	Errs   []error  // why each download source failed
}

func (e *NotFoundError) Error() string {
	s := fmt.Sprintf("kernel: %s not found (tried %s)", e.Module, strings.Join(e.Tried, "; "))
	for _, err := range e.Errs {
		s += "; " + err.Error()
	}
	return s + fmt.Sprintf(": run `go mod download %s`, set GOPROXY to a Go module proxy, or pass your own kernel file (kernel.FromFile)", e.Module)
}

// Is makes errors.Is(err, ErrKernelNotFound) true.
func (e *NotFoundError) Is(target error) bool { return target == ErrKernelNotFound }

// Unwrap returns the errors of the sources tried.
func (e *NotFoundError) Unwrap() []error { return e.Errs }
