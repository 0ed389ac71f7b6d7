package net

import (
	"errors"
	"fmt"
)

var (
	// ErrOptions is matched by errors from New for invalid options.
	ErrOptions = errors.New("virtio/net: invalid options")
	// ErrInvalidPacket is matched by every *PacketError.
	ErrInvalidPacket = errors.New("virtio/net: invalid packet")
	// ErrNotReady is returned by WriteFrame while the guest has not set
	// up the device (before its driver loaded, or during a reset): the
	// frame is dropped, as on an unplugged cable.
	ErrNotReady = errors.New("virtio/net: the guest driver has not activated the device; frame dropped")
	// ErrNoBuffers is returned by WriteFrame when the guest posted too
	// few receive buffers within Options.RxTimeout: the frame is dropped
	// (TCP retransmits). If it persists the guest is stuck or not reading
	// its network.
	ErrNoBuffers = errors.New("virtio/net: no receive buffers from the guest in time; frame dropped")
	// ErrBroken is returned by WriteFrame after the guest corrupted a
	// ring: the device waits for the guest to reset it.
	ErrBroken = errors.New("virtio/net: device marked NEEDS_RESET after a broken ring; frame dropped")
	// ErrClosed is returned by WriteFrame after Close (it is
	// virtio.ErrClosed).
	ErrClosed = errClosed
)

// PacketError reports one frame or descriptor chain the device refused:
// a malformed virtio-net header from the guest, a receive chain the frame
// does not fit, or an oversized frame from the host. The packet is dropped
// and counted in Stats; nothing else needs doing unless it repeats, which
// points at a buggy guest driver (or, for host frames, a backend exceeding
// the MTU). It matches ErrInvalidPacket.
type PacketError struct {
	Reason string
}

// Error implements error.
func (e *PacketError) Error() string {
	return fmt.Sprintf("virtio/net: packet dropped: %s", e.Reason)
}

// Unwrap returns ErrInvalidPacket.
func (e *PacketError) Unwrap() error { return ErrInvalidPacket }
