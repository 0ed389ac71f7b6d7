package linuxboot

import (
	"bytes"
	"compress/bzip2"
	"compress/gzip"
	"encoding/binary"
	"errors"
	"io"

	"github.com/klauspost/compress/zstd"
	"github.com/pierrec/lz4/v4"
	"github.com/ulikunitz/xz/lzma"
)

// Offsets of setup header fields, relative to the start of the bzImage file
// and, identically, of the zero page (boot.rst, "The real-mode kernel header").
const (
	offSetupSects     = 0x1f1
	offVidMode        = 0x1fa
	offBootFlag       = 0x1fe
	offJump           = 0x200
	offHeader         = 0x202
	offVersion        = 0x206
	offTypeOfLoader   = 0x210
	offLoadFlags      = 0x211
	offCode32Start    = 0x214
	offRamdiskImage   = 0x218
	offRamdiskSize    = 0x21c
	offHeapEndPtr     = 0x224
	offCmdLinePtr     = 0x228
	offInitrdAddrMax  = 0x22c
	offKernelAlign    = 0x230
	offRelocatable    = 0x234
	offXLoadFlags     = 0x236
	offCmdlineSize    = 0x238
	offHardwareSubarc = 0x23c
	offPayloadOffset  = 0x248
	offPayloadLength  = 0x24c
	offSetupData      = 0x250
	offPrefAddress    = 0x258
	offInitSize       = 0x260

	// setupHeaderMax is where struct setup_header's room in boot_params
	// ends (edd_mbr_sig_buffer starts at 0x290).
	setupHeaderMax = 0x290
	// setupHeaderMin is the header length protocol 2.12 defines (up to
	// and including handover_offset).
	setupHeaderMin = 0x268
)

// Header magic numbers and flags (boot.rst).
const (
	bootFlagMagic = 0xaa55
	hdrSMagic     = 0x53726448 // "HdrS"

	// MinProtocol is the oldest boot protocol version with the 64-bit
	// entry point and xloadflags (2.12).
	MinProtocol = 0x020c

	// LoadFlags bits.
	LoadedHigh = 1 << 0
	CanUseHeap = 1 << 7

	// XLoadFlags bits.
	XLFKernel64           = 1 << 0
	XLFCanBeLoadedAbove4G = 1 << 1
)

// MaxVmlinuxSize is the default cap on a decompressed bzImage payload
// (Vmlinux), and on a bzImage file given to ParseBzImage.
const MaxVmlinuxSize = 512 << 20

// SetupHeader holds the fields of a bzImage setup header the loader uses.
// Raw holds the header bytes themselves, from file offset 0x1f1 to the end
// the header declares, to be copied into the zero page (Config.SetupHeader).
type SetupHeader struct {
	SetupSects      uint8  // 512-byte sectors of real-mode setup code (0 means 4)
	Version         uint16 // boot protocol version, e.g. 0x020f
	LoadFlags       uint8
	Code32Start     uint32
	InitrdAddrMax   uint32 // highest address the initramfs may occupy
	KernelAlignment uint32
	Relocatable     bool
	XLoadFlags      uint16
	CmdlineSize     uint32 // maximum command line length, without the NUL
	PayloadOffset   uint32 // relative to the protected-mode code
	PayloadLength   uint32
	PrefAddress     uint64
	InitSize        uint32 // linear memory the kernel needs from its load address
	Raw             []byte
}

// BzImage is a parsed bzImage file.
type BzImage struct {
	Header SetupHeader
	image  []byte
	pmOff  int // offset of the protected-mode code in image
}

