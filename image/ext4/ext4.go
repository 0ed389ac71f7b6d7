// Package ext4 formats an empty ext4 file system, for the writable upper
// layer of a sandbox (a sparse file attached read-write as a virtio-blk
// device, on which the guest creates overlayfs's upper and work
// directories).
//
// Only what an empty, healthy file system needs is written: superblock and
// its sparse_super backups, 32-byte group descriptors, block and inode
// bitmaps, the root directory and lost+found. Inode tables are left as holes
// (they must read as zeros: format a new sparse file, or one truncated to
// zero first). The result passes e2fsck -f and is mounted read-write by
// Linux's ext4 driver. Features: filetype, extents, dir_index, ext_attr,
// sparse_super, large_file, huge_file, dir_nlink, extra_isize; 4 KiB blocks,
// 256-byte inodes; no journal (a sandbox's upper layer is scratch space,
// thrown away with the sandbox, so crash consistency is not worth the
// journal's writes), no metadata checksums, no resize inode.
//
// Why hand-written: formatting means shelling out to mkfs.ext4 (an external
// binary the library cannot assume) or pulling in go-diskfs, whose ext4
// support is experimental and much larger than the ~300 lines an empty file
// system takes. The layout follows the kernel's
// Documentation/filesystems/ext4 and is checked in tests with e2fsprogs.
package ext4

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
)

const (
	blockSize     = 4096
	inodeSize     = 256
	blocksPerGrp  = blockSize * 8
	firstIno      = 11
	rootIno       = 2
	lostFoundIno  = 11
	extentsFlag   = 0x80000
	descSize      = 32
	bytesPerInode = 16384
)

// MinSize is the smallest file system Format accepts (8 MiB).
const MinSize = 8 << 20

// MaxSize is the largest (16 TiB, the limit without the 64bit feature).
const MaxSize = 16 << 40

// ErrSize means the requested size is out of range.
var ErrSize = errors.New("ext4: size out of range")

// Options tune Format. The zero value is usable.
type Options struct {
	// UUID is the file system UUID; zero means random.
	UUID [16]byte
	// Time is written as the creation and inode times (Unix seconds).
	Time uint32
	// Label is the volume label (at most 16 bytes).
	Label string
	// RootUID and RootGID own the root directory.
	RootUID, RootGID uint32
}

func hasSuper(g uint32) bool {
	if g <= 1 {
		return true
	}
	for _, b := range []uint32{3, 5, 7} {
		n := b
		for n < g {
			n *= b
		}
		if n == g {
			return true
		}
	}
	return false
}

// CreateFile creates (or truncates) path as a sparse file of size bytes and
// formats it.
func CreateFile(path string, size int64, o Options) error {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	if err := f.Truncate(size); err != nil {
		_ = f.Close()
		return err
	}
	if err := Format(f, size, o); err != nil {
		_ = f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		_ = f.Close()
		return err
	}
	return f.Close()
}

type group struct {
	start, count         uint32 // first block, blocks in group
	bbitmap, ibitmap, it uint32
	used                 uint32 // blocks used by metadata (and dirs)
	usedInodes, dirs     uint32
}

