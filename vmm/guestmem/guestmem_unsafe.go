package guestmem

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// HostAddr returns the host virtual address of the region's mapping, for
// registering it with KVM (KVM_SET_USER_MEMORY_REGION).
func (r Region) HostAddr() uintptr {
	if len(r.host) == 0 {
		return 0
	}
	return uintptr(unsafe.Pointer(&r.host[0]))
}

// mapFileFixed replaces the pages of b (page-aligned, inside one region)
// with a private copy-on-write mapping of fd at off.
func mapFileFixed(b []byte, fd uintptr, off int64) error {
	addr := uintptr(unsafe.Pointer(&b[0]))
	r, _, e := unix.Syscall6(unix.SYS_MMAP, addr, uintptr(len(b)),
		unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_FIXED, fd, uintptr(off))
	if e != 0 {
		return e
	}
	if r != addr {
		return unix.EINVAL
	}
	return nil
}
