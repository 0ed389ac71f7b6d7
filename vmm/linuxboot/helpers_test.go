package linuxboot

import (
	"testing"

	"github.com/gosandbox/sandbox/vmm/guestmem"
	"github.com/gosandbox/sandbox/vmm/linuxboot/linuxboottest"
)

// testSeg describes a PT_LOAD segment for makeELF.
type testSeg = linuxboottest.Segment

// makeELF builds a minimal ELF64 x86-64 executable.
func makeELF(entry uint64, segs ...testSeg) []byte { return linuxboottest.ELF(entry, segs...) }

// testKernel is linuxboottest.Kernel.
func testKernel() []byte { return linuxboottest.Kernel() }

// sizeAppend appends the decompressed size as the kernel build does.
func sizeAppend(stream []byte, n int) []byte { return linuxboottest.SizeAppend(stream, n) }

func compress(t testing.TB, c Compression, data []byte) []byte {
	t.Helper()
	p, err := linuxboottest.Compress(string(c), data)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// makeBzImage wraps a compressed payload in a protocol 2.15 bzImage.
func makeBzImage(payload []byte) []byte { return linuxboottest.BzImage(payload) }

func newMem(t testing.TB, size uint64) *guestmem.Memory {
	t.Helper()
	m, err := guestmem.New(size)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}
