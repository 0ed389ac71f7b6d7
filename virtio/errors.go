package virtio

import (
	"errors"
	"fmt"
)

// Sentinel errors matched (errors.Is) by *QueueError. Each names one way a
// guest driver broke the split virtqueue rules.
var (
	// ErrQueueSize: the queue size is 0, above the device maximum, or not a
	// power of two.
	ErrQueueSize = errors.New("invalid queue size")
	// ErrRingAddress: a ring (descriptor table, avail or used ring) is
	// misaligned or not inside guest RAM.
	ErrRingAddress = errors.New("ring not in guest RAM or misaligned")
	// ErrAvailIndex: the avail index moved more than the queue size ahead of
	// the entries the device has consumed.
	ErrAvailIndex = errors.New("avail index jumped ahead by more than the queue size")
	// ErrDescIndex: a descriptor index (head or next) is outside its table.
	ErrDescIndex = errors.New("descriptor index out of range")
	// ErrChainTooLong: a descriptor chain is longer than the queue size
	// (including descriptors of an indirect table), e.g. a loop.
	ErrChainTooLong = errors.New("descriptor chain longer than the queue size")
	// ErrIndirect: an indirect descriptor is not negotiated, nested, has
	// NEXT set, or its table length is not a non-zero multiple of 16.
	ErrIndirect = errors.New("invalid indirect descriptor")
	// ErrDescAddress: a buffer [addr, addr+len) is not inside guest RAM.
	ErrDescAddress = errors.New("descriptor buffer not in guest RAM")
	// ErrDescOrder: a device-readable descriptor follows a device-writable one.
	ErrDescOrder = errors.New("device-readable descriptor after a device-writable one")
)

// ErrClosed is returned by operations on a device or port after Close.
var ErrClosed = errors.New("virtio: device closed")

// QueueError reports a virtqueue the guest driver corrupted. The device that
// meets one is marked broken (NEEDS_RESET) and stops processing until the
// guest resets it; nothing on the host side needs to be done except, if it
// repeats, suspecting the guest kernel.
type QueueError struct {
	Queue int    // queue index within the device
	What  string // what was being read, e.g. "descriptor 7"
	Err   error  // one of the Err* sentinels above
}

// Error implements error.
func (e *QueueError) Error() string {
	return fmt.Sprintf("virtio: queue %d: %s: %v (the guest driver is buggy or hostile; the device is marked NEEDS_RESET until the guest resets it)", e.Queue, e.What, e.Err)
}

// Unwrap returns the sentinel.
func (e *QueueError) Unwrap() error { return e.Err }
