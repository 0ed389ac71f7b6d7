package netstack

import (
	"bytes"
	"context"
	"errors"
	"net"
	"net/netip"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/gosandbox/sandbox/netstack/netstacktest"
)

func TestTokenBucket(t *testing.T) {
	clk := newFakeClock()
	b := newBucket(RateLimit{Rate: 1000, Burst: 1000}, clk)
	ctx := context.Background()
	if err := b.wait(ctx, 500); err != nil || clk.total() != 0 {
		t.Fatalf("within burst: err %v, slept %v; want no wait", err, clk.total())
	}
	if err := b.wait(ctx, 1500); err != nil {
		t.Fatal(err)
	}
	if got := clk.total(); got != time.Second {
		t.Errorf("slept %v for 1000 tokens of debt at 1000/s, want 1s", got)
	}
	if b.taken.Load() != 2000 || b.waits.Load() != 1 {
		t.Errorf("taken %d waits %d, want 2000 and 1", b.taken.Load(), b.waits.Load())
	}
	// tryTake polices: nothing left until the clock moves.
	if b.tryTake(1) {
		t.Error("tryTake succeeded on an empty bucket")
	}
	clk.Sleep(ctx, 10*time.Millisecond)
	if !b.tryTake(10) {
		t.Error("tryTake failed after a refill of 10 tokens")
	}
	if newBucket(RateLimit{}, clk) != nil {
		t.Error("zero RateLimit should mean no bucket")
	}
	var nb *tokenBucket
	if nb.wait(ctx, 1<<30) != nil || !nb.tryTake(1<<30) {
		t.Error("nil bucket must not limit")
	}
}

func TestBandwidthLimit(t *testing.T) {
	echo := netstacktest.StartEcho(t, "127.0.0.1:0", false)
	const rate = 64 << 10
	const size = 512 << 10
	for _, limited := range []bool{true, false} {
		name := "limited"
		lim := RateLimit{Rate: rate, Burst: rate}
		if !limited {
			name = "under the burst"
			lim = RateLimit{Rate: rate, Burst: 4 * size}
		}
		t.Run(name, func(t *testing.T) {
			clk := newFakeClock()
			n, g := newTestNetwork(t, Config{
				Rules:  mustRules(t, "allow@host"),
				Clock:  clk,
				Limits: Limits{EgressBytes: lim, IngressBytes: lim},
			})
			c, err := g.dialTCP(netip.AddrPortFrom(n.Guest().GatewayIPv4, echo.Port()))
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			msg := bytes.Repeat([]byte{0xa5}, size)
			c.SetDeadline(time.Now().Add(30 * time.Second))
			got, err := roundTrip(c, msg)
			if err != nil || !bytes.Equal(got, msg) {
				t.Fatalf("round trip of %d bytes: %v", size, err)
			}
			for dir, b := range map[string]*tokenBucket{"egress": n.egressBytes, "ingress": n.ingressBytes} {
				if b.taken.Load() != size {
					t.Errorf("%s bucket counted %d bytes, want %d", dir, b.taken.Load(), size)
				}
				if limited && b.waits.Load() == 0 {
					t.Errorf("%s bucket never waited for a refill", dir)
				}
				if !limited && b.waited.Load() != 0 {
					t.Errorf("%s waited %v under its burst, want 0", dir, time.Duration(b.waited.Load()))
				}
			}
			// Both directions share the clock: the transfer over the burst
			// needs at least (size - burst) / rate seconds of refills.
			if min := time.Duration(float64(size-rate) / rate * float64(time.Second)); limited && clk.total() < min-time.Millisecond {
				t.Errorf("clock advanced %v for refills, want >= %v", clk.total(), min)
			}
			if !limited && clk.total() != 0 {
				t.Errorf("clock advanced %v under the burst, want 0", clk.total())
			}
			s := n.Stats()
			if s.EgressBytes != size {
				t.Errorf("Stats().EgressBytes = %d, want %d", s.EgressBytes, size)
			}
		})
	}
}

func TestPacketRateLimit(t *testing.T) {
	echo := netstacktest.StartEcho(t, "127.0.0.1:0", false)
	clk := newFakeClock()
	n, g := newTestNetwork(t, Config{
		Rules:  mustRules(t, "allow@host"),
		Clock:  clk,
		Limits: Limits{EgressPackets: RateLimit{Rate: 100, Burst: 5}},
	})
	c, err := g.dialTCP(netip.AddrPortFrom(n.Guest().GatewayIPv4, echo.Port()))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for range 10 {
		if _, err := roundTrip(c, []byte("tick")); err != nil {
			t.Fatal(err)
		}
	}
	if got, want := n.egressPkts.taken.Load(), n.Stats().FramesFromGuest; got != want || got < 20 {
		t.Errorf("packet bucket counted %d frames, Stats counted %d; want equal and >= 20", got, want)
	}
	if n.egressPkts.waits.Load() == 0 {
		t.Error("more frames than the burst went through without waiting for refills")
	}
}