// ParseBzImage validates the setup header of a bzImage held in b and returns
// it. b is retained (not copied) by the result. It needs boot protocol 2.12
// or newer with a 64-bit entry point (XLF_KERNEL_64).
func ParseBzImage(b []byte) (*BzImage, error) {
	const kind = "bzImage"
	if len(b) > MaxVmlinuxSize {
		return nil, formatErr(kind, -1, ErrTooLarge, "file is %d bytes, more than %d", len(b), MaxVmlinuxSize)
	}
	if len(b) < setupHeaderMin {
		return nil, formatErr(kind, -1, nil, "file is %d bytes, too short for a setup header", len(b))
	}
	le := binary.LittleEndian
	if le.Uint16(b[offBootFlag:]) != bootFlagMagic {
		return nil, formatErr(kind, offBootFlag, nil, "boot_flag is %#x, want 0xaa55", le.Uint16(b[offBootFlag:]))
	}
	if le.Uint32(b[offHeader:]) != hdrSMagic {
		return nil, formatErr(kind, offHeader, nil, "no \"HdrS\" header magic (not a bzImage)")
	}
	h := SetupHeader{
		SetupSects:      b[offSetupSects],
		Version:         le.Uint16(b[offVersion:]),
		LoadFlags:       b[offLoadFlags],
		Code32Start:     le.Uint32(b[offCode32Start:]),
		InitrdAddrMax:   le.Uint32(b[offInitrdAddrMax:]),
		KernelAlignment: le.Uint32(b[offKernelAlign:]),
		Relocatable:     b[offRelocatable] != 0,
		XLoadFlags:      le.Uint16(b[offXLoadFlags:]),
		CmdlineSize:     le.Uint32(b[offCmdlineSize:]),
		PayloadOffset:   le.Uint32(b[offPayloadOffset:]),
		PayloadLength:   le.Uint32(b[offPayloadLength:]),
	}
	if h.Version < MinProtocol {
		return nil, formatErr(kind, offVersion, ErrUnsupported, "boot protocol %d.%02d, need 2.12 or newer for the 64-bit entry point", h.Version>>8, h.Version&0xff)
	}
	end := offJump + 2 + int(b[offJump+1])
	if end > setupHeaderMax {
		end = setupHeaderMax
	}
	if end < setupHeaderMin {
		return nil, formatErr(kind, offJump, nil, "setup header ends at %#x, protocol 2.12 needs %#x", end, setupHeaderMin)
	}
	if end > len(b) {
		return nil, formatErr(kind, -1, nil, "file truncated inside the setup header")
	}
	if end >= offInitSize+4 {
		h.PrefAddress = le.Uint64(b[offPrefAddress:])
		h.InitSize = le.Uint32(b[offInitSize:])
	}
	h.Raw = b[offSetupSects:end:end]
	if h.XLoadFlags&XLFKernel64 == 0 {
		return nil, formatErr(kind, offXLoadFlags, ErrUnsupported, "xloadflags has no XLF_KERNEL_64: not a 64-bit kernel")
	}
	if h.LoadFlags&LoadedHigh == 0 {
		return nil, formatErr(kind, offLoadFlags, ErrUnsupported, "loadflags has no LOADED_HIGH: a zImage, not a bzImage")
	}
	sects := int(h.SetupSects)
	if sects == 0 {
		sects = 4
	}
	pmOff := (sects + 1) * 512
	if pmOff >= len(b) {
		return nil, formatErr(kind, offSetupSects, nil, "setup_sects %d puts the protected-mode code at %#x, beyond the %d-byte file", h.SetupSects, pmOff, len(b))
	}
	pm := uint64(len(b) - pmOff)
	if uint64(h.PayloadOffset)+uint64(h.PayloadLength) > pm {
		return nil, formatErr(kind, offPayloadOffset, nil, "payload [%#x, +%#x) runs past the protected-mode code (%#x bytes)", h.PayloadOffset, h.PayloadLength, pm)
	}
	if h.PayloadLength < 8 {
		return nil, formatErr(kind, offPayloadLength, nil, "payload_length %d is too short", h.PayloadLength)
	}
	if a := h.KernelAlignment; a != 0 && a&(a-1) != 0 {
		return nil, formatErr(kind, offKernelAlign, nil, "kernel_alignment %#x is not a power of two", a)
	}
	return &BzImage{Header: h, image: b, pmOff: pmOff}, nil
}

// ProtectedMode returns the protected-mode part of the image (what
// LoadBzImage places at BzImageLoadAddr).
func (z *BzImage) ProtectedMode() []byte { return z.image[z.pmOff:] }

// Payload returns the compressed kernel payload, including the 4-byte
// little-endian decompressed size the kernel build appends.
func (z *BzImage) Payload() []byte {
	pm := z.ProtectedMode()
	off := int(z.Header.PayloadOffset)
	return pm[off : off+int(z.Header.PayloadLength)]
}

// Compression names a bzImage payload format.
type Compression string

// Payload compressions, detected by their magic numbers.
const (
	Gzip    Compression = "gzip"
	Bzip2   Compression = "bzip2"
	LZMA    Compression = "lzma"
	XZ      Compression = "xz"
	LZ4     Compression = "lz4"
	Zstd    Compression = "zstd"
	LZO     Compression = "lzo"
	Unknown Compression = "unknown"
)

// DetectCompression names the compression of a payload by its magic number.
func DetectCompression(p []byte) Compression {
	switch {
	case bytes.HasPrefix(p, []byte{0x1f, 0x8b}):
		return Gzip
	case bytes.HasPrefix(p, []byte("BZh")):
		return Bzip2
	case bytes.HasPrefix(p, []byte{0xfd, '7', 'z', 'X', 'Z', 0}):
		return XZ
	case bytes.HasPrefix(p, []byte{0x02, 0x21, 0x4c, 0x18}):
		return LZ4
	case bytes.HasPrefix(p, []byte{0x28, 0xb5, 0x2f, 0xfd}):
		return Zstd
	case bytes.HasPrefix(p, []byte{0x89, 'L', 'Z', 'O'}):
		return LZO
	case bytes.HasPrefix(p, []byte{0x5d, 0, 0}):
		return LZMA
	}
	return Unknown
}

