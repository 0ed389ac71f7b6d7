// Package lazy9p serves a lazily pulled eStargz image (image.LazyImage) as a
// read-only 9P2000.L file system with github.com/hugelgupf/p9, so a guest can
// mount it over virtio-9p (mount -t 9p -o trans=virtio,version=9p2000.L,ro)
// and boot before the image is downloaded: every read becomes verified
// HTTP range requests for just the chunks it touches.
//
// The virtio-9p transport is package virtio/p9: give it New's Attacher
// (sandbox.LazyImage does). Writes fail with EROFS; stack the mount under an overlayfs upper for a
// writable root.
package lazy9p

import (
	"context"
	"errors"
	"io"
	"io/fs"
	"path"
	"strings"
	"sync"

	"github.com/gosandbox/sandbox/image"
	"github.com/hugelgupf/p9/fsimpl/readdir"
	"github.com/hugelgupf/p9/fsimpl/templatefs"
	"github.com/hugelgupf/p9/linux"
	"github.com/hugelgupf/p9/p9"
)

// New returns a p9.Attacher whose tree is li's merged view. li must stay
// open while the server runs; closing it makes reads fail.
func New(li *image.LazyImage) p9.Attacher { return &attacher{li: li} }

type attacher struct{ li *image.LazyImage }

// Attach implements p9.Attacher.
func (a *attacher) Attach() (p9.File, error) {
	e, err := a.li.Lookup("")
	if err != nil {
		return nil, errno(err)
	}
	return &file{a: a, ent: e}, nil
}

// file is one walked path. It implements p9.File.
type file struct {
	p9.DefaultWalkGetAttr
	templatefs.NoopRenamed
	templatefs.NotLockable

	a   *attacher
	ent *image.LazyEntry

	mu sync.Mutex
	lf *image.LazyFile
}

var _ p9.File = (*file)(nil)

func errno(err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, fs.ErrNotExist):
		return linux.ENOENT
	case errors.Is(err, image.ErrDigestMismatch), errors.Is(err, image.ErrTruncated), errors.Is(err, image.ErrInvalidLayer):
		return linux.EIO
	case errors.Is(err, image.ErrClosed):
		return linux.EIO
	}
	return linux.EIO
}

func (f *file) qid() p9.QID {
	return p9.QID{Type: f.mode().QIDType(), Path: f.ent.ID()}
}

func (f *file) mode() p9.FileMode {
	m := p9.FileMode(f.ent.Mode.Perm())
	if f.ent.Mode&fs.ModeSetuid != 0 {
		m |= 0o4000
	}
	if f.ent.Mode&fs.ModeSetgid != 0 {
		m |= 0o2000
	}
	if f.ent.Mode&fs.ModeSticky != 0 {
		m |= 0o1000
	}
	switch f.ent.Type {
	case "dir":
		m |= p9.ModeDirectory
	case "symlink":
		m |= p9.ModeSymlink
	case "char":
		m |= p9.ModeCharacterDevice
	case "block":
		m |= p9.ModeBlockDevice
	case "fifo":
		m |= p9.ModeNamedPipe
	default:
		m |= p9.ModeRegular
	}
	return m
}

// Walk implements p9.File.Walk.
func (f *file) Walk(names []string) ([]p9.QID, p9.File, error) {
	if len(names) == 0 {
		return nil, &file{a: f.a, ent: f.ent}, nil
	}
	cur := f.ent
	qids := make([]p9.QID, 0, len(names))
	for _, n := range names {
		if cur.Type != "dir" {
			return nil, nil, linux.ENOTDIR
		}
		if n == "" || strings.Contains(n, "/") {
			return nil, nil, linux.EINVAL
		}
		p := path.Join(cur.Path(), n) // ".." is cleaned, and cannot leave the root
		e, err := f.a.li.Lookup(p)
		if err != nil {
			return nil, nil, errno(err)
		}
		cur = e
		qids = append(qids, (&file{ent: e}).qid())
	}
	return qids, &file{a: f.a, ent: cur}, nil
}

// StatFS implements p9.File.StatFS.
func (f *file) StatFS() (p9.FSStat, error) {
	return p9.FSStat{Type: 0x01021997, BlockSize: 4096, NameLength: 255}, nil
}

// GetAttr implements p9.File.GetAttr.
func (f *file) GetAttr(req p9.AttrMask) (p9.QID, p9.AttrMask, p9.Attr, error) {
	e := f.ent
	nlink := e.NumLink
	if nlink < 1 {
		nlink = 1
	}
	if e.Type == "dir" {
		nlink = 2
	}
	size := uint64(e.Size)
	if e.Type == "symlink" {
		size = uint64(len(e.Target))
	}
	mt := e.ModTime.Unix()
	if mt < 0 {
		mt = 0
	}
	attr := p9.Attr{
		Mode: f.mode(), UID: p9.UID(e.UID), GID: p9.GID(e.GID), NLink: p9.NLink(nlink),
		RDev: p9.Dev(linuxDev(e.Major, e.Minor)), Size: size, BlockSize: 4096, Blocks: (size + 511) / 512,
		ATimeSeconds: uint64(mt), MTimeSeconds: uint64(mt), CTimeSeconds: uint64(mt),
	}
	valid := p9.AttrMask{Mode: true, NLink: true, UID: true, GID: true, RDev: true, ATime: true, MTime: true, CTime: true, INo: true, Size: true, Blocks: true}
	return f.qid(), valid, attr, nil
}

