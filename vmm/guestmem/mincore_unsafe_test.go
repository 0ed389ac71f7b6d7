package guestmem

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// mincore reports in vec which pages of b are resident (mincore(2)).
func mincore(b, vec []byte) error {
	_, _, e := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)), uintptr(unsafe.Pointer(&vec[0])))
	if e != 0 {
		return e
	}
	return nil
}
