package netstack

import (
	"bytes"
	"errors"
	"fmt"
	"syscall"

	"gvisor.dev/gvisor/pkg/tcpip"
	"net/netip"
	"testing"
)

func TestPoolDeterministic(t *testing.T) {
	p1, err := NewPool(DefaultIPv4Pool, DefaultIPv6Pool)
	if err != nil {
		t.Fatal(err)
	}
	p2, _ := NewPool(DefaultIPv4Pool, DefaultIPv6Pool)
	a, _ := p1.Allocate("sandbox-a")
	b, _ := p2.Allocate("sandbox-a")
	if a.IPv4 != b.IPv4 || a.IPv6 != b.IPv6 {
		t.Errorf("same name, different leases: %v %v vs %v %v", a.IPv4, a.IPv6, b.IPv4, b.IPv6)
	}
	if a.IPv4.Bits() != 30 || a.IPv6.Bits() != 64 || !DefaultIPv4Pool.Contains(a.IPv4.Addr()) || !DefaultIPv6Pool.Contains(a.IPv6.Addr()) {
		t.Errorf("lease %v %v not a /30 and /64 inside the pools", a.IPv4, a.IPv6)
	}
	// A second sandbox with the same name in the same pool gets another slot.
	c, _ := p1.Allocate("sandbox-a")
	if c.IPv4 == a.IPv4 || c.IPv6 == a.IPv6 {
		t.Errorf("two live leases share a subnet: %v", c.IPv4)
	}
	a.Release()
	a.Release()
	if p1.InUse() != 1 {
		t.Errorf("InUse = %d after release, want 1", p1.InUse())
	}
	d, _ := p1.Allocate("sandbox-a")
	if d.IPv4 != b.IPv4 {
		t.Errorf("released slot not reused: %v, want %v", d.IPv4, b.IPv4)
	}
}

func TestPoolExhausted(t *testing.T) {
	p, err := NewPool(netip.MustParsePrefix("10.0.0.0/29"), netip.Prefix{})
	if err != nil {
		t.Fatal(err)
	}
	l1, _ := p.Allocate("a")
	l2, err := p.Allocate("b")
	if err != nil || l1.IPv4 == l2.IPv4 || l1.IPv6.IsValid() {
		t.Fatalf("leases %v %v, %v", l1.IPv4, l2, err)
	}
	if _, err := p.Allocate("c"); !errors.Is(err, ErrPoolExhausted) {
		t.Errorf("third Allocate in a /29 = %v, want ErrPoolExhausted", err)
	}
	for _, bad := range [][2]string{{"10.0.0.0/31", ""}, {"2001:db8::/64", ""}, {"10.0.0.0/8", "2001:db8::/96"}, {"10.0.0.0/8", "10.0.0.0/8"}} {
		v6 := netip.Prefix{}
		if bad[1] != "" {
			v6 = netip.MustParsePrefix(bad[1])
		}
		if _, err := NewPool(netip.MustParsePrefix(bad[0]), v6); !errors.Is(err, ErrInvalidConfig) {
			t.Errorf("NewPool(%s, %s) = %v, want ErrInvalidConfig", bad[0], bad[1], err)
		}
	}
}

func TestMAC(t *testing.T) {
	a, b := MACFor("one"), MACFor("one")
	if !bytes.Equal(a, b) || bytes.Equal(a, MACFor("two")) {
		t.Errorf("MACFor not deterministic per name: %v %v %v", a, b, MACFor("two"))
	}
	if a[0]&0x02 == 0 || a[0]&0x01 != 0 {
		t.Errorf("MAC %v is not locally administered unicast", a)
	}
	if bytes.Equal(a, gatewayMACFor("one")) {
		t.Error("guest and gateway share a MAC")
	}
}

func TestGuestConfig(t *testing.T) {
	n, _ := frameNet(t, Config{Name: "cfg", MTU: 9000})
	g := n.Guest()
	if g.MTU != 9000 || !bytes.Equal(g.MAC, MACFor("cfg")) {
		t.Errorf("Guest() MTU %d MAC %v", g.MTU, g.MAC)
	}
	if g.IPv4.Bits() != 30 || g.IPv4.Addr() != g.GatewayIPv4.Next() || !g.IPv4.Contains(g.GatewayIPv4) {
		t.Errorf("IPv4 %v gateway %v", g.IPv4, g.GatewayIPv4)
	}
	if g.IPv6.Bits() != 64 || !g.IPv6.Contains(g.GatewayIPv6) || g.IPv6.Addr() == g.GatewayIPv6 {
		t.Errorf("IPv6 %v gateway %v", g.IPv6, g.GatewayIPv6)
	}
	if len(g.DNS) != 2 || g.DNS[0] != g.GatewayIPv4 || g.HostAlias != HostAlias {
		t.Errorf("DNS %v alias %q", g.DNS, g.HostAlias)
	}
	want := "nameserver " + g.GatewayIPv4.String() + "\nnameserver " + g.GatewayIPv6.String() + "\noptions edns0 trust-ad\n"
	if got := g.ResolvConf(); got != want {
		t.Errorf("ResolvConf() = %q, want %q", got, want)
	}
	g.MAC[0] = 0xff
	if n.Guest().MAC[0] == 0xff {
		t.Error("Guest() shares its MAC slice with the network")
	}
	n4, _ := frameNet(t, Config{Name: "v4only", DisableIPv6: true})
	if g := n4.Guest(); g.IPv6.IsValid() || g.GatewayIPv6.IsValid() || len(g.DNS) != 1 {
		t.Errorf("DisableIPv6: %+v", g)
	}
}

func TestTCPIPError(t *testing.T) {
	if tcpipErr("connect", nil) != nil {
		t.Fatal("nil tcpip.Error must give a nil error")
	}
	err := fmt.Errorf("wrapped: %w", tcpipErr("connect", &tcpip.ErrConnectionRefused{}))
	var te *TCPIPError
	if !errors.As(err, &te) {
		t.Fatalf("errors.As(%v, *TCPIPError) = false", err)
	}
	if _, ok := te.Err.(*tcpip.ErrConnectionRefused); !ok {
		t.Errorf("TCPIPError.Err = %T, want the original *tcpip.ErrConnectionRefused", te.Err)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Error("errors.Is(err, ECONNREFUSED) = false")
	}
	if errors.Is(tcpipErr("x", &tcpip.ErrUnknownProtocol{}), syscall.ECONNREFUSED) {
		t.Error("an unmapped error matched ECONNREFUSED")
	}
}
