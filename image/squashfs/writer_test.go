package squashfs_test

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/gosandbox/sandbox/image/squashfs"
)

func unsquashfs(t *testing.T) string {
	p, err := exec.LookPath("unsquashfs")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("unsquashfs (apt-get install squashfs-tools) is required under CI=true")
		}
		t.Skip("unsquashfs not installed (apt-get install squashfs-tools)")
	}
	return p
}

func build(t *testing.T, add func(w *squashfs.Writer)) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "img.sqfs")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	w, err := squashfs.NewWriter(f, squashfs.WithModTime(1700000000))
	if err != nil {
		t.Fatal(err)
	}
	add(w)
	n, err := w.Finish()
	if err != nil {
		t.Fatal(err)
	}
	if fi, _ := f.Stat(); fi.Size() != n || n%4096 != 0 {
		t.Fatalf("Finish returned %d, file is %d", n, fi.Size())
	}
	if _, err := w.Finish(); !errors.Is(err, squashfs.ErrFinished) {
		t.Fatalf("second Finish: %v", err)
	}
	return p
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// TestLargeTree writes directories big enough to span several metadata
// blocks and directory headers (>256 entries, inode numbers far apart via
// hard links) and lists them back with unsquashfs.
func TestLargeTree(t *testing.T) {
	bin := unsquashfs(t)
	const n = 3000
	img := build(t, func(w *squashfs.Writer) {
		must(t, w.Add(squashfs.Entry{Path: "a/first", Type: squashfs.TypeRegular, Mode: 0o644}, strings.NewReader("first")))
		for i := 0; i < n; i++ {
			must(t, w.Add(squashfs.Entry{Path: fmt.Sprintf("big/%s%05d", strings.Repeat("n", i%60), i), Type: squashfs.TypeRegular, Mode: 0o600, UID: uint32(i % 7), GID: uint32(i % 5), ModTime: int64(i)}, strings.NewReader(fmt.Sprint(i))))
		}
		must(t, w.Link("big/zz-link-to-first", "a/first"))
		must(t, w.Add(squashfs.Entry{Path: "z/blk", Type: squashfs.TypeBlockDev, Major: 8, Minor: 17, Mode: 0o660}, nil))
		must(t, w.Add(squashfs.Entry{Path: "z/sock", Type: squashfs.TypeSocket, Mode: 0o777}, nil))
	})
	out, err := exec.Command(bin, "-lln", img).CombinedOutput()
	if err != nil {
		t.Fatalf("unsquashfs -lln: %v\n%s", err, out)
	}
	s := string(out)
	if got := strings.Count(s, "squashfs-root/big/"); got != n+1 {
		t.Errorf("listed %d entries in big/, want %d", got, n+1)
	}
	for _, want := range []string{
		"-rw------- 3/4 ", // file 2999: uid 2999%7, gid 2999%5
		"brw-rw---- 0/0 ",
		"srwxrwxrwx 0/0 ",
		"squashfs-root/big/zz-link-to-first",
	} {
		if !strings.Contains(s, want) {
			t.Errorf("listing lacks %q", want)
		}
	}
	x := filepath.Join(t.TempDir(), "x")
	if out, err := exec.Command(bin, "-no-progress", "-d", x, img).CombinedOutput(); err != nil {
		t.Fatalf("unsquashfs -d: %v\n%s", err, out)
	}
	for _, i := range []int{0, 255, 256, 1000, n - 1} {
		b, err := os.ReadFile(filepath.Join(x, "big", fmt.Sprintf("%s%05d", strings.Repeat("n", i%60), i)))
		if err != nil || string(b) != fmt.Sprint(i) {
			t.Errorf("file %d: %q, %v", i, b, err)
		}
	}
	b, _ := os.ReadFile(filepath.Join(x, "big", "zz-link-to-first"))
	if string(b) != "first" {
		t.Errorf("hard link content %q", b)
	}
}

func TestFileSizes(t *testing.T) {
	bin := unsquashfs(t)
	sizes := []int{0, 1, 4095, 4096, 131071, 131072, 131073, 3*131072 + 17}
	datas := map[string][]byte{}
	img := build(t, func(w *squashfs.Writer) {
		for i, n := range sizes {
			d := bytes.Repeat([]byte{byte(i + 1), 0, 0, byte(i)}, n/4+1)[:n]
			name := fmt.Sprintf("f%d", n)
			datas[name] = d
			must(t, w.Add(squashfs.Entry{Path: name, Type: squashfs.TypeRegular, Mode: 0o644}, bytes.NewReader(d)))
		}
		z := make([]byte, 3*131072+5) // sparse blocks
		z[len(z)-1] = 1
		datas["sparse"] = z
		must(t, w.Add(squashfs.Entry{Path: "sparse", Type: squashfs.TypeRegular, Mode: 0o644}, bytes.NewReader(z)))
	})
	x := filepath.Join(t.TempDir(), "x")
	if out, err := exec.Command(bin, "-no-progress", "-d", x, img).CombinedOutput(); err != nil {
		t.Fatalf("unsquashfs: %v\n%s", err, out)
	}
	for name, d := range datas {
		b, err := os.ReadFile(filepath.Join(x, name))
		if err != nil || !bytes.Equal(b, d) {
			t.Errorf("%s: %d bytes read, want %d (%v)", name, len(b), len(d), err)
		}
	}
}

