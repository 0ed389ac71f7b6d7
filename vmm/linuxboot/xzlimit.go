package linuxboot

import (
	"encoding/binary"
)

// The lzma decoder allocates the dictionary a stream's header asks for (up
// to 4 GiB) before decoding a byte. A dictionary larger than the whole
// output is never used, so limitLZMAHeader rewrites the header of a private
// copy to ask for no more than the declared output size. (decodeXZ sizes
// its dictionary itself.)

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