// Compression returns the payload's compression.
func (z *BzImage) Compression() Compression { return DetectCompression(z.Payload()) }

// Vmlinux decompresses the payload and returns the uncompressed vmlinux: an
// ELF file, possibly followed by the kernel's relocation table. The output is
// capped at MaxVmlinuxSize.
func (z *BzImage) Vmlinux() ([]byte, error) { return z.VmlinuxLimit(MaxVmlinuxSize) }

// VmlinuxLimit is Vmlinux with a caller-chosen cap in bytes.
func (z *BzImage) VmlinuxLimit(limit int64) ([]byte, error) {
	out, err := Decompress(z.Payload(), limit)
	if err != nil {
		return nil, err
	}
	if _, err := parseELF(bytes.NewReader(out), int64(len(out))); err != nil {
		return nil, formatErr("payload", -1, err, "decompressed payload is not an x86-64 vmlinux")
	}
	return out, nil
}

// Decompress decompresses a kernel payload as the kernel build lays it out:
// a compressed stream followed by its decompressed size as a 4-byte
// little-endian number. The output must be exactly that size and at most
// limit bytes; otherwise it fails with ErrTooLarge or a *FormatError.
func Decompress(payload []byte, limit int64) ([]byte, error) {
	const kind = "payload"
	if len(payload) < 8 {
		return nil, formatErr(kind, -1, nil, "payload of %d bytes is too short", len(payload))
	}
	size := int64(binary.LittleEndian.Uint32(payload[len(payload)-4:]))
	stream := payload[:len(payload)-4]
	if size == 0 {
		return nil, formatErr(kind, -1, nil, "declared decompressed size is 0")
	}
	if size > limit {
		return nil, formatErr(kind, -1, ErrTooLarge, "declared decompressed size %d exceeds the %d-byte limit", size, limit)
	}
	c := DetectCompression(stream)
	var (
		out []byte
		err error
	)
	switch c {
	case Zstd:
		out, err = unzstd(stream, size)
	case Gzip:
		var r *gzip.Reader
		r, err = gzip.NewReader(bytes.NewReader(stream))
		if err == nil {
			r.Multistream(false)
			out, err = readCapped(r, size)
		}
	case Bzip2:
		out, err = readCapped(bzip2.NewReader(bytes.NewReader(stream)), size)
	case XZ:
		out, err = decodeXZ(stream, size)
	case LZMA:
		var r *lzma.Reader
		r, err = lzma.NewReader(bytes.NewReader(limitLZMAHeader(stream, size)))
		if err == nil {
			out, err = readCapped(r, size)
		}
	case LZ4:
		out, err = readCapped(lz4.NewReader(bytes.NewReader(stream)), size)
	case LZO:
		return nil, formatErr(kind, 0, ErrUnsupported, "lzo payloads are not supported (rebuild with CONFIG_KERNEL_ZSTD or pass a vmlinux)")
	default:
		return nil, formatErr(kind, 0, ErrUnsupported, "unknown payload compression (magic % x)", stream[:min(len(stream), 6)])
	}
	if err != nil {
		if errors.Is(err, ErrTooLarge) {
			return nil, formatErr(kind, -1, ErrTooLarge, "%s payload decompresses to more than its declared %d bytes", c, size)
		}
		return nil, formatErr(kind, -1, err, "%s decompression failed", c)
	}
	if int64(len(out)) != size {
		return nil, formatErr(kind, -1, nil, "%s payload decompressed to %d bytes, header declares %d", c, len(out), size)
	}
	return out, nil
}

// readCapped reads r to EOF, failing with ErrTooLarge past size bytes.
func readCapped(r io.Reader, size int64) ([]byte, error) {
	buf := bytes.NewBuffer(make([]byte, 0, min(size, 64<<20)+bytes.MinRead))
	n, err := buf.ReadFrom(io.LimitReader(r, size+1))
	if err != nil {
		return nil, err
	}
	if n > size {
		return nil, ErrTooLarge
	}
	return buf.Bytes(), nil
}

func unzstd(stream []byte, size int64) ([]byte, error) {
	// The decoder caps its window at its memory limit, and kernel builds
	// use zstd -22 --ultra (windows up to 128 MiB, larger than small
	// payloads), so the limit is at least that; the output is checked
	// against the declared size below.
	const maxWindow = 128 << 20
	d, err := zstd.NewReader(nil,
		zstd.WithDecoderConcurrency(1),
		zstd.WithDecoderMaxMemory(uint64(max(size, maxWindow))),
		zstd.WithDecoderMaxWindow(maxWindow))
	if err != nil {
		return nil, err
	}
	defer d.Close()
	out, err := d.DecodeAll(stream, make([]byte, 0, min(size, maxWindow)))
	if errors.Is(err, zstd.ErrDecoderSizeExceeded) || int64(len(out)) > size {
		return nil, ErrTooLarge
	}
	return out, err
}
