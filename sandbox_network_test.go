package sandbox

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gosandbox/sandbox/netstack"
)

// fetch is a guest shell command that prints the body at url with
// python's urllib, or fails.
func fetch(url string) string {
	return "python3 -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=20).read().decode())' " + url
}

// hexIPv4 is a as /proc/net/route prints it (little-endian hex).
func hexIPv4(a netip.Addr) string {
	b := a.As4()
	return fmt.Sprintf("%02X%02X%02X%02X", b[3], b[2], b[1], b[0])
}

// hexIPv6 is a as /proc/net/if_inet6 prints it.
func hexIPv6(a netip.Addr) string {
	b := a.As16()
	return fmt.Sprintf("%x", b[:])
}

// TestNetworkSandbox checks the network end to end in VMs: a guest's wget
// of an HTTP server on the host's loopback is refused by default (the
// server accepts nothing) and served with allow@host; a published port
// serves a guest HTTP server to the host; the guest interface has its
// IPv4 /30 and IPv6 /64 and reaches the host over both; a sandbox with
// NoNetwork has only lo.
func TestNetworkSandbox(t *testing.T) {
	mode, spec, ok := imageTestSetup(t)
	if !ok {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()

	// The host service: counts the connections it accepts.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var accepted atomic.Int64
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "hello from the host\n")
	}), ConnState: func(c net.Conn, s http.ConnState) {
		if s == http.StateNew {
			accepted.Add(1)
		}
	}}
	go srv.Serve(l)
	defer srv.Close()
	port := l.Addr().(*net.TCPAddr).Port
	l6, err := net.Listen("tcp", "[::1]:0")
	if err != nil {
		t.Fatalf("no IPv6 loopback on this host: %v", err)
	}
	srv6 := &http.Server{Handler: srv.Handler, ConnState: srv.ConnState}
	go srv6.Serve(l6)
	defer srv6.Close()
	port6 := l6.Addr().(*net.TCPAddr).Port

	boot := func(t *testing.T, opts ...Option) *Sandbox { return bootSmall(t, mode, opts...) }
	sh := func(t *testing.T, sb *Sandbox, script string) (string, int) {
		t.Helper()
		res, err := sb.Run(ctx, "sh", "-c", script)
		if err != nil {
			t.Fatalf("%q: %v", script, err)
		}
		return string(res.Stdout) + string(res.Stderr), res.ExitCode
	}

	t.Run("default policy and published port", func(t *testing.T) {
		sb := boot(t, FromImage(spec.Python), Name("net-default"), PublishPort("127.0.0.1:0", 8080))
		g := sb.net.Guest()
		out, code := sh(t, sb, "cat /proc/net/fib_trie /proc/net/if_inet6 /proc/net/route")
		if code != 0 || !strings.Contains(out, g.IPv4.Addr().String()) || !strings.Contains(out, "eth0\t00000000\t"+hexIPv4(g.GatewayIPv4)) {
			t.Errorf("interface and default route (want %s via %s):\n%s", g.IPv4, g.GatewayIPv4, out)
		}
		if g.IPv6.IsValid() && !strings.Contains(out, hexIPv6(g.IPv6.Addr())) {
			t.Errorf("no IPv6 address %s:\n%s", g.IPv6, out)
		}
		url := fmt.Sprintf("http://%s:%d/", g.GatewayIPv4, port)
		out, code = sh(t, sb, fetch(url))
		if code == 0 || strings.Contains(out, "hello from the host") {
			t.Errorf("default policy let the guest reach the host's loopback (exit %d): %s", code, out)
		}
		if n := accepted.Load(); n != 0 {
			t.Errorf("the host service accepted %d connections under the default policy", n)
		}
		if st := sb.NetworkStats(); st.FlowsDenied == 0 {
			t.Errorf("no denied flow counted: %+v", st)
		}
		// A guest HTTP server, published on the host.
		if out, code := sh(t, sb, "mkdir /tmp/www && echo published > /tmp/www/index.html && cd /tmp/www && (python3 -m http.server 8080 >/dev/null 2>&1 &)"); code != 0 {
			t.Fatalf("httpd: %s", out)
		}
		ports := sb.Ports()
		if len(ports) != 1 {
			t.Fatalf("Ports() = %v", ports)
		}
		var body []byte
		for i := 0; i < 50; i++ {
			resp, err := http.Get("http://" + ports[0].Addr().String() + "/index.html")
			if err == nil {
				body, _ = io.ReadAll(resp.Body)
				resp.Body.Close()
				if resp.StatusCode == 200 {
					break
				}
			}
			time.Sleep(200 * time.Millisecond)
		}
		if string(body) != "published\n" {
			t.Errorf("published port served %q", body)
		}
	})

	t.Run("allow host", func(t *testing.T) {
		before := accepted.Load()
		sb := boot(t, FromImage(spec.Python), Name("net-host"),
			NetworkRules(fmt.Sprintf("allow@host:tcp:%d", port), fmt.Sprintf("allow@host:tcp:%d", port6)))
		out, code := sh(t, sb, fetch(fmt.Sprintf("http://%s:%d/", netstack.HostAlias, port)))
		if code != 0 || out != "hello from the host\n" {
			t.Errorf("with allow@host: exit %d, %q", code, out)
		}
		if accepted.Load() == before {
			t.Error("the host service saw no connection")
		}
		// IPv6 end to end: the gateway's IPv6 address is the host's ::1.
		g := sb.net.Guest()
		if !g.IPv6.IsValid() {
			t.Fatal("the sandbox has no IPv6 address")
		}
		out, code = sh(t, sb, fetch(fmt.Sprintf("http://[%s]:%d/", g.GatewayIPv6, port6)))
		if code != 0 || out != "hello from the host\n" {
			t.Errorf("over IPv6 with allow@host: exit %d, %q", code, out)
		}
	})

	t.Run("no network", func(t *testing.T) {
		sb := boot(t, NoNetwork(), Name("net-none"))
		out, code := sh(t, sb, "ls /sys/class/net")
		if code != 0 || strings.Fields(out)[0] != "lo" || len(strings.Fields(out)) != 1 {
			t.Errorf("interfaces without a network: %q", out)
		}
	})
}
