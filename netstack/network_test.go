package netstack

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"

	"github.com/gosandbox/sandbox/netstack/netstacktest"
)

func mustRules(t testing.TB, rules ...string) []Rule {
	t.Helper()
	rs, err := ParseRules(rules...)
	if err != nil {
		t.Fatal(err)
	}
	return rs
}

func TestHostAliasTCP(t *testing.T) {
	echo := netstacktest.StartEcho(t, "127.0.0.1:0", false)
	t.Run("denied by default", func(t *testing.T) {
		n, g := newTestNetwork(t, Config{})
		_, err := g.dialTCP(netip.AddrPortFrom(n.Guest().GatewayIPv4, echo.Port()))
		if err == nil {
			t.Fatal("guest connected to the host's loopback without allow@host")
		}
		if !errors.Is(err, syscall.ECONNREFUSED) && !strings.Contains(err.Error(), "refused") {
			t.Errorf("dial error = %v, want connection refused", err)
		}
		if got := echo.Accepted.Load(); got != 0 {
			t.Errorf("echo server accepted %d connections, want 0", got)
		}
		if s := n.Stats(); s.FlowsDenied == 0 {
			t.Errorf("Stats().FlowsDenied = 0, want > 0")
		}
	})
	t.Run("allowed", func(t *testing.T) {
		n, g := newTestNetwork(t, Config{Rules: mustRules(t, "allow@host:tcp")})
		c, err := g.dialTCP(netip.AddrPortFrom(n.Guest().GatewayIPv4, echo.Port()))
		if err != nil {
			t.Fatalf("dial via host alias: %v", err)
		}
		defer c.Close()
		msg := bytes.Repeat([]byte("hello, host "), 10000)
		got, err := roundTrip(c, msg)
		if err != nil || !bytes.Equal(got, msg) {
			t.Fatalf("echo round trip: err=%v, equal=%v", err, bytes.Equal(got, msg))
		}
		// Half-close: the guest closes its write side, the echo server sees
		// EOF and closes, and the guest reads EOF.
		c.CloseWrite()
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		if rest, err := io.ReadAll(c); err != nil || len(rest) != 0 {
			t.Errorf("after CloseWrite: read %d bytes, err %v; want EOF", len(rest), err)
		}
		if got := echo.Accepted.Load(); got != 1 {
			t.Errorf("echo server accepted %d, want 1", got)
		}
	})
	t.Run("port rule", func(t *testing.T) {
		n, g := newTestNetwork(t, Config{Rules: mustRules(t, "allow@host:tcp:1-2")})
		before := echo.Accepted.Load()
		if c, err := g.dialTCP(netip.AddrPortFrom(n.Guest().GatewayIPv4, echo.Port())); err == nil {
			c.Close()
			t.Fatal("connected to a port outside the allowed range")
		}
		if echo.Accepted.Load() != before {
			t.Error("echo server saw a connection")
		}
	})
}

func TestIPv6HostLoopback(t *testing.T) {
	echo := netstacktest.StartEcho(t, "[::1]:0", false)
	n, g := newTestNetwork(t, Config{Rules: mustRules(t, "allow@host")})
	gw6 := n.Guest().GatewayIPv6
	if !gw6.IsValid() {
		t.Fatal("no IPv6 gateway")
	}
	c, err := g.dialTCP(netip.AddrPortFrom(gw6, echo.Port()))
	if err != nil {
		t.Fatalf("dial [gw6]:%d: %v", echo.Port(), err)
	}
	defer c.Close()
	if got, err := roundTrip(c, []byte("over ipv6")); err != nil || string(got) != "over ipv6" {
		t.Fatalf("round trip = %q, %v", got, err)
	}
	if a := c.LocalAddr().(*net.TCPAddr); a.IP.To4() != nil {
		t.Errorf("guest side used %v, want IPv6", a)
	}
}

func TestUDPEcho(t *testing.T) {
	uc, count := startUDPEcho(t, "127.0.0.1:0")
	port := uint16(uc.LocalAddr().(*net.UDPAddr).Port)
	t.Run("allowed", func(t *testing.T) {
		n, g := newTestNetwork(t, Config{Rules: mustRules(t, "allow@host:udp")})
		c, err := g.dialUDP(netip.AddrPortFrom(n.Guest().GatewayIPv4, port))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		for i := range 3 {
			msg := []byte{'u', 'd', 'p', byte('0' + i)}
			var got []byte
			var err error
			for try := 0; try < 5; try++ { // UDP: the first datagram may race ARP
				got, err = roundTripUDP(c, msg)
				if err == nil {
					break
				}
			}
			if err != nil || !bytes.Equal(got, msg) {
				t.Fatalf("datagram %d: got %q, %v", i, got, err)
			}
		}
	})
	t.Run("denied", func(t *testing.T) {
		before := count.Load()
		n, g := newTestNetwork(t, Config{})
		c, err := g.dialUDP(netip.AddrPortFrom(n.Guest().GatewayIPv4, port))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if _, err := roundTripUDP(c, []byte("x")); err == nil {
			t.Fatal("denied UDP flow got an answer")
		}
		if count.Load() != before {
			t.Error("UDP echo server received a datagram from a denied flow")
		}
	})
}

func roundTripUDP(c net.Conn, msg []byte) ([]byte, error) {
	c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := c.Write(msg); err != nil {
		return nil, err
	}
	buf := make([]byte, 65536)
	nr, err := c.Read(buf)
	return buf[:nr], err
}

