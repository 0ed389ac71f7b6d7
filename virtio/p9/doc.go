// Package p9 is the virtio 9P transport device (VIRTIO 1.2 section 5.14 and
// the Plan 9 "virtio-9p" transport Linux's 9pnet_virtio speaks): it exports
// a file tree, served by a github.com/hugelgupf/p9 Attacher, to a guest that
// mounts it with
//
//	mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=524288 <tag> /mnt
//
// Wiring (VMM side):
//
//	dev, err := p9.New(p9.Options{Tag: "image", Attacher: a, MaxMessage: 1 << 20, Logger: l})
//	if err != nil { ... }
//	bus.AddVirtio(dev) // closed by bus.Close
//
// where a is any p9.Attacher of github.com/hugelgupf/p9/p9, for example
// image/lazy9p.New(lazyImage) or fsimpl/localfs.Attacher(dir) (import the
// library package under another name, e.g. ninep).
//
// # How requests flow
//
// Each request is one descriptor chain: its device-readable part holds one
// T-message (size[4] type[1] tag[2] ...), its device-writable part receives
// the R-message. The protocol itself (decoding, fids, walks, reads) is
// hugelgupf/p9's server, not this package: the device feeds it a byte stream
// of T-messages through (*p9.Server).Handle and takes R-messages from the
// stream it writes back, matching each to its chain by the 9P tag. The
// server answers concurrently and out of order; every outstanding request
// occupies its chain until its answer is copied into the chain's writable
// part (one copy, straight into guest memory) and pushed to the used ring.
//
// Why this is hand-written: hugelgupf/p9 speaks 9P over byte streams only,
// and no library maps virtqueue chains onto such a stream. This package
// handles the framing only, plus the few things the stream
// server cannot do safely with a hostile peer:
//
//   - Size: a T-message whose size field is below 7, beyond the readable
//     part, or above the negotiated msize never reaches the server (which
//     would drop the whole connection); it is answered with Rlerror
//     (EINVAL, EMSGSIZE). Tversion's msize is capped to Options.MaxMessage
//     (and raised to MinMessage) before the server sees it.
//   - Tags: a tag already outstanding, or NOTAG on anything but Tversion, is
//     answered with Rlerror(EINVAL) (the server would silently never answer
//     a duplicate). Linux matches answers to
//     requests by chain, so the error reaches the right request.
//   - Tflush is answered here: Rflush is pushed right after the flushed
//     request's answer (or at once when nothing is outstanding under that
//     tag). The server's own flush waits on the old tag and deadlocks on a
//     Tflush of itself or a cycle of flushes.
//   - A body the server cannot decode is answered by the server with tag
//     NOTAG. When exactly one request is with the server and unanswered it
//     is that one's, and it gets the Rlerror under its own tag; otherwise the
//     answer cannot be attributed and the device is marked broken
//     (NEEDS_RESET, ErrProtocol) rather than risk answering the wrong chain.
//     A Linux guest never sends such messages.
//   - An R-message larger than the chain's writable part is replaced by
//     Rlerror(EMSGSIZE) (the operation itself has happened: the guest asked
//     for more than it gave room for).
//   - A chain with fewer than 7 writable or readable bytes cannot carry an
//     answer: it is returned with 0 bytes written and logged at debug level.
//
// Nothing the guest writes can panic, hang or make the device write outside
// a chain; a broken ring marks the device NEEDS_RESET with a
// *virtio.QueueError. Reset and Close close the server's stream, wait for
// the requests it is handling (so an Attacher call in progress delays them),
// and join every goroutine; answers to requests of a reset session are
// dropped, never pushed.
//
// Memory: each outstanding request may hold up to msize bytes in the server
// (at most QueueSize of them).
//
// Known upstream limitation (hugelgupf/p9 v0.3.0): a server goroutine that
// has just sent an answer loops back into handleRequest and calls
// pendingWg.Add without synchronising with the pendingWg.Wait in Handle's
// shutdown, so Handle (and Reset with it) can return while that goroutine
// is between sending and finding the connection shut down. It then returns
// at once without touching the device or its streams, but `go test -race`
// reports the WaitGroup Add/Wait race inside the library (server.go:581 vs
// server.go:614) in most runs of this package's tests.
package p9
