package linuxboot

import (
	"fmt"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/gosandbox/sandbox/vmm/guestmem"
)

// MmapMapper is a FileMapper that replaces guest RAM pages with a private
// (copy-on-write) mapping of the file, at the same host addresses, with
// mmap(MAP_PRIVATE|MAP_FIXED). Guest writes go to private copies; the file
// never changes. Guest memory's Close unmaps these pages with the rest.
//
// Use it before the guest runs, only with files that are never modified in
// place (a truncated file would make guest or host accesses fault), and only
// when nothing relies on those pages being anonymous memory: after
// madvise(MADV_DONTNEED) they read as the file's contents again, not zeros.
type MmapMapper struct {
	Mem *guestmem.Memory
}

var _ FileMapper = MmapMapper{}

// MapFile implements FileMapper.MapFile.
func (m MmapMapper) MapFile(gpa uint64, f *os.File, off int64, n uint64) error {
	if gpa%guestmem.PageSize != 0 || off%guestmem.PageSize != 0 || n%guestmem.PageSize != 0 || n == 0 || off < 0 {
		return fmt.Errorf("linuxboot: MapFile(%#x, %#x, %#x): not page aligned", gpa, off, n)
	}
	b, err := m.Mem.Slice(gpa, n)
	if err != nil {
		return err
	}
	addr := unsafe.Pointer(unsafe.SliceData(b))
	got, err := unix.MmapPtr(int(f.Fd()), off, addr, uintptr(n), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_FIXED)
	if err != nil {
		return fmt.Errorf("linuxboot: mmap %s over guest memory: %w", f.Name(), err)
	}
	if got != addr {
		return fmt.Errorf("linuxboot: mmap placed %s at %p, not %p", f.Name(), got, addr)
	}
	return nil
}
