package guestmem

import "unsafe"

// HostAddr returns the host virtual address of the region's mapping, for
// registering it with KVM (KVM_SET_USER_MEMORY_REGION).
func (r Region) HostAddr() uintptr {
	if len(r.host) == 0 {
		return 0
	}
	return uintptr(unsafe.Pointer(&r.host[0]))
}
