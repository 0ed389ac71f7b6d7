package guestmem

import (
	"os"

	"golang.org/x/sys/unix"
)

// hugePage is the size of a transparent huge page on x86-64.
const hugePage = 2 << 20

// mapAnon maps size bytes of anonymous memory, 2 MiB aligned when it is at
// least that large, so that guest-physical and host addresses agree modulo
// 2 MiB and KVM can use 2 MiB mappings wherever the host backs guest memory
// with huge pages. The mapping is released with unmap, not unix.Munmap.
//
// It does not ask for transparent huge pages (MADV_HUGEPAGE): that would
// round every guest touch up to 2 MiB of host memory, which costs density
// for many small sandboxes, and it did not shorten boots in measurements.
func mapAnon(size uint64) ([]byte, error) {
	if size < hugePage {
		return mmapAnon(size, 1)
	}
	return mmapAnon(size, hugePage)
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