// Format writes an empty ext4 file system of size bytes (rounded down to 4
// KiB) to w, which must read as zeros wherever Format does not write.
func Format(w io.WriterAt, size int64, o Options) error {
	if size < MinSize || size > MaxSize {
		return fmt.Errorf("%w: %d bytes (want %d..%d)", ErrSize, size, int64(MinSize), int64(MaxSize))
	}
	if len(o.Label) > 16 {
		return fmt.Errorf("ext4: label %q longer than 16 bytes", o.Label)
	}
	if o.UUID == ([16]byte{}) {
		if _, err := rand.Read(o.UUID[:]); err != nil {
			return err
		}
		o.UUID[6] = o.UUID[6]&0x0f | 0x40
		o.UUID[8] = o.UUID[8]&0x3f | 0x80
	}
	blocks := uint32(size / blockSize)
	ngroups := (blocks + blocksPerGrp - 1) / blocksPerGrp
	gdtBlocks := (ngroups*descSize + blockSize - 1) / blockSize
	ipg := uint32((uint64(blocks)*blockSize/bytesPerInode + uint64(ngroups) - 1) / uint64(ngroups))
	ipg = (ipg + 15) &^ 15
	ipg = max(ipg, 16)
	ipg = min(ipg, blocksPerGrp)
	itBlocks := ipg * inodeSize / blockSize
	overhead := func(g uint32) uint32 {
		n := 2 + itBlocks
		if hasSuper(g) {
			n += 1 + gdtBlocks
		}
		return n
	}
	// Drop a last group too small for its own metadata.
	if last := blocks - (ngroups-1)*blocksPerGrp; ngroups > 1 && last < overhead(ngroups-1)+64 {
		ngroups--
		blocks = ngroups * blocksPerGrp
	}

	groups := make([]group, ngroups)
	for g := range groups {
		gr := &groups[g]
		gr.start = uint32(g) * blocksPerGrp
		gr.count = min(blocksPerGrp, blocks-gr.start)
		b := gr.start
		if hasSuper(uint32(g)) {
			b += 1 + gdtBlocks
		}
		gr.bbitmap, gr.ibitmap, gr.it = b, b+1, b+2
		gr.used = overhead(uint32(g))
	}
	// Root and lost+found directory blocks right after group 0's inode table.
	rootBlk := groups[0].it + itBlocks
	lfBlk := rootBlk + 1
	groups[0].used += 2
	groups[0].usedInodes = firstIno // inodes 1..11
	groups[0].dirs = 2
	if groups[0].count < groups[0].used {
		return fmt.Errorf("%w: too small for its metadata", ErrSize)
	}

	put := func(b []byte, blk uint32, off int) error {
		_, err := w.WriteAt(b, int64(blk)*blockSize+int64(off))
		return err
	}
	le32, le16 := binary.LittleEndian.PutUint32, binary.LittleEndian.PutUint16

	// Group descriptors.
	gdt := make([]byte, gdtBlocks*blockSize)
	var freeBlocks, freeInodes uint32
	for g, gr := range groups {
		d := gdt[g*descSize:]
		le32(d[0:], gr.bbitmap)
		le32(d[4:], gr.ibitmap)
		le32(d[8:], gr.it)
		le16(d[12:], uint16(gr.count-gr.used))
		le16(d[14:], uint16(ipg-gr.usedInodes))
		le16(d[16:], uint16(gr.dirs))
		freeBlocks += gr.count - gr.used
		freeInodes += ipg - gr.usedInodes
	}

	// Superblock.
	sb := make([]byte, 1024)
	le32(sb[0:], ipg*ngroups)
	le32(sb[4:], blocks)
	le32(sb[12:], freeBlocks)
	le32(sb[16:], freeInodes)
	le32(sb[20:], 0) // first data block
	le32(sb[24:], 2) // 1024 << 2
	le32(sb[28:], 2)
	le32(sb[32:], blocksPerGrp)
	le32(sb[36:], blocksPerGrp)
	le32(sb[40:], ipg)
	le32(sb[48:], o.Time)
	le16(sb[54:], 0xFFFF)
	le16(sb[56:], 0xEF53)
	le16(sb[58:], 1) // clean
	le16(sb[60:], 1) // errors: continue
	le32(sb[64:], o.Time)
	le32(sb[76:], 1) // dynamic rev
	le32(sb[84:], firstIno)
	le16(sb[88:], inodeSize)
	le32(sb[92:], 0x8|0x20)               // compat: ext_attr, dir_index
	le32(sb[96:], 0x2|0x40)               // incompat: filetype, extents
	le32(sb[100:], 0x1|0x2|0x8|0x20|0x40) // ro_compat: sparse_super, large_file, huge_file, dir_nlink, extra_isize
	copy(sb[104:], o.UUID[:])
	copy(sb[120:], o.Label)
	seed := sha256.Sum256(append([]byte("ext4 hash seed"), o.UUID[:]...))
	copy(sb[236:252], seed[:16])
	sb[252] = 1 // half_md4
	le32(sb[264:], o.Time)
	le16(sb[348:], 32)
	le16(sb[350:], 32)
	le32(sb[352:], 1) // signed directory hash (x86)
	for g, gr := range groups {
		if !hasSuper(uint32(g)) {
			continue
		}
		le16(sb[90:], uint16(g))
		off := 0
		if g == 0 {
			off = 1024
		}
		if err := put(sb, gr.start, off); err != nil {
			return err
		}
		if err := put(gdt, gr.start+1, 0); err != nil {
			return err
		}
	}

	// Bitmaps.
	for g, gr := range groups {
		bb := make([]byte, blockSize)
		for i := uint32(0); i < gr.used; i++ {
			bb[i/8] |= 1 << (i % 8)
		}
		for i := gr.count; i < blocksPerGrp; i++ { // padding past the end
			bb[i/8] |= 1 << (i % 8)
		}
		if err := put(bb, gr.bbitmap, 0); err != nil {
			return err
		}
		ib := make([]byte, blockSize)
		for i := uint32(0); i < gr.usedInodes; i++ {
			ib[i/8] |= 1 << (i % 8)
		}
		for i := ipg; i < blockSize*8; i++ {
			ib[i/8] |= 1 << (i % 8)
		}
		if err := put(ib, gr.ibitmap, 0); err != nil {
			return err
		}
		_ = g
	}

	// Inodes 2 (root) and 11 (lost+found); the reserved ones stay zero.
	inode := func(mode uint16, uid, gid uint32, links uint16, blk uint32) []byte {
		b := make([]byte, inodeSize)
		le16(b[0:], mode)
		le16(b[2:], uint16(uid))
		le32(b[4:], blockSize)
		le32(b[8:], o.Time)
		le32(b[12:], o.Time)
		le32(b[16:], o.Time)
		le16(b[24:], uint16(gid))
		le16(b[26:], links)
		le32(b[28:], blockSize/512)
		le32(b[32:], extentsFlag)
		// extent header + one extent
		le16(b[40:], 0xF30A)
		le16(b[42:], 1)
		le16(b[44:], 4)
		le16(b[46:], 0)
		le32(b[52:], 0)   // logical block 0
		le16(b[56:], 1)   // length
		le16(b[58:], 0)   // start hi
		le32(b[60:], blk) // start lo
		le16(b[120:], uint16(uid>>16))
		le16(b[122:], uint16(gid>>16))
		le16(b[128:], 32) // extra isize
		le32(b[144:], o.Time)
		return b
	}
	itOff := func(ino uint32) (uint32, int) {
		idx := ino - 1 // group 0
		return groups[0].it + idx*inodeSize/blockSize, int(idx*inodeSize) % blockSize
	}
	blk, off := itOff(rootIno)
	if err := put(inode(0o40755, o.RootUID, o.RootGID, 3, rootBlk), blk, off); err != nil {
		return err
	}
	blk, off = itOff(lostFoundIno)
	if err := put(inode(0o40700, 0, 0, 2, lfBlk), blk, off); err != nil {
		return err
	}

	// Directory blocks.
	dirent := func(b []byte, ino uint32, recLen uint16, name string) {
		le32(b[0:], ino)
		le16(b[4:], recLen)
		b[6] = byte(len(name))
		b[7] = 2 // directory
		copy(b[8:], name)
	}
	root := make([]byte, blockSize)
	dirent(root[0:], rootIno, 12, ".")
	dirent(root[12:], rootIno, 12, "..")
	dirent(root[24:], lostFoundIno, blockSize-24, "lost+found")
	if err := put(root, rootBlk, 0); err != nil {
		return err
	}
	lf := make([]byte, blockSize)
	dirent(lf[0:], lostFoundIno, 12, ".")
	dirent(lf[12:], rootIno, blockSize-12, "..")
	return put(lf, lfBlk, 0)
}
