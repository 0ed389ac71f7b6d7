package linuxboot

import (
	"encoding/binary"
	"hash/crc32"
)

// The xz and lzma decoders allocate the dictionary a stream's header asks
// for (up to 4 GiB) before decoding a byte. A dictionary larger than the
// whole output is never used, so these helpers rewrite the header of a
// private copy to ask for no more than the declared output size; they also
// reject xz filters the decoder lacks before it allocates anything.

const minDictCap = 4096

// limitLZMAHeader returns stream with its .lzma header's dictionary size
// lowered to max(size, 4 KiB) where it was larger. stream is not modified.
func limitLZMAHeader(stream []byte, size int64) []byte {
	const hdrLen = 13
	if len(stream) < hdrLen {
		return stream
	}
	dict := int64(binary.LittleEndian.Uint32(stream[1:]))
	want := max(size, minDictCap)
	if dict <= want || want > 1<<32-1 {
		return stream
	}
	out := make([]byte, len(stream))
	copy(out, stream)
	binary.LittleEndian.PutUint32(out[1:], uint32(want))
	return out
}

// xzDictSize decodes an LZMA2 dictionary-size property byte.
func xzDictSize(p byte) int64 {
	if p >= 40 {
		return 1<<32 - 1
	}
	return int64(2|p&1) << (p/2 + 11)
}

// limitXZHeader checks the filters of the first block of an xz stream (only
// LZMA2 is supported) and lowers its LZMA2 dictionary to the smallest one
// that covers size bytes, fixing the block header's CRC32. Later blocks are
// left as they are. stream is not modified.
func limitXZHeader(stream []byte, size int64) ([]byte, error) {
	const streamHdr = 12
	if len(stream) < streamHdr+1 || stream[streamHdr] == 0 {
		return stream, nil // let the decoder report it, or an empty stream
	}
	hsize := (int(stream[streamHdr]) + 1) * 4
	if len(stream) < streamHdr+hsize {
		return nil, formatErr("payload", streamHdr, nil, "xz block header truncated")
	}
	h := stream[streamHdr : streamHdr+hsize-4]
	pos := 2
	varint := func() (uint64, bool) {
		var v uint64
		for i := 0; i < 9 && pos < len(h); i++ {
			b := h[pos]
			pos++
			v |= uint64(b&0x7f) << (7 * i)
			if b&0x80 == 0 {
				return v, true
			}
		}
		return 0, false
	}
	flags := h[1]
	for _, bit := range []byte{0x40, 0x80} {
		if flags&bit != 0 {
			if _, ok := varint(); !ok {
				return nil, formatErr("payload", streamHdr, nil, "bad xz block header")
			}
		}
	}
	propPos := -1
	for i := 0; i <= int(flags&3); i++ {
		id, ok1 := varint()
		n, ok2 := varint()
		if !ok1 || !ok2 || n > uint64(len(h)-pos) {
			return nil, formatErr("payload", streamHdr, nil, "bad xz filter flags")
		}
		if id != 0x21 {
			return nil, formatErr("payload", streamHdr, ErrUnsupported,
				"xz filter %#x is not supported (kernel xz payloads use the x86 BCJ filter, 0x4): use a zstd, gzip or lz4 kernel, or a vmlinux", id)
		}
		if n != 1 {
			return nil, formatErr("payload", streamHdr, nil, "LZMA2 filter with %d property bytes", n)
		}
		propPos = pos
		pos += int(n)
	}
	if propPos < 0 || h[propPos] > 40 {
		return stream, nil // let the decoder report it
	}
	p := h[propPos]
	var want byte
	for want < p && xzDictSize(want) < size {
		want++
	}
	if want >= p {
		return stream, nil
	}
	out := make([]byte, len(stream))
	copy(out, stream)
	out[streamHdr+propPos] = want
	binary.LittleEndian.PutUint32(out[streamHdr+hsize-4:], crc32.ChecksumIEEE(out[streamHdr:streamHdr+hsize-4]))
	return out, nil
}
