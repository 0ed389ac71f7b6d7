package pci_test

import (
	"fmt"
	"os"

	"github.com/gosandbox/sandbox/virtio/blk"
	"github.com/gosandbox/sandbox/virtio/console"
	"github.com/gosandbox/sandbox/virtio/pci"
	"github.com/gosandbox/sandbox/virtio/rng"
	"github.com/gosandbox/sandbox/virtio/virtiotest"
	"github.com/gosandbox/sandbox/vmm/guestmem"
)

// Example wires a console, a block device and an entropy device onto a bus
// the way the VMM does. Here virtiotest.Host stands in for the VMM's
// KVM-backed virtio.Interrupts and virtio.Ioevents.
func Example() {
	mem, _ := guestmem.New(64 << 20)
	defer mem.Close()
	vm := virtiotest.NewHost() // the VMM: irqfd + GSI routes, ioeventfds

	bus, err := pci.New(pci.Config{Mem: mem, Interrupts: vm, Ioevents: vm})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer bus.Close() // closes the devices too

	cons, _ := console.New(console.Options{Console: os.Stdout, Ports: []string{"gosandbox.agent"}})
	bus.AddVirtio(cons) // slot 1: hvc0 + /dev/virtio-ports/gosandbox.agent

	img, _ := os.CreateTemp("", "disk")
	defer os.Remove(img.Name())
	defer img.Close()
	img.Truncate(1 << 20)
	disk, _ := blk.New(img, blk.Options{ReadOnly: true, Serial: "rootfs"})
	bus.AddVirtio(disk) // slot 2: /dev/vda

	bus.AddVirtio(rng.New(nil)) // slot 3: /dev/hwrng

	// The VMM routes these ranges to bus.ReadPort/WritePort/ReadMMIO/WriteMMIO.
	for _, r := range bus.Ranges() {
		space := "port"
		if r.Space == pci.SpaceMMIO {
			space = "mmio"
		}
		fmt.Printf("%s %#x-%#x\n", space, r.Base, r.Base+r.Size-1)
	}
	agent := cons.Port("gosandbox.agent") // an io.ReadWriteCloser for the agent client
	fmt.Println(agent.Name())
	// Output:
	// port 0xcf8-0xcff
	// mmio 0xe0000000-0xefffffff
	// mmio 0xc0000000-0xdfffffff
	// gosandbox.agent
}
