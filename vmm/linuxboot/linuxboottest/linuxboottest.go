// Package linuxboottest builds tiny synthetic kernels for tests: ELF64
// x86-64 vmlinux files, kernel-style compressed payloads and bzImage files
// around them. Nothing here boots; the files only have the shape the loader
// checks.
package linuxboottest

import (
	"bytes"
	"compress/gzip"
	"encoding/binary"
	"fmt"

	"github.com/klauspost/compress/zstd"
	"github.com/pierrec/lz4/v4"
	"github.com/ulikunitz/xz"
	"github.com/ulikunitz/xz/lzma"
)

// Segment describes a PT_LOAD segment for ELF.
type Segment struct {
	Paddr, Vaddr uint64
	Data         []byte
	Memsz        uint64 // at least len(Data)
}

// ELF builds a minimal ELF64 x86-64 executable with the given PT_LOAD
// segments, followed by one PT_NOTE program header a loader must ignore.
func ELF(entry uint64, segs ...Segment) []byte { return buildELF(entry, false, segs) }

// ELFPageAligned is ELF with each segment's file offset congruent to its
// p_paddr modulo 4096, as in a real vmlinux, so that segments can be mapped
// from the file.
func ELFPageAligned(entry uint64, segs ...Segment) []byte { return buildELF(entry, true, segs) }

func buildELF(entry uint64, aligned bool, segs []Segment) []byte {
	le := binary.LittleEndian
	const ehsize, phsize = 64, 56
	phnum := len(segs) + 1
	off := uint64(ehsize + phnum*phsize)
	h := make([]byte, off)
	copy(h, "\x7fELF")
	h[4], h[5], h[6] = 2, 1, 1 // 64-bit, little-endian, version 1
	le.PutUint16(h[16:], 2)    // ET_EXEC
	le.PutUint16(h[18:], 62)   // EM_X86_64
	le.PutUint32(h[20:], 1)
	le.PutUint64(h[24:], entry)
	le.PutUint64(h[32:], ehsize)
	le.PutUint16(h[52:], ehsize)
	le.PutUint16(h[54:], phsize)
	le.PutUint16(h[56:], uint16(phnum))
	var body []byte
	for i, s := range segs {
		if aligned {
			for (off+uint64(len(body)))%4096 != s.Paddr%4096 {
				body = append(body, 0xa5)
			}
		}
		p := h[ehsize+i*phsize:]
		le.PutUint32(p[0:], 1) // PT_LOAD
		le.PutUint32(p[4:], 5)
		le.PutUint64(p[8:], off+uint64(len(body)))
		le.PutUint64(p[16:], s.Vaddr)
		le.PutUint64(p[24:], s.Paddr)
		le.PutUint64(p[32:], uint64(len(s.Data)))
		le.PutUint64(p[40:], max(s.Memsz, uint64(len(s.Data))))
		body = append(body, s.Data...)
	}
	le.PutUint32(h[ehsize+len(segs)*phsize:], 4) // PT_NOTE
	return append(h, body...)
}

// KernelEntry is the entry point of Kernel.
const KernelEntry = 0x1000000

// Kernel is a small vmlinux: 4 KiB of text at 16 MiB that starts with
// startup_64's first instruction (mov %rsi,%r15), and a 512-byte data
// segment at 18 MiB with 0x3000 bytes in memory (the rest is bss).
func Kernel() []byte {
	text := append([]byte{0x49, 0x89, 0xf7}, bytes.Repeat([]byte{0x90}, 4093)...)
	data := bytes.Repeat([]byte{0xd0}, 512)
	return ELF(KernelEntry,
		Segment{Paddr: 0x1000000, Vaddr: 0xffffffff81000000, Data: text},
		Segment{Paddr: 0x1200000, Vaddr: 0xffffffff81200000, Data: data, Memsz: 0x3000})
}

// SizeAppend appends n as a 4-byte little-endian number, as the kernel
// build appends the decompressed size to a payload.
func SizeAppend(stream []byte, n int) []byte {
	return binary.LittleEndian.AppendUint32(stream, uint32(n))
}

// Compress compresses data as a kernel payload ("zstd", "gzip", "xz",
// "lzma" or "lz4" in the legacy frame format) and appends its size.
func Compress(method string, data []byte) ([]byte, error) {
	var buf bytes.Buffer
	var err error
	switch method {
	case "zstd":
		var w *zstd.Encoder
		if w, err = zstd.NewWriter(&buf); err == nil {
			w.Write(data)
			err = w.Close()
		}
	case "gzip":
		w := gzip.NewWriter(&buf)
		w.Write(data)
		err = w.Close()
	case "xz":
		var w *xz.Writer
		if w, err = xz.NewWriter(&buf); err == nil {
			w.Write(data)
			err = w.Close()
		}
	case "lzma":
		var w *lzma.Writer
		if w, err = lzma.NewWriter(&buf); err == nil {
			w.Write(data)
			err = w.Close()
		}
	case "lz4":
		w := lz4.NewWriter(&buf)
		if err = w.Apply(lz4.LegacyOption(true)); err == nil {
			if _, err = w.Write(data); err == nil {
				err = w.Close()
			}
		}
	default:
		err = fmt.Errorf("linuxboottest: no compressor for %q", method)
	}
	if err != nil {
		return nil, err
	}
	return SizeAppend(buf.Bytes(), len(data)), nil
}

// BzImage wraps a compressed payload in a boot protocol 2.15 bzImage with
// one setup sector, a 0x100-byte stand-in for the decompressor before the
// payload, cmdline_size 2047, kernel_alignment 2 MiB, pref_address 16 MiB
// and init_size 4 MiB.
func BzImage(payload []byte) []byte {
	le := binary.LittleEndian
	const setupSects = 1
	pmOff := (setupSects + 1) * 512
	const payloadOff = 0x100
	b := make([]byte, pmOff+payloadOff+len(payload)+64)
	b[0x1f1] = setupSects
	le.PutUint16(b[0x1fe:], 0xaa55)
	b[0x200] = 0xeb
	b[0x201] = 0x6a // the header ends at 0x26c
	copy(b[0x202:], "HdrS")
	le.PutUint16(b[0x206:], 0x020f)
	b[0x211] = 1 // LOADED_HIGH
	le.PutUint32(b[0x214:], 0x100000)
	le.PutUint32(b[0x22c:], 0x7fffffff)
	le.PutUint32(b[0x230:], 0x200000)
	b[0x234] = 1
	le.PutUint16(b[0x236:], 3) // XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G
	le.PutUint32(b[0x238:], 2047)
	le.PutUint32(b[0x248:], payloadOff)
	le.PutUint32(b[0x24c:], uint32(len(payload)))
	le.PutUint64(b[0x258:], 0x1000000)
	le.PutUint32(b[0x260:], 0x400000)
	copy(b[pmOff:], bytes.Repeat([]byte{0xcc}, payloadOff))
	copy(b[pmOff+payloadOff:], payload)
	return b
}
