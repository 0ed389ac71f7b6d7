package guestmem

import (
	"fmt"
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

// Populate makes the host back [gpa, gpa+n) with writable pages now, as
// if the guest had written to each (madvise MADV_POPULATE_WRITE): anonymous
// pages are allocated and file pages mapped by MapFile get their private
// copies. A guest touching such a page later takes only KVM's own fault.
// The range must lie in one region; gpa and n are rounded out to pages.
// It fails with ErrPopulateUnsupported on kernels before Linux 5.14.
// Populate must not race with Close.
func (m *Memory) Populate(gpa, n uint64) error {
	start := gpa &^ (PageSize - 1)
	end := (gpa + n + PageSize - 1) &^ (PageSize - 1)
	if end < gpa {
		return &RangeError{GPA: gpa, Len: n}
	}
	b, err := m.Slice(start, end-start)
	if err != nil {
		return err
	}
	if len(b) == 0 {
		return nil
	}
	switch err := unix.Madvise(b, unix.MADV_POPULATE_WRITE); err {
	case nil:
		return nil
	case unix.EINVAL:
		return ErrPopulateUnsupported
	default:
		return fmt.Errorf("guestmem: populate [%#x, %#x): %w", start, end, err)
	}
}
