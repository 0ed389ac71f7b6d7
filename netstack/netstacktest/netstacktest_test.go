package netstacktest_test

import (
	"io"
	"net"
	"net/netip"
	"strconv"
	"testing"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/link/channel"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/gosandbox/sandbox/netstack/netstacktest"
)

func TestEcho(t *testing.T) {
	for _, sink := range []bool{false, true} {
		e := netstacktest.StartEcho(t, "127.0.0.1:0", sink)
		c, err := net.Dial("tcp", "127.0.0.1:"+strconv.Itoa(int(e.Port())))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := io.WriteString(c, "hello"); err != nil {
			t.Fatal(err)
		}
		if !sink {
			got := make([]byte, 5)
			if _, err := io.ReadFull(c, got); err != nil || string(got) != "hello" {
				t.Fatalf("echo read %q, %v", got, err)
			}
		}
		c.(*net.TCPConn).CloseWrite()
		if n, err := io.Copy(io.Discard, c); err != nil || n != 0 {
			t.Errorf("sink=%v: %d more bytes (%v) after the echo", sink, n, err)
		}
		c.Close()
		if a, r := e.Accepted.Load(), e.Received.Load(); a != 1 || r != 5 {
			t.Errorf("sink=%v: accepted %d, received %d; want 1, 5", sink, a, r)
		}
	}
}

func TestConfigureGuest(t *testing.T) {
	s := stack.New(stack.Options{NetworkProtocols: []stack.NetworkProtocolFactory{ipv4.NewProtocol, ipv6.NewProtocol}})
	defer s.Destroy()
	if err := s.CreateNIC(1, channel.New(1, 1500, "")); err != nil {
		t.Fatal(err)
	}
	a := netstacktest.GuestAddrs{
		IPv4: netip.MustParsePrefix("10.0.2.2/30"), GatewayIPv4: netip.MustParseAddr("10.0.2.1"),
		IPv6: netip.MustParsePrefix("fd00::2/64"), GatewayIPv6: netip.MustParseAddr("fd00::1"),
	}
	netstacktest.ConfigureGuest(t, s, 1, a)
	want := map[string]bool{
		"10.0.2.0/30 nic 1":            true,
		"0.0.0.0/0 via 10.0.2.1 nic 1": true,
		"fd00::/64 nic 1":              true,
		"::/0 via fd00::1 nic 1":       true,
	}
	got := s.GetRouteTable()
	for _, r := range got {
		if !want[r.String()] {
			t.Errorf("unexpected route %v", r)
		}
		delete(want, r.String())
	}
	if len(want) != 0 {
		t.Errorf("routes %v lack %v", got, want)
	}
	if addr, err := s.GetMainNICAddress(1, ipv4.ProtocolNumber); err != nil || addr.Address != tcpip.AddrFrom4(a.IPv4.Addr().As4()) {
		t.Errorf("IPv4 address %v, %v", addr, err)
	}
}