func TestEgressPolicyMatrix(t *testing.T) {
	echo := netstacktest.StartEcho(t, "127.0.0.1:0", false)
	target := "127.0.0.1:" + strconv.Itoa(int(echo.Port()))
	cases := []struct {
		name  string
		rules []string
		def   Action
		dst   string
		allow bool
	}{
		{"public allowed by default", nil, 0, "198.51.100.7", true},
		{"public ipv6 allowed by default", nil, 0, "2001:db8::7", true},
		{"private denied by default", nil, 0, "10.1.2.3", false},
		{"cgnat denied by default", nil, 0, "100.64.1.1", false},
		{"ula denied by default", nil, 0, "fd12::1", false},
		{"metadata denied by default", nil, 0, "169.254.169.254", false},
		{"metadata not covered by link-local", []string{"allow@link-local"}, 0, "169.254.169.254", false},
		{"metadata allowed explicitly", []string{"allow@metadata"}, 0, "169.254.169.254", true},
		{"link-local allowed", []string{"allow@link-local"}, 0, "169.254.1.1", true},
		{"private allowed", []string{"allow@private"}, 0, "10.1.2.3", true},
		{"cidr allowed", []string{"allow@10.1.0.0/16:tcp"}, 0, "10.1.2.3", true},
		{"cidr other port", []string{"allow@10.1.0.0/16:tcp:22"}, 0, "10.1.2.3", false},
		{"udp rule does not allow tcp", []string{"allow@10.1.2.3:udp"}, 0, "10.1.2.3", false},
		{"first match wins", []string{"deny@198.51.100.0/24", "allow@public"}, 0, "198.51.100.7", false},
		{"deny public", []string{"deny@public"}, 0, "198.51.100.7", false},
		{"default deny", nil, Deny, "198.51.100.7", false},
		{"default allow", nil, Allow, "10.1.2.3", true},
		{"ipv6 cidr", []string{"allow@[fd12::/16]:tcp"}, 0, "fd12::1", true},
		{"ingress rule does not apply", []string{"allow:ingress@private"}, 0, "10.1.2.3", false},
		{"any direction", []string{"allow:any@private"}, 0, "10.1.2.3", true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dst := netip.MustParseAddr(tc.dst)
			d := &mapDialer{m: map[string]string{netip.AddrPortFrom(dst, 80).String(): target}}
			n, g := newTestNetwork(t, Config{Rules: mustRules(t, tc.rules...), DefaultEgress: tc.def, Dialer: d})
			_ = n
			before := echo.Accepted.Load()
			c, err := g.dialTCP(netip.AddrPortFrom(dst, 80))
			if tc.allow {
				if err != nil {
					t.Fatalf("dial %v: %v, want allowed", dst, err)
				}
				defer c.Close()
				if got, err := roundTrip(c, []byte("ping")); err != nil || string(got) != "ping" {
					t.Fatalf("round trip = %q, %v", got, err)
				}
				return
			}
			if err == nil {
				c.Close()
				t.Fatalf("dial %v succeeded, want refused", dst)
			}
			if a := d.attempts(); len(a) != 0 {
				t.Errorf("host dialer was asked for %v on a denied flow", a)
			}
			if echo.Accepted.Load() != before {
				t.Error("target accepted a connection on a denied flow")
			}
		})
	}
}

var (
	_ = dnsmessage.TypeA
	_ = gonet.DialUDP
	_ = header.IPv4MinimumSize
	_ = ipv4.ProtocolNumber
	_ = tcpip.AddrFrom4
	_ = runtime.NumGoroutine
	_ sync.Mutex
)

// TestReusedSourcePort opens a second connection from the same guest port
// right after one the gateway closed first (so the gateway holds it in
// TIME_WAIT): the gateway must answer the new SYN within one SYN
// retransmission, not once a minute-long TIME_WAIT ends (timeWait).
func TestReusedSourcePort(t *testing.T) {
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan struct{}, 2)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close() // the host, so the gateway, closes first
			accepted <- struct{}{}
		}
	}()
	n, g := newTestNetwork(t, Config{Rules: mustRules(t, "allow@host:tcp")})
	dst := fullAddr(netip.AddrPortFrom(n.Guest().GatewayIPv4, uint16(ln.Addr().(*net.TCPAddr).Port)))
	src := fullAddr(netip.AddrPortFrom(n.Guest().IPv4.Addr(), 40123))
	dial := func(i int) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		for {
			c, err := gonet.DialTCPWithBind(ctx, g.s, src, dst, ipv4.ProtocolNumber)
			if err != nil && strings.Contains(err.Error(), "in use") && ctx.Err() == nil {
				time.Sleep(5 * time.Millisecond) // the guest's own endpoint is still closing
				continue
			}
			if err != nil {
				t.Fatalf("connection %d from guest port %d: %v (a SYN for a 4-tuple in the gateway's TIME_WAIT is not answered)", i, src.Port, err)
			}
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			if b, err := io.ReadAll(c); err != nil || len(b) != 0 {
				t.Fatalf("connection %d: read %d bytes, %v; want EOF", i, len(b), err)
			}
			c.Close()
			return
		}
	}
	dial(1)
	dial(2)
	for i := 0; i < 2; i++ {
		<-accepted
	}
}
