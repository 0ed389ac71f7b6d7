package net_test

import (
	"fmt"

	"github.com/gosandbox/sandbox/netstack"
	vnet "github.com/gosandbox/sandbox/virtio/net"
)

// The device is the guest side of a netstack.Network: it takes the
// network's MAC and MTU, transmits into it, and receives from it.
func ExampleNew() {
	n, err := netstack.New(netstack.Config{Name: "example", DNS: netstack.DNSConfig{ResolvConf: "/nonexistent"}})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer n.Close()
	g := n.Guest()
	dev, err := vnet.New(vnet.Options{MAC: g.MAC, MTU: g.MTU, Backend: n})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer dev.Close() // normally the PCI bus (bus.AddVirtio(dev)) closes it
	n.SetOutput(dev)
	fmt.Println(dev.MTU(), dev.MAC().String() == g.MAC.String())
	// Output: 65520 true
}
