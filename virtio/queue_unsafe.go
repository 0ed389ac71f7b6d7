package virtio

import (
	"sync/atomic"
	"unsafe"
)

// The ring index words are shared with the guest's vCPUs, which run
// concurrently with device goroutines. They are accessed with sync/atomic
// (sequentially consistent, so also a full fence on amd64) on the naturally
// aligned 32-bit word that holds them. Guest RAM regions are page aligned in
// both guest-physical and host address space, and the ring slices are
// rounded out to 4 bytes in NewQueue, so the containing word is always in
// bounds. Go has no 16-bit atomics, hence the word-level access.

// word returns the aligned 32-bit word of b containing byte off, and the bit
// shift of off within it (little-endian).
func word(b []byte, off int) (*uint32, uint) {
	p := uintptr(unsafe.Pointer(&b[off]))
	shift := uint(p&3) * 8
	base := off - int(p&3)
	return (*uint32)(unsafe.Pointer(&b[base])), shift
}

// load16 atomically loads the little-endian uint16 at b[off] (off even).
func (q *Queue) load16(b []byte, off int) uint16 {
	w, shift := word(b, off)
	return uint16(atomic.LoadUint32(w) >> shift)
}

// store16 atomically stores v at b[off] (off even) without disturbing the
// other half of its word, which may belong to the guest. A guest that keeps
// rewriting the other half can make the compare-and-swap fail; after a
// bounded number of attempts the store is dropped, which only delays that
// guest's own notifications.
func (q *Queue) store16(b []byte, off int, v uint16) {
	w, shift := word(b, off)
	mask := uint32(0xffff) << shift
	for range 64 {
		old := atomic.LoadUint32(w)
		if atomic.CompareAndSwapUint32(w, old, old&^mask|uint32(v)<<shift) {
			return
		}
	}
}

// store32 atomically stores v at b[off] (off a multiple of 4 in guest
// physical terms).
func (q *Queue) store32(b []byte, off int, v uint32) {
	atomic.StoreUint32((*uint32)(unsafe.Pointer(&b[off])), v)
}
