// Package net is the virtio network device (virtio-net, device ID 1,
// VIRTIO 1.2 section 5.1): the guest's Ethernet interface, whose other end
// is a host-side Backend, normally the sandbox's *netstack.Network.
//
// Features offered: VIRTIO_NET_F_MAC (a fixed, caller-chosen address),
// VIRTIO_NET_F_MTU (up to 65535), VIRTIO_NET_F_STATUS (link always up),
// VIRTIO_NET_F_MRG_RXBUF (a frame spread over several receive buffers),
// VIRTIO_NET_F_CSUM and GUEST_CSUM (partial checksums both ways), and
// HOST_TSO4/6 and GUEST_TSO4/6 (TCP segments up to 64 KiB both ways).
// There is one receive and one transmit queue; no control queue and no
// multiqueue.
//
// Transmit (guest→host): a worker goroutine sleeps until the guest kicks
// the transmit queue (ioeventfd; no polling), copies each frame out of
// guest memory, validates its virtio-net header against the negotiated
// features and hands it to Backend.DeliverFrame, or DeliverFrameOffload
// when the header asks for a checksum or carries a TSO segment. Receive
// (host→guest): the backend calls WriteFrame or WriteFrameOffload, which
// copies the frame into the next receive buffers, sets num_buffers, and
// interrupts the guest. When the guest has posted no buffers it waits, at
// most Options.RxTimeout and never past Reset or Close, then drops the
// frame with ErrNoBuffers. Offload metadata reaches the guest only when it
// negotiated the matching feature; otherwise the device completes
// checksums and cuts TCP segments itself.
//
// The guest is hostile: a malformed header or chain (too short, over
// MaxFrameLen, a gso_type not negotiated or not offered, checksum offsets
// outside the frame, descriptors of the wrong direction) drops that
// packet with a *PacketError counted in Stats; a corrupted ring marks the
// device NEEDS_RESET through Activation.Fail with a *virtio.QueueError.
// Nothing the guest writes makes the device panic or block for long.
//
// Wiring it to netstack:
//
//	n, _ := netstack.New(netstack.Config{Name: id})
//	g := n.Guest()
//	dev, err := net.New(net.Options{MAC: g.MAC, MTU: g.MTU, Backend: n, Logger: log})
//	if err != nil { ... }
//	n.SetOutput(dev)  // host→guest frames, with TSO metadata
//	bus.AddVirtio(dev)
//	...
//	bus.Close()       // closes dev: joins its goroutines
//	n.Close()
//
// What is hand-written here, and why: the device model itself (no
// maintained pure-Go virtio-net device exists that treats guest rings as
// hostile), and a small TCP segmentation fallback for guests that do not
// take TSO segments; checksums and protocol headers use gVisor's tcpip
// header and checksum packages.
package net
