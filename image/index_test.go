package image

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"reflect"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// layerIndex converts a layer tar in memory and returns its index.
func layerIndex(t testing.TB, layer []byte) []byte {
	t.Helper()
	var ix bytes.Buffer
	if _, err := convertLayer(context.Background(), bytes.NewReader(layer), &memAt{}, convConfig{index: &ix}); err != nil {
		t.Fatalf("convert: %v", err)
	}
	return ix.Bytes()
}

func sources(idx ...[]byte) []layerSource {
	out := make([]layerSource, len(idx))
	for i, b := range idx {
		out[i] = func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(b)), nil }
	}
	return out
}

func opaqueCounts(t testing.TB, idx ...[]byte) []int {
	t.Helper()
	out := make([]int, len(idx))
	for i, b := range idx {
		if err := readIndex(bytes.NewReader(b), func(k byte, _ string) error {
			if k == idxOpaque {
				out[i]++
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
	}
	return out
}

// opaqueTestLayers is the image of the brief: layer 1 has /a/old and
// /a/sub/x, layer 2 makes /a opaque and re-creates /a/keep. The base also
// has /a/keep, and /a/gone0 that layer 1 deletes.
func opaqueTestLayers(t testing.TB) [][]byte {
	return [][]byte{
		mkTar(t,
			tent{name: "./", typ: tar.TypeDir, mode: 0o755},
			tent{name: "a/", typ: tar.TypeDir, mode: 0o755},
			tent{name: "a/keep", body: "base keep"},
			tent{name: "a/gone0", body: "deleted by layer 1"},
			tent{name: "b/file", body: "untouched"},
		),
		mkTar(t,
			tent{name: "a/", typ: tar.TypeDir, mode: 0o755},
			tent{name: "a/old", body: "old"},
			tent{name: "a/sub/", typ: tar.TypeDir, mode: 0o755},
			tent{name: "a/sub/x", body: "x"},
			tent{name: "a/.wh.gone0"},
		),
		mkTar(t,
			tent{name: "a/", typ: tar.TypeDir, mode: 0o755},
			tent{name: "a/.wh..wh..opq"},
			tent{name: "a/keep", body: "new keep"},
		),
	}
}

func TestOpaqueWhiteouts(t *testing.T) {
	three := opaqueTestLayers(t)
	cases := []struct {
		name   string
		layers [][]byte
		want   map[int][]string
	}{
		{"brief", three, map[int][]string{2: {"a/old", "a/sub"}}},
		{
			// A directory re-created under the opaque one must hide
			// what the lower one holds too: overlayfs would merge them.
			"recreated subdirectory",
			[][]byte{three[0], three[1], mkTar(t,
				tent{name: "a/.wh..wh..opq"},
				tent{name: "a/sub/y", body: "y"},
			)},
			map[int][]string{2: {"a/keep", "a/old", "a/sub/x"}},
		},
		{
			"opaque root",
			[][]byte{three[0], mkTar(t, tent{name: ".wh..wh..opq"}, tent{name: "b/new", body: "n"})},
			map[int][]string{1: {"a", "b/file"}},
		},
		{
			"nothing below",
			[][]byte{three[0], mkTar(t, tent{name: "c/.wh..wh..opq"}, tent{name: "c/z", body: "z"})},
			map[int][]string{1: nil},
		},
		{
			// A lower symlink where the opaque directory is: the upper
			// directory hides it, nothing merges.
			"lower non-directory",
			[][]byte{mkTar(t, tent{name: "a", typ: tar.TypeSymlink, link: "b", mode: 0o777}, tent{name: "b/f", body: "f"}),
				mkTar(t, tent{name: "a/.wh..wh..opq"})},
			map[int][]string{1: nil},
		},
		{
			// Two opaque layers: the upper one's lower view is the
			// correctly merged one (the lower opaque applied).
			"stacked opaque layers",
			[][]byte{three[0], three[1], three[2], mkTar(t,
				tent{name: "a/.wh..wh..opq"},
				tent{name: "a/n", body: "n"},
			)},
			map[int][]string{2: {"a/old", "a/sub"}, 3: {"a/keep"}},
		},
		{
			"deleted then opaque",
			[][]byte{three[0], mkTar(t, tent{name: ".wh.a"}), mkTar(t, tent{name: "a/.wh..wh..opq"}, tent{name: "a/q", body: "q"})},
			map[int][]string{2: nil},
		},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var idx [][]byte
			want := map[int]bool{}
			for i, l := range c.layers {
				idx = append(idx, layerIndex(t, l))
				want[i] = true
			}
			got, err := opaqueWhiteouts(sources(idx...), opaqueCounts(t, idx...), want)
			if err != nil {
				t.Fatal(err)
			}
			for i := range c.layers {
				if !reflect.DeepEqual(got[i], c.want[i]) {
					t.Errorf("layer %d whiteouts = %q, want %q", i, got[i], c.want[i])
				}
			}
		})
	}
}

// TestIndexCorrupt checks that every damaged index is rejected with
// ErrInvalidLayer and never panics.
// TestPtrie pins what relevant and under report for the opaque
// directories a/b and x: the directories themselves and what is under
// them are both; ancestors are relevant only; siblings are neither.
func TestPtrie(t *testing.T) {
	var tr ptrie
	tr.add([]string{"a", "b"})
	tr.add([]string{"x"})
	for _, tc := range []struct {
		path            string
		relevant, under bool
	}{
		{"", true, false},
		{"a", true, false},
		{"a/b", true, true},
		{"a/b/c/d", true, true},
		{"a/c", false, false},
		{"x", true, true},
		{"x/y", true, true},
		{"y", false, false},
	} {
		parts := splitIndexPath(tc.path)
		if got := tr.relevant(parts); got != tc.relevant {
			t.Errorf("relevant(%q) = %v, want %v", tc.path, got, tc.relevant)
		}
		if got := tr.under(parts); got != tc.under {
			t.Errorf("under(%q) = %v, want %v", tc.path, got, tc.under)
		}
	}
}

func TestIndexCorrupt(t *testing.T) {
	good := layerIndex(t, opaqueTestLayers(t)[1])
	if err := readIndex(bytes.NewReader(good), func(byte, string) error { return nil }); err != nil {
		t.Fatalf("good index: %v", err)
	}
	for i := 0; i < len(good); i++ {
		b := bytes.Clone(good)
		b[i] ^= 0x41
		if err := readIndex(bytes.NewReader(b), func(byte, string) error { return nil }); !errors.Is(err, ErrInvalidLayer) {
			t.Fatalf("byte %d flipped: err = %v, want ErrInvalidLayer", i, err)
		}
	}
	for n := 0; n < len(good); n++ {
		if err := readIndex(bytes.NewReader(good[:n]), func(byte, string) error { return nil }); !errors.Is(err, ErrInvalidLayer) {
			t.Fatalf("truncated to %d: err = %v, want ErrInvalidLayer", n, err)
		}
	}
}

// variantTree extracts a SquashFS image with unsquashfs.
func variantTree(t *testing.T, img string) tree {
	t.Helper()
	tr, _ := readTree(t, unsquash(t, img))
	return tr
}

// TestPullOpaqueVariant pulls the three-layer image of the brief from a
// real (in-process) registry: the top layer's image is a chain variant
// holding whiteouts for a/old and a/sub but not a/keep, the other layers
// keep their shared diff_id images, and stacking the layers with overlayfs
// semantics but ignoring every trusted.overlay.opaque xattr (what the
// default guest kernel does) gives the reference tree.
func TestPullOpaqueVariant(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("unsquashfs needs root to restore device nodes")
	}
	_, host := startRegistry(t)
	layers := opaqueTestLayers(t)
	push(t, host+"/opq:1", buildImage(t, v1.Config{}, layers...))
	root := t.TempDir()
	s := openStore(t, root)
	img, err := s.Pull(context.Background(), host+"/opq:1")
	if err != nil {
		t.Fatal(err)
	}
	paths := img.LayerPaths()
	for i, l := range img.Layers {
		shared, _ := s.layerPath(l.DiffID)
		if i == 2 {
			v, _, _ := s.chainPaths(l.ChainID)
			if l.Path != v || l.Path == shared {
				t.Errorf("top layer path %s, want chain variant %s", l.Path, v)
			}
		} else if l.Path != shared {
			t.Errorf("layer %d path %s, want shared %s", i, l.Path, shared)
		}
	}
	if img.Layers[0].ChainID != img.Layers[0].DiffID || img.Layers[2].ChainID == img.Layers[2].DiffID {
		t.Errorf("chain IDs %+v", img.Layers)
	}
	top := variantTree(t, paths[0])
	for _, p := range []string{"a/old", "a/sub"} {
		if n := top[p]; n.Type != "char" || n.Rdev != "0:0" {
			t.Errorf("variant %s = %+v, want whiteout", p, n)
		}
	}
	if n := top["a/keep"]; n.Type != "file" {
		t.Errorf("variant a/keep = %+v, want the layer's file", n)
	}
	// The variant carries no opaque xattr (a kernel honouring it would
	// list the whiteouts in readdir); the shared image keeps it.
	if n := top["a"]; n.Type != "dir" || strings.Contains(n.Xattrs, OverlayOpaqueXattr) {
		t.Errorf("variant a = %+v: want a directory without %s", n, OverlayOpaqueXattr)
	}
	sharedTop, _ := s.layerPath(img.Layers[2].DiffID)
	if n := variantTree(t, sharedTop)["a"]; !strings.Contains(n.Xattrs, OverlayOpaqueXattr+"=y") {
		t.Errorf("shared image a xattrs %q: want %s=y", n.Xattrs, OverlayOpaqueXattr)
	}
	if got := len(top); got != 4 {
		t.Errorf("variant has %d entries, want 4 (a, a/keep, a/old, a/sub): %v", got, top)
	}

	want := tree{}
	for _, l := range layers {
		refApply(t, want, l)
	}
	noXattr := func(tr tree) tree {
		out := tree{}
		for k, n := range tr {
			n.Xattrs = stripOverlay(n.Xattrs)
			out[k] = n
		}
		return out
	}
	var trees []tree
	for i := len(paths) - 1; i >= 0; i-- {
		trees = append(trees, noXattr(variantTree(t, paths[i])))
	}
	compareTrees(t, want, overlayMerge(trees))

	// The same stack with the shared top image instead of the variant
	// shows the lower entries: the check above can fail.
	shared, _ := s.layerPath(img.Layers[2].DiffID)
	trees[2] = noXattr(variantTree(t, shared))
	if merged := overlayMerge(trees); merged["a/old"].Type == "" {
		t.Error("control: without the variant a/old should show through")
	}

	// Get finds the variant again; Prune keeps it while referenced and
	// drops it (and the layer indexes) once the reference is removed.
	img2, err := s.Get(context.Background(), host+"/opq:1")
	if err != nil || !reflect.DeepEqual(img2.LayerPaths(), paths) {
		t.Fatalf("Get = %v, %v; want paths %v", img2, err, paths)
	}
	if rep, err := s.Prune(context.Background()); err != nil || rep.Files != 0 {
		t.Errorf("Prune with the image referenced: %+v, %v", rep, err)
	}
	if err := s.Remove(context.Background(), host+"/opq:1"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Prune(context.Background()); err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{"layers/sha256", "layers/chain"} {
		if n := countFiles(t, root, d, ""); n != 0 {
			t.Errorf("%d files left in %s after Remove and Prune", n, d)
		}
	}
}

// TestOpaqueNothingHidden: a layer whose opaque directory hides nothing
// needs no variant; a marker records that and the shared image is used.
func TestOpaqueNothingHidden(t *testing.T) {
	_, host := startRegistry(t)
	layers := opaqueTestLayers(t)
	top := mkTar(t, tent{name: "c/.wh..wh..opq"}, tent{name: "c/z", body: "z"})
	push(t, host+"/opq:2", buildImage(t, v1.Config{}, layers[0], top))
	root := t.TempDir()
	s := openStore(t, root)
	img, err := s.Pull(context.Background(), host+"/opq:2")
	if err != nil {
		t.Fatal(err)
	}
	shared, _ := s.layerPath(img.Layers[1].DiffID)
	if img.Layers[1].Path != shared {
		t.Errorf("path %s, want the shared image %s", img.Layers[1].Path, shared)
	}
	if n, m := countFiles(t, root, "layers/chain", ".none"), countFiles(t, root, "layers/chain", ".sqfs"); n != 1 || m != 0 {
		t.Errorf("chain dir holds %d markers and %d variants, want 1 and 0", n, m)
	}
}

// TestCorruptIndexRepaired: a damaged layer index makes the image count as
// missing; Pull converts the layer again from the cached blob.
func TestCorruptIndexRepaired(t *testing.T) {
	ch, host := startRegistry(t)
	layers := opaqueTestLayers(t)
	push(t, host+"/opq:3", buildImage(t, v1.Config{}, layers...))
	root := t.TempDir()
	s := openStore(t, root)
	img, err := s.Pull(context.Background(), host+"/opq:3")
	if err != nil {
		t.Fatal(err)
	}
	ip, _ := s.indexPath(img.Layers[1].DiffID)
	if err := os.WriteFile(ip, []byte("GSBXLIX1 garbage"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Get(context.Background(), host+"/opq:3"); !errors.Is(err, ErrNotPresent) {
		t.Fatalf("Get with a corrupt index: %v, want ErrNotPresent", err)
	}
	// Also remove the variant: it must be rebuilt identically.
	v := img.Layers[2].Path
	before := fileSum(t, v)
	if err := os.Remove(v); err != nil {
		t.Fatal(err)
	}
	blobs := ch.blobs.Load()
	img2, err := s.Pull(context.Background(), host+"/opq:3")
	if err != nil {
		t.Fatal(err)
	}
	if got := ch.blobs.Load() - blobs; got > 1 {
		t.Errorf("repair downloaded %d blobs, want the config blob at most (the layers are cached)", got)
	}
	if img2.Layers[2].Path != v || fileSum(t, v) != before {
		t.Errorf("rebuilt variant differs")
	}
	if _, err := indexOpaqueCount(ip); err != nil {
		t.Errorf("index not repaired: %v", err)
	}
	if _, err := s.Get(context.Background(), host+"/opq:3"); err != nil {
		t.Errorf("Get after repair: %v", err)
	}
	if err := s.Verify(context.Background(), host+"/opq:3"); err != nil {
		t.Errorf("Verify after repair: %v", err)
	}
	// Damage inside the records passes the quick footer check Get does;
	// Verify reads the whole index and reports it.
	b, err := os.ReadFile(ip)
	if err != nil {
		t.Fatal(err)
	}
	b[len(indexMagic)+2] ^= 0x20
	if err := os.WriteFile(ip, b, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := s.Verify(context.Background(), host+"/opq:3"); !errors.Is(err, ErrInvalidLayer) {
		t.Errorf("Verify with a damaged index: %v, want ErrInvalidLayer", err)
	}
	// PullAlways converts the layer again and the index is whole again.
	if _, err := s.Pull(context.Background(), host+"/opq:3", WithPolicy(PullAlways)); err != nil {
		t.Fatal(err)
	}
	if err := s.Verify(context.Background(), host+"/opq:3"); err != nil {
		t.Errorf("Verify after PullAlways: %v", err)
	}
	assertNoScratch(t, s)
}
