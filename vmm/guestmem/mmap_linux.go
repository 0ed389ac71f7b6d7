package guestmem

import (
	"os"

	"golang.org/x/sys/unix"
)

// hugePage is the size of a transparent huge page on x86-64.
const hugePage = 2 << 20

// mapAnon maps size bytes of anonymous memory, 2 MiB aligned when it is
// at least that large, and asks for transparent huge pages (MADV_HUGEPAGE):
// with guest-physical and host addresses both 2 MiB aligned, KVM maps guest
// memory with 2 MiB pages, which spares most of the nested page faults and
// TLB misses of 4 KiB pages. Where the host has THP disabled, the advice is
// ignored. The mapping is released with unmap, not unix.Munmap.
func mapAnon(size uint64) ([]byte, error) {
	if size < hugePage {
		return mmapAnon(size, 1)
	}
	b, err := mmapAnon(size, hugePage)
	if err != nil {
		return nil, err
	}
	_ = unix.Madvise(b, unix.MADV_HUGEPAGE)
	return b, nil
}

// Magic numbers (statfs f_type) of file systems MapFile does not map from.
var remoteFS = map[int64]bool{
	0x01021997: true, // v9fs
	0x6969:     true, // NFS
	0x65735546: true, // FUSE
	0xff534d42: true, // CIFS
	0xfe534d42: true, // SMB2
	0x00c36400: true, // Ceph
}

// localFile reports whether f lives on a local file system.
func localFile(f *os.File) bool {
	var st unix.Statfs_t
	if err := unix.Fstatfs(int(f.Fd()), &st); err != nil {
		return false
	}
	return !remoteFS[int64(st.Type)]
}
