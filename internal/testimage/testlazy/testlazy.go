// Package testlazy opens eStargz test images lazily through the image
// package, for tests of what serves a lazy image (the 9P tree in
// image/lazy9p, the virtio-9p device). It is apart from testimage because
// image's own tests use testimage, and testimage must not import image.
package testlazy

import (
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/gosandbox/sandbox/image"
	"github.com/gosandbox/sandbox/internal/testimage"
)

// ChunkSize is the eStargz chunk size of the images Open builds: small, so
// that a test file of a few KiB already spans several chunks.
const ChunkSize = 4096

// Open pushes a linux/amd64 eStargz image of layers (tars, base first, as
// testimage.Tar makes) to an in-process registry and opens it lazily from
// a store in a temporary directory. The image, the store and the registry
// are closed when the test ends.
func Open(t testing.TB, layers ...[]byte) *image.LazyImage {
	t.Helper()
	ref := testimage.StartLocalRegistry(t) + "/lazy:1"
	testimage.Push(t, ref, testimage.BuildEStargzChunks(t, ChunkSize, v1.Config{}, layers...))
	store, err := image.Open(image.WithRoot(t.TempDir()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	li, err := store.OpenLazy(t.Context(), ref)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { li.Close() })
	return li
}
