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

// mmapAnon maps size bytes of anonymous memory starting at a multiple of
// align: it maps size+align bytes and unmaps the slack at both ends.
func mmapAnon(size, align uint64) ([]byte, error) {
	extra := uint64(0)
	if align > 1 {
		extra = align
	}
	p, err := unix.MmapPtr(-1, 0, nil, uintptr(size+extra), unix.PROT_READ|unix.PROT_WRITE,
		unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
	if err != nil {
		return nil, err
	}
	start := uint64(uintptr(p))
	head := uint64(0)
	if align > 1 {
		head = (start+align-1)&^(align-1) - start
	}
	if head > 0 {
		unix.MunmapPtr(p, uintptr(head))
	}
	if tail := extra - head; tail > 0 {
		unix.MunmapPtr(unsafe.Add(p, head+size), uintptr(tail))
	}
	return unsafe.Slice((*byte)(unsafe.Add(p, head)), size), nil
}

// unmap releases a mapping made by mmapAnon.
func unmap(b []byte) error {
	return unix.MunmapPtr(unsafe.Pointer(unsafe.SliceData(b)), uintptr(len(b)))
}
