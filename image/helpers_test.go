package image

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// tent is a test tar entry.
type tent struct {
	name     string
	typ      byte
	mode     int64
	uid, gid int
	body     string
	link     string
	major    int64
	minor    int64
	xattrs   map[string]string
	mtime    int64
}

func mkTar(t testing.TB, ents ...tent) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range ents {
		h := &tar.Header{Name: e.name, Typeflag: e.typ, Mode: e.mode, Uid: e.uid, Gid: e.gid,
			Linkname: e.link, Devmajor: e.major, Devminor: e.minor, ModTime: time.Unix(e.mtime, 0), Format: tar.FormatPAX}
		if h.Typeflag == 0 {
			h.Typeflag = tar.TypeReg
		}
		if h.Mode == 0 {
			h.Mode = 0o644
		}
		if h.ModTime.Unix() == 0 {
			h.ModTime = time.Unix(1700000000, 0)
		}
		if h.Typeflag == tar.TypeReg {
			h.Size = int64(len(e.body))
		}
		for k, v := range e.xattrs {
			if h.PAXRecords == nil {
				h.PAXRecords = map[string]string{}
			}
			h.PAXRecords["SCHILY.xattr."+k] = v
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if h.Typeflag == tar.TypeReg {
			if _, err := tw.Write([]byte(e.body)); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// fnode is one file in a tree model used to compare our images with a
// reference extraction.
type fnode struct {
	Type     string // dir, file, symlink, char, block, fifo
	Mode     uint32 // permission bits incl. setuid/setgid/sticky
	UID, GID uint32
	Size     int64
	Sum      string
	Target   string
	Rdev     string
	MTime    int64
	Xattrs   string
}

type tree map[string]fnode

// refApply applies one layer tar to a reference tree with OCI semantics,
// independent of the code under test (plain archive/tar).
func refApply(t testing.TB, tr tree, layer []byte) {
	t.Helper()
	r := tar.NewReader(bytes.NewReader(layer))
	added := map[string]bool{}
	removeUnder := func(p string, keepAdded bool) {
		for k := range tr {
			if k != p && (p == "" || strings.HasPrefix(k, p+"/")) && !(keepAdded && added[k]) {
				delete(tr, k)
			}
		}
	}
	for {
		h, err := r.Next()
		if err != nil {
			break
		}
		p := strings.TrimSuffix(path.Clean(h.Name), "/")
		if p == "." {
			p = ""
		}
		base := path.Base(p)
		dir := path.Dir(p)
		if dir == "." {
			dir = ""
		}
		if base == ".wh..wh..opq" {
			removeUnder(dir, true)
			continue
		}
		if strings.HasPrefix(base, ".wh.") {
			victim := path.Join(dir, base[4:])
			delete(tr, victim)
			removeUnder(victim, false)
			continue
		}
		// implicit parents
		for d := path.Dir(p); d != "." && d != "/"; d = path.Dir(d) {
			if _, ok := tr[d]; !ok {
				tr[d] = fnode{Type: "dir", Mode: 0o755}
			}
		}
		n := fnode{Mode: uint32(h.Mode & 0o7777), UID: uint32(h.Uid), GID: uint32(h.Gid), MTime: h.ModTime.Unix()}
		var xs []string
		for k, v := range h.PAXRecords {
			if x, ok := strings.CutPrefix(k, "SCHILY.xattr."); ok && (strings.HasPrefix(x, "user.") || strings.HasPrefix(x, "trusted.") && !strings.HasPrefix(x, "trusted.overlay.")) {
				xs = append(xs, x+"="+v)
			}
		}
		sort.Strings(xs)
		n.Xattrs = strings.Join(xs, ",")
		switch h.Typeflag {
		case tar.TypeReg:
			var b bytes.Buffer
			_, _ = b.ReadFrom(r)
			n.Type, n.Size, n.Sum = "file", int64(b.Len()), sum(b.Bytes())
		case tar.TypeLink:
			n = tr[path.Clean(h.Linkname)]
		case tar.TypeDir:
			n.Type = "dir"
		case tar.TypeSymlink:
			n.Type, n.Target, n.Size = "symlink", h.Linkname, int64(len(h.Linkname))
		case tar.TypeChar:
			n.Type, n.Rdev = "char", devStr(uint32(h.Devmajor), uint32(h.Devminor))
		case tar.TypeBlock:
			n.Type, n.Rdev = "block", devStr(uint32(h.Devmajor), uint32(h.Devminor))
		case tar.TypeFifo:
			n.Type = "fifo"
		}
		if old, ok := tr[p]; ok && !(old.Type == "dir" && n.Type == "dir") {
			removeUnder(p, false)
		}
		if p == "" {
			continue // root metadata is not compared
		}
		tr[p] = n
		added[p] = true
	}
}

func devStr(maj, min uint32) string { return fmt.Sprintf("%d:%d", maj, min) }

func sum(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:8])
}

func needTool(t testing.TB, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("%s is required under CI=true (apt-get install squashfs-tools docker-registry busybox-static)", name)
		}
		t.Skipf("%s not installed (apt-get install squashfs-tools); skipping", name)
	}
	return p
}

