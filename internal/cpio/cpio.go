// Package cpio writes initramfs archives in the "newc" cpio format the
// Linux kernel unpacks (Documentation/driver-api/early-userspace/buffer-format.rst).
//
// It is a writer only, small on purpose: u-root's pkg/cpio also reads and
// carries a user-lookup dependency that makes any binary importing it link
// against cgo, which would stop our test binaries from running as a static
// guest init.
package cpio

import (
	"errors"
	"fmt"
	"io"
	"strings"
)

// File types for Entry.Mode.
const (
	TypeDir     = 0o040000
	TypeRegular = 0o100000
	TypeSymlink = 0o120000
	TypeChar    = 0o020000
)

// Entry is one archive member.
type Entry struct {
	Name     string // path without a leading slash, e.g. "dev/console"
	Mode     uint32 // type bits | permission bits
	UID, GID uint32
	Data     []byte // file contents or symlink target
	Major    uint32 // device numbers for TypeChar
	Minor    uint32
}

// Writer writes a newc archive. Call Close to write the trailer.
type Writer struct {
	w     io.Writer
	ino   uint32
	off   int64
	err   error
	names map[string]bool
}

// NewWriter returns a Writer writing to w.
func NewWriter(w io.Writer) *Writer { return &Writer{w: w, ino: 1, names: map[string]bool{}} }

// ErrBadName is returned for empty, absolute or duplicate names and names
// with "..".
var ErrBadName = errors.New("cpio: bad entry name")

// Add writes one entry.
func (w *Writer) Add(e Entry) error {
	if w.err != nil {
		return w.err
	}
	if e.Name == "" || strings.HasPrefix(e.Name, "/") || strings.Contains(e.Name, "\x00") ||
		e.Name == ".." || strings.HasPrefix(e.Name, "../") || strings.Contains(e.Name, "/../") || strings.HasSuffix(e.Name, "/..") {
		return fmt.Errorf("%w: %q", ErrBadName, e.Name)
	}
	if w.names[e.Name] {
		return fmt.Errorf("%w: %q is already in the archive", ErrBadName, e.Name)
	}
	w.names[e.Name] = true
	return w.write(e)
}

func (w *Writer) write(e Entry) error {
	nlink := 1
	if e.Mode&0o170000 == TypeDir {
		nlink = 2
	}
	hdr := fmt.Sprintf("070701%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x",
		w.ino, e.Mode, e.UID, e.GID, nlink, 0, len(e.Data), 0, 0, e.Major, e.Minor, len(e.Name)+1, 0)
	w.ino++
	w.put([]byte(hdr))
	w.put([]byte(e.Name + "\x00"))
	w.pad()
	w.put(e.Data)
	w.pad()
	return w.err
}

func (w *Writer) put(b []byte) {
	if w.err != nil {
		return
	}
	n, err := w.w.Write(b)
	w.off += int64(n)
	w.err = err
}

func (w *Writer) pad() {
	if r := w.off % 4; r != 0 {
		w.put(make([]byte, 4-r))
	}
}

// Close writes the trailer. It does not close the underlying writer.
func (w *Writer) Close() error {
	if w.err != nil {
		return w.err
	}
	return w.write(Entry{Name: "TRAILER!!!"})
}
