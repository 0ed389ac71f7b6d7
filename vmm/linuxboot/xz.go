package linuxboot

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"hash/crc64"
	"io"

	"github.com/ulikunitz/xz/lzma"
)

// Why an xz container reader here: kernel xz payloads (Debian's, for one)
// use the x86 BCJ filter before LZMA2, and github.com/ulikunitz/xz
// implements only LZMA2. This file reads the .xz container itself, decodes
// each block's raw LZMA2 data with ulikunitz's lzma.Reader2, undoes the BCJ
// filter (bcjX86Decode) and verifies the block's check. It also sizes the
// LZMA2 dictionary by the declared output instead of the header's request,
// so a hostile header cannot make it allocate gigabytes.

var crc64Table = crc64.MakeTable(crc64.ECMA)

const (
	xzFilterBCJX86 = 0x04
	xzFilterLZMA2  = 0x21
)

// decodeXZ decodes a single .xz stream of at most size output bytes.
func decodeXZ(stream []byte, size int64) ([]byte, error) {
	bad := func(off int, why string) error { return formatErr("payload", int64(off), nil, "xz: %s", why) }
	if len(stream) < 12 {
		return nil, bad(0, "stream header truncated")
	}
	if stream[6] != 0 || stream[7]&0xf0 != 0 || crc32.ChecksumIEEE(stream[6:8]) != binary.LittleEndian.Uint32(stream[8:12]) {
		return nil, bad(6, "bad stream flags")
	}
	var checkSize int
	switch checkType := stream[7]; checkType {
	case 0x00:
	case 0x01:
		checkSize = 4
	case 0x04:
		checkSize = 8
	case 0x0a:
		checkSize = 32
	default:
		return nil, formatErr("payload", 7, ErrUnsupported, "xz check type %#x", checkType)
	}
	out := make([]byte, 0, min(size, 64<<20))
	pos := 12
	for {
		if pos >= len(stream) {
			return nil, bad(pos, "truncated before the index")
		}
		if stream[pos] == 0 { // index indicator: no more blocks
			return out, nil
		}
		blockStart := pos
		hsize := (int(stream[pos]) + 1) * 4
		if len(stream)-pos < hsize {
			return nil, bad(pos, "block header truncated")
		}
		h := stream[pos : pos+hsize]
		if crc32.ChecksumIEEE(h[:hsize-4]) != binary.LittleEndian.Uint32(h[hsize-4:]) {
			return nil, bad(pos, "block header CRC32 mismatch")
		}
		blk, err := parseXZBlockHeader(h[:hsize-4])
		if err != nil {
			return nil, formatErr("payload", int64(pos), errors.Unwrap(err), "xz: %v", err)
		}
		pos += hsize
		dictCap := int(min(max(blk.dictSize, minDictCap), max(size, minDictCap), lzma.MaxDictCap))
		src := bytes.NewReader(stream[pos:])
		r, err := lzma.Reader2Config{DictCap: dictCap}.NewReader2(src)
		if err != nil {
			return nil, bad(pos, err.Error())
		}
		start := len(out)
		room := size - int64(start)
		buf := bytes.NewBuffer(out)
		n, err := buf.ReadFrom(io.LimitReader(r, room+1))
		out = buf.Bytes()
		if err != nil {
			return nil, bad(pos, "LZMA2: "+err.Error())
		}
		if n > room {
			return nil, ErrTooLarge
		}
		consumed := len(stream) - pos - src.Len()
		if blk.compressed >= 0 && int64(consumed) != blk.compressed {
			return nil, bad(pos, "compressed size differs from the block header")
		}
		if blk.uncompressed >= 0 && n != blk.uncompressed {
			return nil, bad(pos, "uncompressed size differs from the block header")
		}
		pos += consumed
		for (pos-blockStart)%4 != 0 {
			if pos >= len(stream) || stream[pos] != 0 {
				return nil, bad(pos, "bad block padding")
			}
			pos++
		}
		data := out[start:]
		if blk.bcj {
			bcjX86Decode(data, blk.bcjStart)
		}
		if len(stream)-pos < checkSize {
			return nil, bad(pos, "block check truncated")
		}
		check := stream[pos : pos+checkSize]
		ok := true
		switch checkSize {
		case 4:
			ok = crc32.ChecksumIEEE(data) == binary.LittleEndian.Uint32(check)
		case 8:
			ok = crc64.Checksum(data, crc64Table) == binary.LittleEndian.Uint64(check)
		case 32:
			sum := sha256.Sum256(data)
			ok = bytes.Equal(sum[:], check)
		}
		if !ok {
			return nil, bad(pos, "block check mismatch (corrupt data)")
		}
		pos += checkSize
	}
}

