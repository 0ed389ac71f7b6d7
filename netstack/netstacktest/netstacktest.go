// Package netstacktest holds test helpers for code that carries guest
// traffic through a netstack.Network: a host loopback TCP echo server for
// the guest to reach through the gateway, and the address and route set-up
// of a gVisor stack playing the guest.
//
// It imports nothing from netstack (whose own tests use it), so the guest
// addresses are passed as plain values, taken from netstack.GuestConfig.
package netstacktest

import (
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// Echo is a TCP server on host loopback that echoes (or, as a sink,
// swallows) what each connection sends, counting connections and bytes.
type Echo struct {
	// Accepted counts accepted connections.
	Accepted atomic.Int64
	// Received counts bytes read from all connections.
	Received atomic.Int64

	ln   net.Listener
	sink bool
	wg   sync.WaitGroup
}

// StartEcho listens on addr (such as "127.0.0.1:0") until the test ends.
// With sink it reads and discards instead of echoing. If addr is IPv6 and
// the host cannot listen there (no IPv6 loopback) the test is skipped; any
// other failure to listen fails it.
func StartEcho(t testing.TB, addr string, sink bool) *Echo {
	t.Helper()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		if ap, perr := netip.ParseAddrPort(addr); perr == nil && ap.Addr().Is6() {
			t.Skipf("cannot listen on %s (no IPv6 loopback?): %v", addr, err)
		}
		t.Fatalf("listen on %s: %v", addr, err)
	}
	e := &Echo{ln: ln, sink: sink}
	e.wg.Add(1)
	go func() {
		defer e.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			e.Accepted.Add(1)
			e.wg.Add(1)
			go func() {
				defer e.wg.Done()
				defer c.Close()
				e.serve(c)
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		e.wg.Wait()
	})
	return e
}

func (e *Echo) serve(c net.Conn) {
	buf := make([]byte, 256<<10)
	for {
		nr, err := c.Read(buf)
		e.Received.Add(int64(nr))
		if nr > 0 && !e.sink {
			if _, werr := c.Write(buf[:nr]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// Port is the port the server listens on.
func (e *Echo) Port() uint16 { return uint16(e.ln.Addr().(*net.TCPAddr).Port) }

// GuestAddrs are a guest interface's addresses, as netstack.GuestConfig
// gives them. A zero IPv6 prefix means IPv4 only.
type GuestAddrs struct {
	IPv4        netip.Prefix
	GatewayIPv4 netip.Addr
	IPv6        netip.Prefix
	GatewayIPv6 netip.Addr
}

// ConfigureGuest gives NIC nic of the guest stack s the addresses in a, a
// route to each on-link subnet and default routes through the gateways, as
// the guest's init configures Linux. s must have the IPv4 protocol, and
// the IPv6 one when a.IPv6 is set.
func ConfigureGuest(t testing.TB, s *stack.Stack, nic tcpip.NICID, a GuestAddrs) {
	t.Helper()
	add := func(proto tcpip.NetworkProtocolNumber, addr tcpip.Address, p netip.Prefix) tcpip.Subnet {
		ap := tcpip.AddressWithPrefix{Address: addr, PrefixLen: p.Bits()}
		if err := s.AddProtocolAddress(nic, tcpip.ProtocolAddress{Protocol: proto, AddressWithPrefix: ap}, stack.AddressProperties{}); err != nil {
			t.Fatalf("guest stack: add address %v: %v", p, err)
		}
		return ap.Subnet()
	}
	routes := []tcpip.Route{
		{Destination: add(ipv4.ProtocolNumber, tcpip.AddrFrom4(a.IPv4.Addr().As4()), a.IPv4), NIC: nic},
		{Destination: header.IPv4EmptySubnet, Gateway: tcpip.AddrFrom4(a.GatewayIPv4.As4()), NIC: nic},
	}
	if a.IPv6.IsValid() {
		routes = append(routes,
			tcpip.Route{Destination: add(ipv6.ProtocolNumber, tcpip.AddrFrom16(a.IPv6.Addr().As16()), a.IPv6), NIC: nic},
			tcpip.Route{Destination: header.IPv6EmptySubnet, Gateway: tcpip.AddrFrom16(a.GatewayIPv6.As16()), NIC: nic})
	}
	s.SetRouteTable(routes)
}
