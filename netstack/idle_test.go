package netstack

import (
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/gosandbox/sandbox/netstack/netstacktest"
)

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("gave up waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestIdleTimeouts(t *testing.T) {
	echo := netstacktest.StartEcho(t, "127.0.0.1:0", false)
	uc, _ := startUDPEcho(t, "127.0.0.1:0")
	n, g := newTestNetwork(t, Config{
		Rules:          mustRules(t, "allow@host"),
		TCPIdleTimeout: 100 * time.Millisecond,
		UDPIdleTimeout: 100 * time.Millisecond,
	})
	gw := n.Guest().GatewayIPv4
	c, err := g.dialTCP(netip.AddrPortFrom(gw, echo.Port()))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := roundTrip(c, []byte("x")); err != nil {
		t.Fatal(err)
	}
	// An idle connection is closed by the network: the guest reads EOF or a
	// reset, never more data.
	c.SetReadDeadline(time.Now().Add(15 * time.Second))
	if b, err := io.ReadAll(c); len(b) != 0 || isTimeout(err) {
		t.Fatalf("idle TCP connection: read %q, %v; want it closed", b, err)
	}
	u, err := g.dialUDP(netip.AddrPortFrom(gw, uint16(uc.LocalAddr().(*net.UDPAddr).Port)))
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	for try := 0; try < 5; try++ {
		if _, err = roundTripUDP(u, []byte("u")); err == nil {
			break
		}
	}
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, "idle flows to end", func() bool { return n.Stats().ActiveFlows == 0 })
}

func isTimeout(err error) bool {
	ne, ok := err.(net.Error)
	return ok && ne.Timeout()
}

func TestPortsFromConfigAndDefaultIngress(t *testing.T) {
	n, g := newTestNetwork(t, Config{Ports: []PortMapping{{GuestPort: 8080}}})
	accepted := guestListen(t, g, netip.AddrPortFrom(n.Guest().IPv4.Addr(), 8080))
	ports := n.Ports()
	if len(ports) != 1 || ports[0].m.GuestPort != 8080 {
		t.Fatalf("Ports() = %v, want the one from Config.Ports", ports)
	}
	p := ports[0]
	c, err := net.Dial("tcp", p.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Read(make([]byte, 5)); err != nil || accepted.Load() != 1 {
		t.Fatalf("read %v, guest accepted %d", err, accepted.Load())
	}

	nd, gd := newTestNetwork(t, Config{DefaultIngress: Deny, Ports: []PortMapping{{GuestPort: 8080}}})
	acceptedD := guestListen(t, gd, netip.AddrPortFrom(nd.Guest().IPv4.Addr(), 8080))
	p = nd.Ports()[0]
	c2, err := net.Dial("tcp", p.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	c2.SetDeadline(time.Now().Add(10 * time.Second))
	if b, _ := io.ReadAll(c2); len(b) != 0 || acceptedD.Load() != 0 {
		t.Errorf("DefaultIngress Deny: read %q, guest accepted %d", b, acceptedD.Load())
	}
}
