package guestmem

import (
	"os"

	"golang.org/x/sys/unix"
)

func mapAnon(size uint64) ([]byte, error) {
	return unix.Mmap(-1, 0, int(size), unix.PROT_READ|unix.PROT_WRITE,
		unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
}

func unmap(b []byte) error { return unix.Munmap(b) }

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
