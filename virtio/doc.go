// Package virtio holds the transport-independent core of gosandbox's virtio
// devices: the split virtqueue (which treats every value the guest writes as
// hostile), the Device interface that console, block and entropy devices
// implement, and the small interfaces the VMM implements for interrupts and
// queue notifications (Interrupts, Ioevents).
//
// Layout:
//
//   - virtio (this package): Queue, Chain, Device, Activation, the VMM-facing
//     interfaces and the typed errors.
//   - virtio/pci: the PCI host bridge (config mechanism #1 and ECAM), BARs,
//     MSI-X, and the virtio-pci modern transport.
//   - virtio/console, virtio/blk, virtio/rng, virtio/net (to package
//     netstack), virtio/p9 (a 9P2000.L file server): the devices.
//   - virtio/virtiotest: a driver-side test double and a conformance suite,
//     so devices are tested without a VM.
//
// The virtqueue is written here rather than taken from a library because no
// maintained pure-Go virtio device library exists: the Go VMMs that carry one
// (e.g. gokvm) trust guest ring data, which a sandbox cannot do. It follows
// the VIRTIO 1.2 specification, section 2.7 (split virtqueues).
//
// Concurrency contract in one paragraph: the VMM calls the PCI bus from vCPU
// goroutines; a device runs its queue processing on goroutines it owns, which
// it starts in Activate and joins in Reset and Close; interrupts are raised
// from those goroutines through Interrupt.Trigger, which never blocks; guest
// kicks arrive on each Queue's Kicks channel.
package virtio