func linuxDev(major, minor int) uint64 {
	ma, mi := uint64(major), uint64(minor)
	return (mi & 0xff) | ((ma & 0xfff) << 8) | ((mi &^ 0xff) << 12) | ((ma &^ 0xfff) << 32)
}

// Open implements p9.File.Open.
func (f *file) Open(mode p9.OpenFlags) (p9.QID, uint32, error) {
	if mode.Mode() != p9.ReadOnly {
		return p9.QID{}, 0, linux.EROFS
	}
	if f.ent.Type == "reg" {
		// The 9P interface has no context; the LazyImage's own lifetime
		// (Close) bounds the range requests.
		lf, err := f.a.li.Open(context.Background(), f.ent.Path())
		if err != nil {
			return p9.QID{}, 0, errno(err)
		}
		f.mu.Lock()
		f.lf = lf
		f.mu.Unlock()
	}
	return f.qid(), 0, nil
}

// ReadAt implements p9.File.ReadAt.
func (f *file) ReadAt(p []byte, off int64) (int, error) {
	f.mu.Lock()
	lf := f.lf
	f.mu.Unlock()
	if lf == nil {
		if f.ent.Type == "dir" {
			return 0, linux.EISDIR
		}
		return 0, linux.EINVAL
	}
	n, err := lf.ReadAt(p, off)
	if err == io.EOF {
		return n, nil
	}
	if err != nil {
		return n, errno(err)
	}
	return n, nil
}

// Readdir implements p9.File.Readdir.
func (f *file) Readdir(offset uint64, count uint32) (p9.Dirents, error) {
	if f.ent.Type != "dir" {
		return nil, linux.ENOTDIR
	}
	ents, err := f.a.li.ReadDir(f.ent.Path())
	if err != nil {
		return nil, errno(err)
	}
	names := make([]string, 0, len(ents))
	qids := make(map[string]p9.QID, len(ents))
	for _, e := range ents {
		names = append(names, e.Name)
		qids[e.Name] = (&file{ent: e}).qid()
	}
	return readdir.Readdir(offset, count, names, qids)
}

// Readlink implements p9.File.Readlink.
func (f *file) Readlink() (string, error) {
	if f.ent.Type != "symlink" {
		return "", linux.EINVAL
	}
	return f.ent.Target, nil
}

// GetXattr implements p9.File.GetXattr.
func (f *file) GetXattr(name string) ([]byte, error) {
	v, ok := f.ent.Xattrs[name]
	if !ok {
		return nil, linux.ENODATA
	}
	return v, nil
}

// ListXattrs implements p9.File.ListXattrs.
func (f *file) ListXattrs() ([]string, error) {
	out := make([]string, 0, len(f.ent.Xattrs))
	for k := range f.ent.Xattrs {
		out = append(out, k)
	}
	return out, nil
}

// Close implements p9.File.Close.
func (f *file) Close() error { return nil }

// The rest refuse to modify a read-only tree.

// SetAttr implements p9.File.SetAttr.
func (f *file) SetAttr(p9.SetAttrMask, p9.SetAttr) error { return linux.EROFS }

// WriteAt implements p9.File.WriteAt.
func (f *file) WriteAt([]byte, int64) (int, error) { return 0, linux.EROFS }

// SetXattr implements p9.File.SetXattr.
func (f *file) SetXattr(string, []byte, p9.XattrFlags) error { return linux.EROFS }

// RemoveXattr implements p9.File.RemoveXattr.
func (f *file) RemoveXattr(string) error { return linux.EROFS }

// FSync implements p9.File.FSync.
func (f *file) FSync() error { return nil }

// Create implements p9.File.Create.
func (f *file) Create(string, p9.OpenFlags, p9.FileMode, p9.UID, p9.GID) (p9.File, p9.QID, uint32, error) {
	return nil, p9.QID{}, 0, linux.EROFS
}

// Mkdir implements p9.File.Mkdir.
func (f *file) Mkdir(string, p9.FileMode, p9.UID, p9.GID) (p9.QID, error) {
	return p9.QID{}, linux.EROFS
}

// Symlink implements p9.File.Symlink.
func (f *file) Symlink(string, string, p9.UID, p9.GID) (p9.QID, error) {
	return p9.QID{}, linux.EROFS
}

// Link implements p9.File.Link.
func (f *file) Link(p9.File, string) error { return linux.EROFS }

// Mknod implements p9.File.Mknod.
func (f *file) Mknod(string, p9.FileMode, uint32, uint32, p9.UID, p9.GID) (p9.QID, error) {
	return p9.QID{}, linux.EROFS
}

// Rename implements p9.File.Rename.
func (f *file) Rename(p9.File, string) error { return linux.EROFS }

// RenameAt implements p9.File.RenameAt.
func (f *file) RenameAt(string, p9.File, string) error { return linux.EROFS }

// UnlinkAt implements p9.File.UnlinkAt.
func (f *file) UnlinkAt(string, uint32) error { return linux.EROFS }
