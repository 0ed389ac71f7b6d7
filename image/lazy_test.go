package image

import (
	"bytes"
	"context"
	"errors"
	"io/fs"
	"os"
	"path"
	"sort"
	"strings"
	"testing"

	"github.com/gosandbox/sandbox/internal/testimage"

	"github.com/containerd/stargz-snapshotter/estargz"
	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// buildEStargzImage converts layer tars to eStargz blobs (prioritized files
// go before the prefetch landmark) and makes a linux/amd64 image whose
// layer descriptors carry the TOC digest annotation.
func buildEStargzImage(t testing.TB, cfg v1.Config, prio [][]string, layers ...[]byte) v1.Image {
	return testimage.BuildEStargz(t, cfg, prio, layers...)
}

// lazyTree walks a LazyImage into the tree model.
func lazyTree(t testing.TB, li *LazyImage) tree {
	t.Helper()
	out := tree{}
	var walk func(dir string)
	walk = func(dir string) {
		ents, err := li.ReadDir(dir)
		if err != nil {
			t.Fatalf("ReadDir(%q): %v", dir, err)
		}
		for _, e := range ents {
			p := path.Join(dir, e.Name)
			n := fnode{UID: uint32(e.UID), GID: uint32(e.GID), MTime: e.ModTime.Unix()}
			n.Mode = uint32(e.Mode.Perm())
			if e.Mode&fs.ModeSetuid != 0 {
				n.Mode |= 0o4000
			}
			if e.Mode&fs.ModeSetgid != 0 {
				n.Mode |= 0o2000
			}
			if e.Mode&fs.ModeSticky != 0 {
				n.Mode |= 0o1000
			}
			var xs []string
			for k, v := range e.Xattrs {
				if !strings.HasPrefix(k, "trusted.overlay.") {
					xs = append(xs, k+"="+string(v))
				}
			}
			sort.Strings(xs)
			n.Xattrs = strings.Join(xs, ",")
			switch e.Type {
			case "dir":
				n.Type = "dir"
				walk(p)
			case "reg":
				b, err := li.ReadFile(context.Background(), p)
				if err != nil {
					t.Fatalf("ReadFile(%q): %v", p, err)
				}
				n.Type, n.Size, n.Sum = "file", int64(len(b)), sum(b)
			case "symlink":
				n.Type, n.Target, n.Size = "symlink", e.Target, int64(len(e.Target))
			case "char":
				n.Type, n.Rdev = "char", devStr(uint32(e.Major), uint32(e.Minor))
			case "block":
				n.Type, n.Rdev = "block", devStr(uint32(e.Major), uint32(e.Minor))
			case "fifo":
				n.Type = "fifo"
			}
			out[p] = n
		}
	}
	walk("")
	return out
}

func TestLazyMatchesReference(t *testing.T) {
	_, host := startRegistry(t)
	bb := busyboxLayer(t)
	base, top := testLayers(t)
	ref := host + "/lazy/app:1"
	push(t, ref, buildEStargzImage(t, v1.Config{Cmd: []string{"sh"}}, [][]string{{"bin/busybox"}}, bb, base, top))
	s := openStore(t, t.TempDir())
	li, err := s.OpenLazy(context.Background(), ref)
	if err != nil {
		t.Fatal(err)
	}
	defer li.Close()
	st0 := li.Stats()
	if st0.Bytes >= st0.Total/2 {
		t.Errorf("opening fetched %d of %d bytes", st0.Bytes, st0.Total)
	}
	want := tree{}
	for _, l := range [][]byte{bb, base, top} {
		refApply(t, want, l)
	}
	got := lazyTree(t, li)
	compareTrees(t, want, got)
	if e, err := li.Lookup("usr/bin/tool"); err != nil || e.Mode&fs.ModeSetuid == 0 {
		t.Errorf("usr/bin/tool = %+v, %v: want setuid", e, err)
	}
	if _, err := li.Lookup("etc/shadow"); err == nil {
		t.Error("whited-out etc/shadow is visible")
	}
	if _, err := li.Lookup(estargz.PrefetchLandmark); err == nil {
		t.Error("eStargz landmark is visible")
	}
	// A full pull of the same eStargz image shows the same tree.
	if os.Getuid() == 0 {
		img, err := s.Pull(context.Background(), ref)
		if err != nil {
			t.Fatal(err)
		}
		var layers []tree
		for _, l := range img.Layers {
			tr, _ := readTree(t, unsquash(t, l.Path))
			layers = append(layers, tr)
		}
		compareTrees(t, got, overlayMerge(layers))
	}
	_ = li.Close()
	_ = li.Close()
	if _, err := li.Lookup("etc"); !errors.Is(err, ErrClosed) {
		t.Errorf("Lookup after Close: %v", err)
	}
}

func TestLazyFetchesOnDemand(t *testing.T) {
	ch, host := startRegistry(t)
	bb := busyboxLayer(t)
	big := syntheticLayer(t)
	ref := host + "/lazy/big:1"
	push(t, ref, buildEStargzImage(t, v1.Config{}, [][]string{{"bin/busybox"}, nil}, bb, big))
	s := openStore(t, t.TempDir())
	ctx := context.Background()
	li, err := s.OpenLazy(ctx, ref)
	if err != nil {
		t.Fatal(err)
	}
	defer li.Close()
	if err := li.Prefetch(ctx); err != nil {
		t.Fatal(err)
	}
	afterPrefetch := li.Stats()
	b, err := li.ReadFile(ctx, "bin/busybox")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(b[:64], []byte("ELF")) {
		t.Fatal("busybox content wrong")
	}
	if st := li.Stats(); st.Requests != afterPrefetch.Requests {
		t.Errorf("reading a prefetched file made %d more requests", st.Requests-afterPrefetch.Requests)
	}
	c, err := li.ReadFile(ctx, "usr/lib/pkg3/mod7.py")
	if err != nil || len(c) == 0 {
		t.Fatalf("mod7.py: %d bytes, %v", len(c), err)
	}
	st := li.Stats()
	if st.Bytes > st.Total/4 {
		t.Errorf("fetched %d of %d bytes to read two files", st.Bytes, st.Total)
	}
	t.Logf("fetched %d of %d bytes in %d requests", st.Bytes, st.Total, st.Requests)

	// A corrupted chunk is refused.
	li2, err := s.OpenLazy(ctx, ref)
	if err != nil {
		t.Fatal(err)
	}
	defer li2.Close()
	ch.corrupt = strings.TrimPrefix(li2.Image.Layers[1].Digest, "sha256:")
	_, err = li2.ReadFile(ctx, "usr/bin/big2")
	if !errors.Is(err, ErrDigestMismatch) {
		t.Fatalf("corrupt chunk: %v, want ErrDigestMismatch", err)
	}
}

func TestLazyNotEStargz(t *testing.T) {
	_, host := startRegistry(t)
	push(t, host+"/plain:1", buildImage(t, v1.Config{}, mkTar(t, tent{name: "f", body: "x"})))
	s := openStore(t, t.TempDir())
	if _, err := s.OpenLazy(context.Background(), host+"/plain:1"); !errors.Is(err, ErrNotLazy) {
		t.Fatalf("err = %v, want ErrNotLazy", err)
	}
	assertNoScratch(t, s)
}
