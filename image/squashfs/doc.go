// Package squashfs writes SquashFS 4.0 filesystem images compressed with zlib,
// the only SquashFS compressor the default guest kernel (gokrazy kernel.amd64)
// has built in.
//
// A Writer streams: regular file data is compressed and written to the output
// as each file is added, so only metadata (names, modes, block sizes) is held
// in memory. When Finish is called the inode, directory, id and xattr tables and
// finally the superblock are written. The output depends only on the entries
// and the order their data was added: no wall-clock time, no map order and no
// host file system state leaks into it, so converting the same layer twice gives
// the same bytes.
//
// What the images hold: directories, regular files (sparse all-zero blocks are
// stored as holes), symlinks, hard links (one inode, several directory
// entries, correct link count), character and block devices, FIFOs, sockets,
// permissions including setuid/setgid/sticky bits, uid/gid, modification times
// (seconds, as SquashFS stores them), and xattrs in the user., trusted. and
// security. namespaces (the only ones SquashFS can encode). Fragments are not
// used: the tail of each file is its own compressed block, which keeps the
// writer streaming and simple at the cost of slightly weaker compression of
// small files. No export (NFS) table is written.
//
// Why hand-written: the pure-Go alternative, github.com/diskfs/go-diskfs,
// builds a SquashFS image by walking a staging directory on the host file
// system. That would mean extracting every untrusted layer to the host first
// (device nodes need mknod, ownership needs root, trusted.* xattrs need
// CAP_SYS_ADMIN, and hostile paths become a host problem), and it is neither
// streaming nor byte-for-byte deterministic. The on-disk format is small and
// documented (Documentation/filesystems/squashfs.rst in the Linux tree), so
// this package writes it directly from tar entries.
package squashfs