func TestWriterErrors(t *testing.T) {
	var buf memFile
	w, err := squashfs.NewWriter(&buf)
	must(t, err)
	must(t, w.Add(squashfs.Entry{Path: "f", Type: squashfs.TypeRegular}, nil))
	must(t, w.Add(squashfs.Entry{Path: "l", Type: squashfs.TypeSymlink, Target: "/x"}, nil))
	must(t, w.Add(squashfs.Entry{Path: "d", Type: squashfs.TypeDir}, nil))
	must(t, w.Add(squashfs.Entry{Path: "d", Type: squashfs.TypeDir, Mode: 0o700}, nil)) // merge
	cases := []struct {
		err  error
		want error
	}{
		{w.Add(squashfs.Entry{Path: "/abs", Type: squashfs.TypeRegular}, nil), squashfs.ErrInvalidPath},
		{w.Add(squashfs.Entry{Path: "a/../b", Type: squashfs.TypeRegular}, nil), squashfs.ErrInvalidPath},
		{w.Add(squashfs.Entry{Path: strings.Repeat("x", 257), Type: squashfs.TypeRegular}, nil), squashfs.ErrInvalidPath},
		{w.Add(squashfs.Entry{Path: "f", Type: squashfs.TypeRegular}, nil), squashfs.ErrExists},
		{w.Add(squashfs.Entry{Path: "l/x", Type: squashfs.TypeRegular}, nil), squashfs.ErrNotDir},
		{w.Add(squashfs.Entry{Path: "s", Type: squashfs.TypeSymlink}, nil), squashfs.ErrInvalidEntry},
		{w.Add(squashfs.Entry{Path: "x", Type: squashfs.TypeRegular, Xattrs: map[string][]byte{"system.posix_acl_access": nil}}, nil), squashfs.ErrInvalidEntry},
		{w.Add(squashfs.Entry{Path: "c", Type: squashfs.TypeCharDev, Major: 4096}, nil), squashfs.ErrInvalidEntry},
		{w.Add(squashfs.Entry{Path: "", Type: squashfs.TypeRegular}, nil), squashfs.ErrInvalidEntry},
		{w.Link("h", "d"), squashfs.ErrLinkTarget},
		{w.Link("h", "missing"), squashfs.ErrLinkTarget},
		{w.Link("f", "l"), squashfs.ErrExists},
	}
	for i, c := range cases {
		if !errors.Is(c.err, c.want) {
			t.Errorf("case %d: %v, want %v", i, c.err, c.want)
		}
	}
	if _, err := w.Finish(); err != nil {
		t.Fatal(err)
	}
	if err := w.Add(squashfs.Entry{Path: "late", Type: squashfs.TypeRegular}, nil); !errors.Is(err, squashfs.ErrFinished) {
		t.Errorf("Add after Finish: %v", err)
	}
	if _, err := squashfs.NewWriter(&buf, squashfs.WithBlockSize(1000)); err == nil {
		t.Error("block size 1000 accepted")
	}
}

type memFile struct{ b []byte }

func (m *memFile) WriteAt(p []byte, off int64) (int, error) {
	if end := int(off) + len(p); end > len(m.b) {
		m.b = append(m.b, make([]byte, end-len(m.b))...)
	}
	copy(m.b[off:], p)
	return len(p), nil
}

func TestConcurrencyDeterministic(t *testing.T) {
	var imgs [][]byte
	for _, c := range []int{1, 3, 8} {
		var m memFile
		w, err := squashfs.NewWriter(&m, squashfs.WithConcurrency(c))
		must(t, err)
		for i := 0; i < 50; i++ {
			d := bytes.Repeat([]byte(fmt.Sprintf("file %d ", i)), i*997)
			must(t, w.Add(squashfs.Entry{Path: fmt.Sprintf("d%d/f%d", i%3, i), Type: squashfs.TypeRegular, Mode: 0o644}, bytes.NewReader(d)))
		}
		_, err = w.Finish()
		must(t, err)
		imgs = append(imgs, m.b)
	}
	for i := 1; i < len(imgs); i++ {
		if !bytes.Equal(imgs[0], imgs[i]) {
			t.Fatalf("output with concurrency #%d differs from concurrency 1", i)
		}
	}
}