type xzBlock struct {
	compressed, uncompressed int64 // -1 if absent
	bcj                      bool
	bcjStart                 uint32
	dictSize                 int64
}

// parseXZBlockHeader parses a block header without its CRC32. Only the
// filter chains [LZMA2] and [x86 BCJ, LZMA2] are accepted.
func parseXZBlockHeader(h []byte) (*xzBlock, error) {
	b := &xzBlock{compressed: -1, uncompressed: -1}
	pos := 2
	varint := func() (int64, bool) {
		var v uint64
		for i := 0; i < 9 && pos < len(h); i++ {
			c := h[pos]
			pos++
			v |= uint64(c&0x7f) << (7 * i)
			if c&0x80 == 0 {
				return int64(v & (1<<63 - 1)), c != 0 || i == 0
			}
		}
		return 0, false
	}
	flags := h[1]
	if flags&0x3c != 0 {
		return nil, errors.New("reserved block flags set")
	}
	var ok bool
	if flags&0x40 != 0 {
		if b.compressed, ok = varint(); !ok {
			return nil, errors.New("bad compressed size")
		}
	}
	if flags&0x80 != 0 {
		if b.uncompressed, ok = varint(); !ok {
			return nil, errors.New("bad uncompressed size")
		}
	}
	nfilters := int(flags&3) + 1
	for i := 0; i < nfilters; i++ {
		id, ok1 := varint()
		n, ok2 := varint()
		if !ok1 || !ok2 || n > int64(len(h)-pos) {
			return nil, errors.New("bad filter flags")
		}
		props := h[pos : pos+int(n)]
		pos += int(n)
		last := i == nfilters-1
		switch {
		case id == xzFilterBCJX86 && !last && i == 0:
			b.bcj = true
			switch len(props) {
			case 0:
			case 4:
				b.bcjStart = binary.LittleEndian.Uint32(props)
			default:
				return nil, errors.New("bad BCJ properties")
			}
		case id == xzFilterLZMA2 && last:
			if len(props) != 1 || props[0] > 40 {
				return nil, errors.New("bad LZMA2 properties")
			}
			b.dictSize = xzDictSize(props[0])
		default:
			return nil, &FormatError{Kind: "payload", Off: -1, Reason: "unsupported xz filter chain (only LZMA2, optionally after x86 BCJ)", Err: ErrUnsupported}
		}
	}
	for ; pos < len(h); pos++ {
		if h[pos] != 0 {
			return nil, errors.New("nonzero block header padding")
		}
	}
	return b, nil
}

// xzDictSize decodes an LZMA2 dictionary-size property byte (at most 40).
func xzDictSize(p byte) int64 {
	if p >= 40 {
		return 1<<32 - 1
	}
	return int64(2|p&1) << (p/2 + 11)
}

// bcjX86Decode undoes the xz x86 branch-call-jump filter in place: the
// encoder turned the relative rel32 operands of E8 (call) and E9 (jmp)
// opcodes into absolute addresses, which compress better; start is the
// stream position of buf[0] (the filter's start offset). The last four
// bytes are never converted.
func bcjX86Decode(buf []byte, start uint32) {
	// An operand is converted only if its high byte is 0x00 or 0xFF.
	// mask remembers, for the three bytes before i, which held E8/E9
	// opcodes that were not converted; some such patterns veto a
	// conversion, or make it repeat (bitNum names the operand byte a
	// preceding opcode overlaps).
	allowed := [8]bool{true, true, true, false, true, false, false, false}
	bitNum := [8]uint32{0, 1, 2, 2, 3, 3, 3, 3}
	msb := func(b byte) bool { return b == 0 || b == 0xff }
	if len(buf) <= 4 {
		return
	}
	end := len(buf) - 4
	prev := -1
	var mask uint32
	for i := 0; i < end; i++ {
		if buf[i]&0xfe != 0xe8 {
			continue
		}
		if d := i - prev; d > 3 {
			mask = 0
		} else {
			mask = (mask << (d - 1)) & 7
			if mask != 0 && (!allowed[mask] || msb(buf[i+4-int(bitNum[mask])])) {
				prev = i
				mask = mask<<1 | 1
				continue
			}
		}
		prev = i
		if !msb(buf[i+4]) {
			mask = mask<<1 | 1
			continue
		}
		src := binary.LittleEndian.Uint32(buf[i+1:])
		var dest uint32
		for {
			dest = src - (start + uint32(i) + 5)
			if mask == 0 {
				break
			}
			j := bitNum[mask] * 8
			if !msb(byte(dest >> (24 - j))) {
				break
			}
			src = dest ^ (1<<(32-j) - 1)
		}
		dest &= 0x01ffffff
		dest |= -(dest & 0x01000000)
		binary.LittleEndian.PutUint32(buf[i+1:], dest)
		i += 4
	}
}