// unsquash extracts a SquashFS image with squashfs-tools' unsquashfs, an
// independent reader, and returns the directory.
func unsquash(t testing.TB, img string) string {
	t.Helper()
	bin := needTool(t, "unsquashfs")
	dir := filepath.Join(t.TempDir(), "x")
	out, err := exec.Command(bin, "-no-progress", "-d", dir, img).CombinedOutput()
	if err != nil {
		t.Fatalf("unsquashfs %s: %v\n%s", img, err, out)
	}
	return dir
}

// readTree walks an extracted directory into a tree model.
func readTree(t testing.TB, dir string) (tree, map[string]uint64) {
	t.Helper()
	tr := tree{}
	inos := map[string]uint64{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		if rel == "." {
			return nil
		}
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return err
		}
		n := fnode{Mode: st.Mode & 0o7777, UID: st.Uid, GID: st.Gid, MTime: st.Mtim.Sec}
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFDIR:
			n.Type = "dir"
		case unix.S_IFREG:
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			n.Type, n.Size, n.Sum = "file", int64(len(b)), sum(b)
			inos[rel] = st.Ino
		case unix.S_IFLNK:
			tg, err := os.Readlink(p)
			if err != nil {
				return err
			}
			n.Type, n.Target, n.Size = "symlink", tg, int64(len(tg))
			n.Mode = 0o777
		case unix.S_IFCHR:
			n.Type, n.Rdev = "char", devStr(unix.Major(st.Rdev), unix.Minor(st.Rdev))
		case unix.S_IFBLK:
			n.Type, n.Rdev = "block", devStr(unix.Major(st.Rdev), unix.Minor(st.Rdev))
		case unix.S_IFIFO:
			n.Type = "fifo"
		}
		n.Xattrs = readXattrs(p)
		tr[filepath.ToSlash(rel)] = n
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return tr, inos
}

func readXattrs(p string) string {
	buf := make([]byte, 64<<10)
	n, err := unix.Llistxattr(p, buf)
	if err != nil || n == 0 {
		return ""
	}
	var xs []string
	for _, k := range strings.Split(strings.TrimRight(string(buf[:n]), "\x00"), "\x00") {
		v := make([]byte, 64<<10)
		m, err := unix.Lgetxattr(p, k, v)
		if err != nil {
			continue
		}
		xs = append(xs, k+"="+string(v[:m]))
	}
	sort.Strings(xs)
	return strings.Join(xs, ",")
}

// overlayMerge stacks extracted layer directories (base first) the way
// overlayfs does: char 0/0 hides a lower path, trusted.overlay.opaque=y
// hides a directory's lower contents.
func overlayMerge(layers []tree) tree {
	out := tree{}
	for _, l := range layers {
		keys := make([]string, 0, len(l))
		for k := range l {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			n := l[k]
			removeUnder := func() {
				for o := range out {
					if strings.HasPrefix(o, k+"/") {
						delete(out, o)
					}
				}
			}
			if n.Type == "char" && n.Rdev == devStr(0, 0) {
				delete(out, k)
				removeUnder()
				continue
			}
			if old, ok := out[k]; ok && !(old.Type == "dir" && n.Type == "dir") {
				removeUnder()
			}
			if n.Type == "dir" && strings.Contains(n.Xattrs, OverlayOpaqueXattr+"=y") {
				removeUnder()
			}
			n.Xattrs = stripOverlay(n.Xattrs)
			out[k] = n
		}
	}
	return out
}

func stripOverlay(x string) string {
	var keep []string
	for _, kv := range strings.Split(x, ",") {
		if kv != "" && !strings.HasPrefix(kv, "trusted.overlay.") {
			keep = append(keep, kv)
		}
	}
	return strings.Join(keep, ",")
}

func compareTrees(t testing.TB, want, got tree) {
	t.Helper()
	for k, w := range want {
		g, ok := got[k]
		if !ok {
			t.Errorf("missing %q (want %+v)", k, w)
			continue
		}
		if w.Type == "dir" {
			// Directory sizes and implicit-parent mtimes differ by
			// design; compare the rest.
			w.Size, g.Size = 0, 0
		}
		if w != g {
			t.Errorf("%q:\n want %+v\n  got %+v", k, w, g)
		}
	}
	for k := range got {
		if _, ok := want[k]; !ok {
			t.Errorf("unexpected %q: %+v", k, got[k])
		}
	}
}

var errAny = errors.New("any error")
