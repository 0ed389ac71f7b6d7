package netstack

import (
	"io"
	"net"
	"net/netip"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"

	"github.com/gosandbox/sandbox/netstack/netstacktest"
)

const benchChunk = 64 << 10

// BenchmarkTCPGuestToHost measures bulk TCP from the guest stack through the
// network to a sink on the host's loopback (via the host alias).
func BenchmarkTCPGuestToHost(b *testing.B) {
	for _, tc := range []struct {
		mtu int
		tso bool
	}{{1500, false}, {1500, true}, {DefaultMTU, false}} {
		name := "mtu=" + strconv.Itoa(tc.mtu)
		if tc.tso {
			name += "/tso"
		}
		b.Run(name, func(b *testing.B) {
			sink := netstacktest.StartEcho(b, "127.0.0.1:0", true)
			n, g := newTestNetwork(b, Config{MTU: tc.mtu, Rules: mustRules(b, "allow@host")})
			if tc.tso {
				g.useGuestTSO()
			}
			c, err := g.dialTCP(netip.AddrPortFrom(n.Guest().GatewayIPv4, sink.Port()))
			if err != nil {
				b.Fatal(err)
			}
			defer c.Close()
			buf := make([]byte, benchChunk)
			b.SetBytes(benchChunk)
			b.ReportAllocs()
			b.ResetTimer()
			for range b.N {
				if _, err := c.Write(buf); err != nil {
					b.Fatal(err)
				}
			}
			want := int64(b.N) * benchChunk
			for sink.Received.Load() < want {
				time.Sleep(100 * time.Microsecond)
			}
		})
	}
}

// BenchmarkTCPHostToGuest measures bulk TCP from a host client through a
// published port to a sink in the guest stack.
func BenchmarkTCPHostToGuest(b *testing.B) {
	for _, tc := range []struct {
		mtu int
		gso bool
	}{{1500, false}, {1500, true}, {DefaultMTU, false}} {
		name := "mtu=" + strconv.Itoa(tc.mtu)
		if tc.gso {
			name += "/gso"
		}
		b.Run(name, func(b *testing.B) {
			n, g := newTestNetwork(b, Config{MTU: tc.mtu})
			if tc.gso {
				g.enableGSO()
			}
			ln, err := gonet.ListenTCP(g.s, fullAddr(netip.AddrPortFrom(n.Guest().IPv4.Addr(), 7000)), ipv4.ProtocolNumber)
			if err != nil {
				b.Fatal(err)
			}
			defer ln.Close()
			var received atomic.Int64
			go func() {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				defer c.Close()
				buf := make([]byte, 256<<10)
				for {
					nr, err := c.Read(buf)
					received.Add(int64(nr))
					if err != nil {
						return
					}
				}
			}()
			p, err := n.Publish(PortMapping{GuestPort: 7000})
			if err != nil {
				b.Fatal(err)
			}
			c, err := net.Dial("tcp", p.Addr().String())
			if err != nil {
				b.Fatal(err)
			}
			defer c.Close()
			buf := make([]byte, benchChunk)
			b.SetBytes(benchChunk)
			b.ReportAllocs()
			b.ResetTimer()
			for range b.N {
				if _, err := c.Write(buf); err != nil {
					b.Fatal(err)
				}
			}
			want := int64(b.N) * benchChunk
			for received.Load() < want {
				time.Sleep(100 * time.Microsecond)
			}
		})
	}
}

// BenchmarkTCPConnect measures guest connection setup to a host server: SYN
// through the stack, policy check, host dial, one byte each way, close.
func BenchmarkTCPConnect(b *testing.B) {
	echo := netstacktest.StartEcho(b, "127.0.0.1:0", false)
	n, g := newTestNetwork(b, Config{Rules: mustRules(b, "allow@host"), Limits: Limits{MaxConnections: MaxConnectionsLimit}})
	dst := netip.AddrPortFrom(n.Guest().GatewayIPv4, echo.Port())
	one := []byte{1}
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		c, err := g.dialTCP(dst)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := roundTrip(c, one); err != nil {
			b.Fatal(err)
		}
		c.Close()
	}
	b.StopTimer()
	_ = io.EOF
}
