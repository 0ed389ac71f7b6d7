package netstack

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"

	"github.com/gosandbox/sandbox/netstack/netstacktest"
)

var testZone = map[string][]netip.Addr{
	"svc.test.":     {netip.MustParseAddr("198.51.100.7"), netip.MustParseAddr("2001:db8::7")},
	"other.test.":   {netip.MustParseAddr("198.51.100.8")},
	"a.cdn.test.":   {netip.MustParseAddr("198.51.100.9")},
	"blocked.test.": {netip.MustParseAddr("198.51.100.10")},
	"rebind.test.":  {netip.MustParseAddr("10.0.0.5")},
	"loop.test.":    {netip.MustParseAddr("127.0.0.1")},
	"meta.test.":    {netip.MustParseAddr("169.254.169.254")},
	"mixed.test.":   {netip.MustParseAddr("198.51.100.11"), netip.MustParseAddr("192.168.1.1")},
}

func isNXDOMAIN(err error) bool {
	var de *net.DNSError
	return errors.As(err, &de) && de.IsNotFound
}

func TestDNSForwarding(t *testing.T) {
	res := startResolver(t, testZone)
	n, g := newTestNetwork(t, Config{
		Rules: mustRules(t, "deny@blocked.test", "deny@*.evil.test"),
		DNS:   DNSConfig{Servers: []netip.AddrPort{res.addr}},
	})
	t.Run("resolves through the upstream", func(t *testing.T) {
		got, err := g.lookup("svc.test")
		if err != nil {
			t.Fatal(err)
		}
		slices.SortFunc(got, netip.Addr.Compare)
		want := testZone["svc.test."]
		if !slices.Equal(got, want) {
			t.Errorf("lookup(svc.test) = %v, want %v", got, want)
		}
	})
	t.Run("blocked name is NXDOMAIN and never forwarded", func(t *testing.T) {
		_, err := g.lookup("blocked.test")
		if !isNXDOMAIN(err) {
			t.Errorf("lookup(blocked.test) error = %v, want NXDOMAIN", err)
		}
		_, err = g.lookup("x.evil.test")
		if !isNXDOMAIN(err) {
			t.Errorf("lookup(x.evil.test) error = %v, want NXDOMAIN", err)
		}
		if res.wasAsked("blocked.test.") || res.wasAsked("x.evil.test.") {
			t.Error("a blocked name reached the upstream resolver")
		}
		if n.Stats().DNSBlocked < 2 {
			t.Errorf("Stats().DNSBlocked = %d, want >= 2", n.Stats().DNSBlocked)
		}
	})
	t.Run("unknown name", func(t *testing.T) {
		if _, err := g.lookup("nope.test"); !isNXDOMAIN(err) {
			t.Errorf("lookup(nope.test) = %v, want NXDOMAIN", err)
		}
	})
	t.Run("rebind protection", func(t *testing.T) {
		for _, name := range []string{"rebind.test", "loop.test", "meta.test"} {
			if addrs, err := g.lookup(name); !isNXDOMAIN(err) {
				t.Errorf("lookup(%s) = %v, %v; want NXDOMAIN", name, addrs, err)
			}
			if !res.wasAsked(name + ".") {
				t.Errorf("%s was not forwarded", name)
			}
		}
		got, err := g.lookup("mixed.test")
		if err != nil || !slices.Equal(got, []netip.Addr{netip.MustParseAddr("198.51.100.11")}) {
			t.Errorf("lookup(mixed.test) = %v, %v; want only the public address", got, err)
		}
		if n.Stats().DNSRebindDrops < 4 {
			t.Errorf("Stats().DNSRebindDrops = %d, want >= 4", n.Stats().DNSRebindDrops)
		}
	})
	t.Run("host alias", func(t *testing.T) {
		got, err := g.lookup(HostAlias)
		if err != nil {
			t.Fatal(err)
		}
		cfg := n.Guest()
		if !slices.Contains(got, cfg.GatewayIPv4) || !slices.Contains(got, cfg.GatewayIPv6) {
			t.Errorf("lookup(%s) = %v, want the gateway addresses", HostAlias, got)
		}
	})
	t.Run("over TCP", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		got, err := g.resolver(true).LookupNetIP(ctx, "ip4", "other.test")
		if err != nil || !slices.Equal(got, testZone["other.test."]) {
			t.Errorf("TCP lookup(other.test) = %v, %v", got, err)
		}
	})
	t.Run("intercepted when sent elsewhere", func(t *testing.T) {
		// A query to another server's port 53 is answered by the gateway's
		// resolver, so blocking applies.
		c, err := g.dialUDP(netip.MustParseAddrPort("192.0.2.53:53"))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		q := buildQuery(t, "blocked.test.", dnsmessage.TypeA)
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Write(q); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 4096)
		nr, err := c.Read(buf)
		if err != nil {
			t.Fatal(err)
		}
		var m dnsmessage.Message
		if err := m.Unpack(buf[:nr]); err != nil || m.RCode != dnsmessage.RCodeNameError {
			t.Errorf("answer rcode = %v, %v; want NXDOMAIN", m.RCode, err)
		}
	})
}

