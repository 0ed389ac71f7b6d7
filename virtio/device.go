package virtio

import "github.com/gosandbox/sandbox/vmm/guestmem"

// DeviceType is a virtio device ID (VIRTIO 1.2 section 5).
type DeviceType uint16

// Device IDs of the devices gosandbox implements or plans.
const (
	TypeNet     DeviceType = 1
	TypeBlock   DeviceType = 2
	TypeConsole DeviceType = 3
	TypeEntropy DeviceType = 4
	TypeBalloon DeviceType = 5
	Type9P      DeviceType = 9
)

// Transport-level feature bits (VIRTIO 1.2 section 6).
const (
	FeatureIndirectDesc   = 1 << 28 // VIRTIO_F_INDIRECT_DESC
	FeatureEventIdx       = 1 << 29 // VIRTIO_F_EVENT_IDX
	FeatureVersion1       = 1 << 32 // VIRTIO_F_VERSION_1
	FeatureAccessPlatform = 1 << 33 // VIRTIO_F_ACCESS_PLATFORM
)

// Device status bits (VIRTIO 1.2 section 2.1).
const (
	StatusAcknowledge = 1
	StatusDriver      = 2
	StatusDriverOK    = 4
	StatusFeaturesOK  = 8
	StatusNeedsReset  = 64
	StatusFailed      = 128
)

// Device is a virtio device independent of its transport. The transport
// (virtio/pci) owns feature negotiation, queue setup and the device status;
// the device owns its configuration space and its queue processing.
//
// Calls into a Device from the transport are serialized (never two at once).
// ReadConfig and WriteConfig run on vCPU goroutines and must not block.
type Device interface {
	// Type returns the virtio device ID.
	Type() DeviceType
	// Features returns the device-specific feature bits the device offers.
	// The transport adds VIRTIO_F_VERSION_1, VIRTIO_F_EVENT_IDX and
	// VIRTIO_F_INDIRECT_DESC itself.
	Features() uint64
	// QueueSizes returns, for each virtqueue, its maximum size (a power of
	// two, at most MaxQueueSize). Its length is the number of queues.
	QueueSizes() []uint16
	// ConfigSize returns the size in bytes of the device-specific config.
	ConfigSize() int
	// ReadConfig fills p from device-specific config at offset off. Bytes
	// outside the config read as zero (the caller pre-zeroes p).
	ReadConfig(off int, p []byte)
	// WriteConfig handles a driver write to device-specific config.
	WriteConfig(off int, p []byte)
	// Activate starts the device once the driver set DRIVER_OK. The device
	// starts its worker goroutines here; they must stop when Reset or Close
	// is called.
	Activate(a *Activation) error
	// Reset stops the device's workers, joins them, and returns the device
	// to its pre-activation state. It is called when the driver writes 0 to
	// the device status, and is a no-op on a device that is not active.
	Reset()
	// Close stops the device for good and releases everything it owns. It
	// is safe to call more than once.
	Close() error
}

// Activation is what a device receives when the driver sets DRIVER_OK.
type Activation struct {
	// Mem is guest memory. It outlives the activation.
	Mem *guestmem.Memory
	// Features holds the negotiated feature bits.
	Features uint64
	// Queues holds one entry per queue in Device.QueueSizes order; an entry
	// is nil when the driver did not enable that queue.
	Queues []*Queue
	// Fail marks the device broken: the transport sets NEEDS_RESET in the
	// device status and raises a configuration-change interrupt. A device
	// calls it with the typed error that stopped it (e.g. a *QueueError) and
	// then stops processing until Reset. Safe to call from any goroutine and
	// more than once; it does not block.
	Fail func(error)
	// ConfigChanged raises a configuration-change interrupt. Safe to call
	// from any goroutine; it does not block.
	ConfigChanged func()
}
