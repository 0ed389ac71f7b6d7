package netstack

import (
	"bytes"
	"io"
	"net"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
)

// guestListen serves a greeting on the guest's port and counts connections.
func guestListen(t *testing.T, g *testGuest, ap netip.AddrPort) *atomic.Int64 {
	t.Helper()
	proto := ipv4.ProtocolNumber
	if ap.Addr().Is6() {
		proto = ipv6.ProtocolNumber
	}
	ln, err := gonet.ListenTCP(g.s, fullAddr(ap), proto)
	if err != nil {
		t.Fatal(err)
	}
	var accepted atomic.Int64
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted.Add(1)
			go func() {
				defer c.Close()
				c.Write([]byte("hello from the guest\n"))
				io.Copy(io.Discard, c)
			}()
		}
	}()
	t.Cleanup(func() { ln.Close(); <-done })
	return &accepted
}

func TestPublishTCP(t *testing.T) {
	n, g := newTestNetwork(t, Config{})
	accepted := guestListen(t, g, netip.AddrPortFrom(n.Guest().IPv4.Addr(), 8080))
	p, err := n.Publish(PortMapping{GuestPort: 8080})
	if err != nil {
		t.Fatal(err)
	}
	if !p.Addr().Addr().IsLoopback() {
		t.Errorf("published on %v, want 127.0.0.1 by default", p.Addr())
	}
	c, err := net.DialTimeout("tcp", p.Addr().String(), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, 64)
	nr, err := io.ReadAtLeast(c, buf, len("hello from the guest\n"))
	if err != nil || string(buf[:nr]) != "hello from the guest\n" {
		t.Fatalf("read %q, %v", buf[:nr], err)
	}
	if accepted.Load() != 1 {
		t.Errorf("guest accepted %d, want 1", accepted.Load())
	}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	p.Close()
	if c2, err := net.DialTimeout("tcp", p.Addr().String(), time.Second); err == nil {
		c2.Close()
		t.Error("published port still listening after Close")
	}
}

func TestPublishIPv6Guest(t *testing.T) {
	n, g := newTestNetwork(t, Config{})
	accepted := guestListen(t, g, netip.AddrPortFrom(n.Guest().IPv6.Addr(), 9090))
	p, err := n.Publish(PortMapping{GuestPort: 9090, GuestIPv6: true, Host: netip.MustParseAddrPort("[::1]:0")})
	if err != nil {
		t.Skipf("no IPv6 loopback: %v", err)
	}
	c, err := net.DialTimeout("tcp", p.Addr().String(), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, 64)
	if _, err := io.ReadAtLeast(c, buf, 5); err != nil {
		t.Fatal(err)
	}
	if accepted.Load() != 1 {
		t.Errorf("guest accepted %d, want 1", accepted.Load())
	}
}

func TestPublishIngressDenied(t *testing.T) {
	n, g := newTestNetwork(t, Config{Rules: mustRules(t, "deny:ingress@loopback:tcp:8080")})
	accepted := guestListen(t, g, netip.AddrPortFrom(n.Guest().IPv4.Addr(), 8080))
	p, err := n.Publish(PortMapping{GuestPort: 8080})
	if err != nil {
		t.Fatal(err)
	}
	c, err := net.DialTimeout("tcp", p.Addr().String(), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if b, err := io.ReadAll(c); len(b) != 0 {
		t.Errorf("denied connection read %q, %v; want nothing", b, err)
	}
	if accepted.Load() != 0 {
		t.Errorf("guest accepted %d connections, want 0", accepted.Load())
	}
	if n.Stats().FlowsDenied == 0 {
		t.Error("Stats().FlowsDenied = 0")
	}
}

func TestPublishUDP(t *testing.T) {
	n, g := newTestNetwork(t, Config{})
	gc, err := g.dialUDPListen(netip.AddrPortFrom(n.Guest().IPv4.Addr(), 5353))
	if err != nil {
		t.Fatal(err)
	}
	defer gc.Close()
	go func() {
		buf := make([]byte, 2048)
		for {
			nr, from, err := gc.ReadFrom(buf)
			if err != nil {
				return
			}
			gc.WriteTo(append([]byte("echo:"), buf[:nr]...), from)
		}
	}()
	p, err := n.Publish(PortMapping{Proto: UDP, GuestPort: 5353})
	if err != nil {
		t.Fatal(err)
	}
	c, err := net.Dial("udp", p.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	got, err := roundTripUDP(c, []byte("hi"))
	if err != nil || !bytes.Equal(got, []byte("echo:hi")) {
		t.Fatalf("published UDP round trip = %q, %v", got, err)
	}
}

func (g *testGuest) dialUDPListen(ap netip.AddrPort) (*gonet.UDPConn, error) {
	fa := fullAddr(ap)
	return gonet.DialUDP(g.s, &fa, nil, g.proto(ap.Addr()))
}

func TestPublishValidation(t *testing.T) {
	n, _ := newTestNetwork(t, Config{DisableIPv6: true})
	for _, m := range []PortMapping{{GuestPort: 0}, {Proto: ICMP, GuestPort: 1}, {GuestPort: 1, GuestIPv6: true}} {
		if _, err := n.Publish(m); err == nil {
			t.Errorf("Publish(%+v) succeeded, want a ConfigError", m)
		}
	}
}