func buildQuery(t testing.TB, name string, typ dnsmessage.Type) []byte {
	t.Helper()
	m := dnsmessage.Message{
		Header:    dnsmessage.Header{ID: 4242, RecursionDesired: true},
		Questions: []dnsmessage.Question{{Name: dnsmessage.MustNewName(name), Type: typ, Class: dnsmessage.ClassINET}},
	}
	b, err := m.Pack()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestDNSRebindAllowedByAddressRule(t *testing.T) {
	res := startResolver(t, testZone)
	_, g := newTestNetwork(t, Config{
		Rules: mustRules(t, "allow@10.0.0.0/8"),
		DNS:   DNSConfig{Servers: []netip.AddrPort{res.addr}},
	})
	got, err := g.lookup("rebind.test")
	if err != nil || !slices.Equal(got, testZone["rebind.test."]) {
		t.Errorf("lookup(rebind.test) = %v, %v; want 10.0.0.5 (allowed by an address rule)", got, err)
	}
	if _, err := g.lookup("loop.test"); !isNXDOMAIN(err) {
		t.Errorf("lookup(loop.test) = %v; want NXDOMAIN (loopback not allowed)", err)
	}
}

func TestDNSPinning(t *testing.T) {
	res := startResolver(t, testZone)
	echo := netstacktest.StartEcho(t, "127.0.0.1:0", false)
	target := "127.0.0.1:" + strconv.Itoa(int(echo.Port()))
	d := &mapDialer{m: map[string]string{
		"198.51.100.7:443": target, "198.51.100.8:443": target, "198.51.100.9:443": target,
	}}
	n, g := newTestNetwork(t, Config{
		Rules:         mustRules(t, "allow@svc.test:tcp:443", "allow@*.cdn.test"),
		DefaultEgress: Deny,
		DNS:           DNSConfig{Servers: []netip.AddrPort{res.addr}},
		Dialer:        d,
	})
	svc := netip.MustParseAddrPort("198.51.100.7:443")
	try := func(ap netip.AddrPort) error {
		c, err := g.dialTCP(ap)
		if err != nil {
			return err
		}
		defer c.Close()
		_, err = roundTrip(c, []byte("x"))
		return err
	}
	if err := try(svc); err == nil {
		t.Fatal("connected to svc.test's address before resolving it")
	}
	if _, err := g.lookup("svc.test"); err != nil {
		t.Fatal(err)
	}
	if err := try(svc); err != nil {
		t.Fatalf("after resolving svc.test, dial %v: %v", svc, err)
	}
	if err := try(netip.MustParseAddrPort("198.51.100.8:443")); err == nil {
		t.Error("connected to other.test's address, which svc.test never resolved to")
	}
	if _, err := g.lookup("other.test"); err != nil {
		t.Fatal(err)
	}
	if err := try(netip.MustParseAddrPort("198.51.100.8:443")); err == nil {
		t.Error("other.test resolved but no rule allows it; connection went through")
	}
	if _, err := g.lookup("a.cdn.test"); err != nil {
		t.Fatal(err)
	}
	if err := try(netip.MustParseAddrPort("198.51.100.9:443")); err != nil {
		t.Errorf("*.cdn.test rule: %v", err)
	}
	if got := echo.Accepted.Load(); got != 2 {
		t.Errorf("target accepted %d connections, want 2", got)
	}
	if n.pins.len() == 0 {
		t.Error("no pins recorded")
	}
}

func TestDNSNoUpstream(t *testing.T) {
	_, g := newTestNetwork(t, Config{})
	_, err := g.lookup("svc.test")
	var de *net.DNSError
	if !errors.As(err, &de) || de.IsNotFound {
		t.Errorf("lookup without upstream = %v, want a server failure", err)
	}
}

func TestParseResolvConf(t *testing.T) {
	got := parseResolvConf([]byte("# c\nnameserver 127.0.0.53\nsearch x\nnameserver ::1\nnameserver fe80::1%eth0\nnameserver bogus\n"))
	want := []netip.AddrPort{netip.MustParseAddrPort("127.0.0.53:53"), netip.MustParseAddrPort("[::1]:53")}
	if !slices.Equal(got, want) {
		t.Errorf("parseResolvConf = %v, want %v", got, want)
	}
}

func TestDNSFailoverAndTimeout(t *testing.T) {
	res := startResolver(t, testZone)
	// A resolver that reads queries and never answers.
	silent, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	var silentGot atomic.Int64
	go func() {
		buf := make([]byte, 4096)
		for {
			if _, _, err := silent.ReadFrom(buf); err != nil {
				return
			}
			silentGot.Add(1)
		}
	}()
	// A closed port: the kernel refuses at once.
	closed, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closedAddr := closed.LocalAddr().(*net.UDPAddr).AddrPort()
	closed.Close()
	silentAddr := silent.LocalAddr().(*net.UDPAddr).AddrPort()

	t.Run("failover", func(t *testing.T) {
		_, g := newTestNetwork(t, Config{DNS: DNSConfig{
			Servers:      []netip.AddrPort{closedAddr, silentAddr, res.addr},
			QueryTimeout: 200 * time.Millisecond,
		}})
		got, err := g.lookup("other.test")
		if err != nil || !slices.Equal(got, testZone["other.test."]) {
			t.Fatalf("lookup through failover = %v, %v", got, err)
		}
		if silentGot.Load() == 0 {
			t.Error("the silent resolver was never tried")
		}
	})
	t.Run("timeout gives SERVFAIL", func(t *testing.T) {
		n, g := newTestNetwork(t, Config{DNS: DNSConfig{Servers: []netip.AddrPort{silentAddr}, QueryTimeout: 100 * time.Millisecond}})
		c, err := g.dialUDP(netip.AddrPortFrom(n.Guest().GatewayIPv4, 53))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := c.Write(buildQuery(t, "svc.test.", dnsmessage.TypeA)); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 4096)
		nr, err := c.Read(buf)
		if err != nil {
			t.Fatalf("no answer after the upstream timed out: %v", err)
		}
		var m dnsmessage.Message
		if err := m.Unpack(buf[:nr]); err != nil || m.RCode != dnsmessage.RCodeServerFailure || m.ID != 4242 {
			t.Errorf("answer rcode %v id %d (%v), want SERVFAIL for id 4242", m.RCode, m.ID, err)
		}
	})
}
