// Package pci is gosandbox's PCI host bridge and the virtio-pci modern
// transport (VIRTIO 1.2 section 4.1).
//
// The bus has one segment and one bus (bus 0). Device 0 is a host bridge;
// virtio devices take slots 1 and up, one function each. Config space is
// reachable two ways: configuration mechanism #1 (address port 0xCF8, data
// ports 0xCFC-0xCFF), which is what Linux uses when the VMM gives it no ACPI
// tables, and ECAM (MMCONFIG) at ECAMBase. Every virtio device has one 64-bit
// memory BAR (BAR0) holding the virtio structures and its MSI-X table and
// PBA; the bus assigns BARs inside BARWindow like firmware would, and follows
// the guest when it re-programs them.
//
// The VMM routes the ranges Bus.Ranges reports to Bus.ReadPort/WritePort/
// ReadMMIO/WriteMMIO, and implements virtio.Interrupts (MSI and legacy INTx)
// and, optionally, virtio.Ioevents (ioeventfd for queue notifications).
//
// Written by hand because no maintained pure-Go PCI/virtio-pci device model
// exists that treats guest writes as hostile.
package pci

// Guest address space the bus claims. All of it lies in the MMIO hole
// [guestmem.MMIOHoleStart, guestmem.MMIOHoleEnd) below the 32 MiB the VMM
// keeps at 0xFE000000 for the IOAPIC and LAPIC.
const (
	// ConfigAddressPort is the conf1 address register (32-bit).
	ConfigAddressPort = 0xCF8
	// ConfigDataPort is the first conf1 data port (0xCFC-0xCFF).
	ConfigDataPort = 0xCFC
	// ConfigPortBase and ConfigPortCount give the whole port range the bus
	// claims: 0xCF8-0xCFF.
	ConfigPortBase  = 0xCF8
	ConfigPortCount = 8

	// BARWindowBase and BARWindowSize delimit where device BARs live
	// (0xC0000000-0xDFFFFFFF).
	BARWindowBase = 0xC0000000
	BARWindowSize = 0x20000000

	// ECAMBase and ECAMSize delimit the MMCONFIG window
	// (0xE0000000-0xEFFFFFFF: 256 buses x 32 devices x 8 functions x 4 KiB).
	// Only bus 0 has devices.
	ECAMBase = 0xE0000000
	ECAMSize = 0x10000000

	// MaxDevices is the number of slots for devices (slot 0 is the bridge).
	MaxDevices = 31
)

// IDs of the functions on the bus.
const (
	VendorRedHat     = 0x1B36 // host bridge vendor
	DeviceHostBridge = 0x0008 // "QEMU PCIe host bridge" ID, known to guests
	VendorVirtio     = 0x1AF4
	DeviceVirtioBase = 0x1040 // modern virtio device ID = 0x1040 + type
)
