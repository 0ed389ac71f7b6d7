package guestmem

import "golang.org/x/sys/unix"

func mapAnon(size uint64) ([]byte, error) {
	return unix.Mmap(-1, 0, int(size), unix.PROT_READ|unix.PROT_WRITE,
		unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
}

func unmap(b []byte) error { return unix.Munmap(b) }
