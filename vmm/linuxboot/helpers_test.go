package linuxboot

import (
	"bytes"
	"compress/gzip"
	"encoding/binary"
	"testing"

	"github.com/klauspost/compress/zstd"
	"github.com/pierrec/lz4/v4"
	"github.com/ulikunitz/xz"
	"github.com/ulikunitz/xz/lzma"

	"github.com/gosandbox/sandbox/vmm/guestmem"
)

// testSeg describes a PT_LOAD segment for makeELF.
type testSeg struct {
	paddr, vaddr uint64
	data         []byte
	memsz        uint64
}

// makeELF builds a minimal ELF64 x86-64 executable with the given PT_LOAD
// segments (plus one PT_NOTE, which the loader must ignore).
func makeELF(entry uint64, segs ...testSeg) []byte {
	le := binary.LittleEndian
	phnum := len(segs) + 1
	off := uint64(elfHeaderSize + phnum*elfPhdrSize)
	h := make([]byte, off)
	copy(h, "\x7fELF")
	h[4], h[5], h[6] = elfClass64, elfDataLSB, elfVersion
	le.PutUint16(h[16:], elfTypeExec)
	le.PutUint16(h[18:], elfMachineX86)
	le.PutUint32(h[20:], 1)
	le.PutUint64(h[24:], entry)
	le.PutUint64(h[32:], elfHeaderSize)
	le.PutUint16(h[52:], elfHeaderSize)
	le.PutUint16(h[54:], elfPhdrSize)
	le.PutUint16(h[56:], uint16(phnum))
	var body []byte
	for i, s := range segs {
		p := h[elfHeaderSize+i*elfPhdrSize:]
		le.PutUint32(p[0:], ptLoad)
		le.PutUint32(p[4:], 5)
		le.PutUint64(p[8:], off+uint64(len(body)))
		le.PutUint64(p[16:], s.vaddr)
		le.PutUint64(p[24:], s.paddr)
		le.PutUint64(p[32:], uint64(len(s.data)))
		le.PutUint64(p[40:], max(s.memsz, uint64(len(s.data))))
		body = append(body, s.data...)
	}
	note := h[elfHeaderSize+len(segs)*elfPhdrSize:]
	le.PutUint32(note[0:], 4) // PT_NOTE
	return append(h, body...)
}

// testKernel is a small vmlinux: text at 16 MiB whose first bytes are the
// startup_64 prologue, and a data segment with bss.
func testKernel() []byte {
	text := append([]byte{0x49, 0x89, 0xf7}, bytes.Repeat([]byte{0x90}, 4093)...)
	data := bytes.Repeat([]byte{0xd0}, 512)
	return makeELF(0x1000000,
		testSeg{paddr: 0x1000000, vaddr: 0xffffffff81000000, data: text},
		testSeg{paddr: 0x1200000, vaddr: 0xffffffff81200000, data: data, memsz: 0x3000})
}

// sizeAppend appends the decompressed size as the kernel build does.
func sizeAppend(stream []byte, n int) []byte {
	return binary.LittleEndian.AppendUint32(stream, uint32(n))
}

func compress(t testing.TB, c Compression, data []byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	switch c {
	case Zstd:
		w, err := zstd.NewWriter(&buf)
		if err != nil {
			t.Fatal(err)
		}
		w.Write(data)
		w.Close()
	case Gzip:
		w := gzip.NewWriter(&buf)
		w.Write(data)
		w.Close()
	case XZ:
		w, err := xz.NewWriter(&buf)
		if err != nil {
			t.Fatal(err)
		}
		w.Write(data)
		w.Close()
	case LZMA:
		w, err := lzma.NewWriter(&buf)
		if err != nil {
			t.Fatal(err)
		}
		w.Write(data)
		w.Close()
	case LZ4:
		w := lz4.NewWriter(&buf)
		if err := w.Apply(lz4.LegacyOption(true)); err != nil {
			t.Fatal(err)
		}
		if _, err := w.Write(data); err != nil {
			t.Fatal(err)
		}
		if err := w.Close(); err != nil {
			t.Fatal(err)
		}
	default:
		t.Fatalf("no compressor for %s", c)
	}
	return sizeAppend(buf.Bytes(), len(data))
}

// makeBzImage wraps a compressed payload in a protocol 2.15 bzImage with one
// setup sector.
func makeBzImage(payload []byte) []byte {
	le := binary.LittleEndian
	const setupSects = 1
	pmOff := (setupSects + 1) * 512
	const payloadOff = 0x100 // a stand-in for the decompressor stub
	b := make([]byte, pmOff+payloadOff+len(payload)+64)
	b[offSetupSects] = setupSects
	le.PutUint16(b[offBootFlag:], bootFlagMagic)
	b[offJump] = 0xeb
	b[offJump+1] = 0x6a // header ends at 0x26c
	le.PutUint32(b[offHeader:], hdrSMagic)
	le.PutUint16(b[offVersion:], 0x020f)
	b[offLoadFlags] = LoadedHigh
	le.PutUint32(b[offCode32Start:], 0x100000)
	le.PutUint32(b[offInitrdAddrMax:], 0x7fffffff)
	le.PutUint32(b[offKernelAlign:], 0x200000)
	b[offRelocatable] = 1
	le.PutUint16(b[offXLoadFlags:], XLFKernel64|XLFCanBeLoadedAbove4G)
	le.PutUint32(b[offCmdlineSize:], 2047)
	le.PutUint32(b[offPayloadOffset:], payloadOff)
	le.PutUint32(b[offPayloadLength:], uint32(len(payload)))
	le.PutUint64(b[offPrefAddress:], 0x1000000)
	le.PutUint32(b[offInitSize:], 0x400000)
	copy(b[pmOff:], bytes.Repeat([]byte{0xcc}, payloadOff))
	copy(b[pmOff+payloadOff:], payload)
	return b
}

func newMem(t testing.TB, size uint64) *guestmem.Memory {
	t.Helper()
	m, err := guestmem.New(size)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}