func TestConnectionLimit(t *testing.T) {
	echo := netstacktest.StartEcho(t, "127.0.0.1:0", false)
	n, g := newTestNetwork(t, Config{Rules: mustRules(t, "allow@host"), Limits: Limits{MaxConnections: 2}})
	dst := netip.AddrPortFrom(n.Guest().GatewayIPv4, echo.Port())
	var conns []net.Conn
	for i := range 2 {
		c, err := g.dialTCP(dst)
		if err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
		defer c.Close()
		if _, err := roundTrip(c, []byte("x")); err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
	}
	if c, err := g.dialTCP(dst); err == nil {
		c.Close()
		t.Fatal("third connection accepted with MaxConnections 2")
	}
	if got := echo.Accepted.Load(); got != 2 {
		t.Errorf("echo server accepted %d, want 2", got)
	}
	if s := n.Stats(); s.FlowsOverLimit != 1 || s.ActiveFlows != 2 {
		t.Errorf("Stats() = over limit %d, active %d; want 1 and 2", s.FlowsOverLimit, s.ActiveFlows)
	}
	conns[0].Close()
	deadline := time.Now().Add(10 * time.Second)
	for n.Stats().ActiveFlows != 1 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	c, err := g.dialTCP(dst)
	if err != nil {
		t.Fatalf("after closing one connection: %v", err)
	}
	c.Close()
}

func TestConfigValidation(t *testing.T) {
	for _, cfg := range []Config{
		{},
		{Name: "x", MTU: 100},
		{Name: "x", MTU: 70000},
		{Name: "x", Limits: Limits{MaxConnections: MaxConnectionsLimit + 1}},
		{Name: "x", Rules: []Rule{{}}},
		{Name: "x", DefaultEgress: 7},
		{Name: "x", DNS: DNSConfig{Servers: []netip.AddrPort{{}}}},
	} {
		n, err := New(cfg)
		if err == nil {
			n.Close()
			t.Errorf("New(%+v) succeeded, want an error", cfg)
			continue
		}
		if !errors.Is(err, ErrInvalidConfig) {
			t.Errorf("New(%+v) = %v, want ErrInvalidConfig", cfg, err)
		}
	}
}

func TestCloseReleasesEverything(t *testing.T) {
	echo := netstacktest.StartEcho(t, "127.0.0.1:0", false)
	udpSrv, _ := startUDPEcho(t, "127.0.0.1:0")
	res := startResolver(t, testZone)
	pool, err := NewPool(DefaultIPv4Pool, DefaultIPv6Pool)
	if err != nil {
		t.Fatal(err)
	}
	run := func() {
		n, err := New(Config{
			Name: "leak", Pool: pool, Rules: mustRules(t, "allow@host"),
			DNS: DNSConfig{Servers: []netip.AddrPort{res.addr}},
		})
		if err != nil {
			t.Fatal(err)
		}
		g := attachGuest(t, n)
		gw := n.Guest().GatewayIPv4
		// Leave flows of every kind open when Close runs.
		c, err := g.dialTCP(netip.AddrPortFrom(gw, echo.Port()))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := roundTrip(c, []byte("x")); err != nil {
			t.Fatal(err)
		}
		u, err := g.dialUDP(netip.AddrPortFrom(gw, uint16(udpSrv.LocalAddr().(*net.UDPAddr).Port)))
		if err != nil {
			t.Fatal(err)
		}
		for try := 0; try < 5; try++ {
			if _, err = roundTripUDP(u, []byte("u")); err == nil {
				break
			}
		}
		if err != nil {
			t.Fatal(err)
		}
		if _, err := g.lookup("svc.test"); err != nil {
			t.Fatal(err)
		}
		accepted := guestListen(t, g, netip.AddrPortFrom(n.Guest().IPv4.Addr(), 80))
		p, err := n.Publish(PortMapping{GuestPort: 80})
		if err != nil {
			t.Fatal(err)
		}
		hc, err := net.Dial("tcp", p.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		hc.SetDeadline(time.Now().Add(10 * time.Second))
		buf := make([]byte, 5)
		if _, err := hc.Read(buf); err != nil || accepted.Load() != 1 {
			t.Fatalf("published port: %v", err)
		}
		if pool.InUse() != 1 {
			t.Errorf("pool in use = %d, want 1", pool.InUse())
		}
		if err := n.Close(); err != nil {
			t.Fatal(err)
		}
		if err := n.Close(); err != nil {
			t.Errorf("second Close() = %v", err)
		}
		g.stop()
		c.Close()
		u.Close()
		hc.Close()
		if err := n.DeliverFrame(make([]byte, 60)); !errors.Is(err, ErrClosed) {
			t.Errorf("DeliverFrame after Close = %v, want ErrClosed", err)
		}
		if _, err := n.Publish(PortMapping{GuestPort: 1}); !errors.Is(err, ErrClosed) {
			t.Errorf("Publish after Close = %v, want ErrClosed", err)
		}
		if pool.InUse() != 0 {
			t.Errorf("pool in use after Close = %d, want 0", pool.InUse())
		}
	}
	run() // warm up lazily started runtime and gVisor goroutines
	base := settledGoroutines(0)
	run()
	if got := settledGoroutines(base); got > base {
		buf := make([]byte, 1<<20)
		nb := runtime.Stack(buf, true)
		t.Errorf("goroutines after Close = %d, before = %d\n%s", got, base, filterStacks(string(buf[:nb])))
	}
}

// settledGoroutines waits up to 10 s for the goroutine count to drop to
// target (or to stop changing when target is 0) and returns it.
func settledGoroutines(target int) int {
	deadline := time.Now().Add(10 * time.Second)
	last := runtime.NumGoroutine()
	for time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
		runtime.GC()
		n := runtime.NumGoroutine()
		if target > 0 && n <= target || target == 0 && n == last {
			return n
		}
		last = n
	}
	return runtime.NumGoroutine()
}

func filterStacks(s string) string {
	var out []string
	for g := range strings.SplitSeq(s, "\n\n") {
		if strings.Contains(g, "netstack") || strings.Contains(g, "gvisor") {
			out = append(out, g)
		}
	}
	return strings.Join(out, "\n\n")
}
