package vmm

import (
	"errors"
	"time"

	"github.com/gosandbox/sandbox/vmm/guestmem"
)

// memRange is a range of guest-physical memory.
type memRange struct{ gpa, size uint64 }

// populateChunk is how much memory populateMemory populates between checks
// for the VM stopping.
const populateChunk = 1 << 20

// populateMemory backs ranges of guest memory with writable host pages
// while the guest boots, so that the boot's first touch of each takes only
// KVM's fault (a nested page table entry) instead of also the host's (a
// page allocation, or a copy-on-write break of a page of the kernel image
// mapped from its file). It runs on its own goroutine, from Start until it
// is done or the VM stops; Close waits for it before unmapping memory.
//
// LoadLinux asks for bootRanges: the kernel image, the top of RAM and the
// initramfs, which a boot writes to (most of) anyway, so populating them
// costs little memory the guest would not have used.
func (vm *VM) populateMemory(ranges []memRange) {
	defer vm.bg.Done()
	start := time.Now()
	var done uint64
	for _, r := range ranges {
		for off := uint64(0); off < r.size; off += populateChunk {
			if vm.stopping.Load() {
				return
			}
			n := min(populateChunk, r.size-off)
			if err := vm.mem.Populate(r.gpa+off, n); err != nil {
				if !errors.Is(err, guestmem.ErrPopulateUnsupported) {
					vm.log.Debug("populating guest memory failed", "gpa", r.gpa+off, "err", err)
				}
				return
			}
			done += n
		}
	}
	vm.log.Debug("guest memory populated", "bytes", done, "took", time.Since(start))
}
