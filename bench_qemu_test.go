package sandbox

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/gosandbox/sandbox/guest/agentclient"
	"github.com/gosandbox/sandbox/internal/kvmhost"
	"github.com/gosandbox/sandbox/internal/qemuguest"
	"github.com/gosandbox/sandbox/kernel"
	"github.com/gosandbox/sandbox/netstack"
)

// BenchmarkVsQEMU compares a sandbox with the same guest (kernel,
// initramfs, init and agent, memory, vCPUs) booted by QEMU -M microvm
// (package internal/qemuguest), in the same place: with hardware KVM, or
// inside the emulated KVM host, where absolute times mean little and the
// ratios are the result.
//
//   - FirstOutput: New(NoNetwork()) → the first byte of `echo hi`, against
//     qemuguest.Start → agent → the first byte of `echo hi`. QEMU boots the
//     bzImage (the default kernel's vmlinux has no PVH entry for QEMU to
//     load it directly); ours loads the cached vmlinux.
//   - Network: TCP between the guest's tcpblast and a listener on the
//     host's loopback: guest→host and host→guest throughput (measured on
//     the host: bytes over the time from accept to the end of the
//     transfer) and sequential connections per second (as the guest
//     counts them), through our netstack (allow@host, default MTU and MTU
//     1500) and through QEMU's user-mode network (slirp, MTU 1500).
//
// GOSANDBOX_BENCH_NET_BYTES sets the transfer size (default 64M);
// GOSANDBOX_BENCH_CONNS the connection count (default 200). In the emulated
// host both VMMs boot from copies of the kernel and initramfs in a local
// cache directory unless GOSANDBOX_BENCH_SHARED_CACHE is set (then ours
// maps them from the 9p-shared cache, as every other test there does).
func BenchmarkVsQEMU(b *testing.B) {
	// On the host (network and writable cache): the kernel. Inside the
	// outer VM the same call hits the shared cache.
	k, err := kernel.Default(context.Background())
	if err != nil {
		b.Fatal(err)
	}
	if kvmhost.Delegate(b, kvmhost.WithTimeout(60*time.Minute)) {
		return
	}
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		b.Fatalf("QEMU is needed for the side-by-side run (apt-get install qemu-system-x86): %v", err)
	}
	if os.Getenv(kvmhost.EnvInside) == "1" && os.Getenv("GOSANDBOX_BENCH_SHARED_CACHE") == "" {
		// In the emulated host the cache directory is the host's, shared
		// over 9p, and our VMM maps the vmlinux and the initramfs from it
		// (QEMU reads its copies once): each guest page fault would go
		// through 9p. On a real host the cache is a local disk; give both
		// VMMs local files (tmpfs) here too.
		b.Setenv("XDG_CACHE_HOME", b.TempDir())
		if k, err = kernel.Default(context.Background()); err != nil {
			b.Fatal(err)
		}
	}
	cacheDir, err := os.UserCacheDir()
	if err != nil {
		b.Fatal(err)
	}
	initrd, err := guestInitramfs(cacheDir)
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Minute)
	defer cancel()
	qcfg := qemuguest.Config{Kernel: k.Path, Initramfs: initrd, Memory: DefaultMemory, CPUs: DefaultCPUs}

	b.Run("FirstOutput", func(b *testing.B) {
		var ours, theirs, oursInit, theirsInit time.Duration
		var exits uint64
		for i := 0; i < b.N; i++ {
			start := time.Now()
			sb, err := New(ctx, NoNetwork())
			if err != nil {
				b.Fatal(err)
			}
			fb := &firstByteWriter{}
			p, err := sb.Exec(ctx, Cmd{Args: []string{"echo", "hi"}, Stdout: fb})
			if err != nil {
				b.Fatal(err)
			}
			if st, err := p.Wait(ctx); err != nil || !st.Success() || fb.at.IsZero() {
				b.Fatalf("echo hi in the sandbox: %v, %v, output seen: %v", st, err, !fb.at.IsZero())
			}
			ours += fb.at.Sub(start)
			oursInit += sb.Phases().ToInit()
			var n uint64
			for _, e := range sb.vm.Exits() {
				n += e
			}
			exits += n
			b.Logf("gosandbox boot %d: first output after %v, %d VM exits; %s", i, fb.at.Sub(start), n, sb.Phases())
			sb.Close()

			start = time.Now()
			g, err := qemuguest.Start(ctx, qcfg)
			if err != nil {
				b.Fatal(err)
			}
			fb = &firstByteWriter{}
			qp, err := g.Agent().Exec(ctx, agentclient.Cmd{Args: []string{"echo", "hi"}, Stdout: fb})
			if err != nil {
				g.Close()
				b.Fatal(err)
			}
			if st, err := qp.Wait(ctx); err != nil || !st.Success() || fb.at.IsZero() {
				g.Close()
				b.Fatalf("echo hi under QEMU: %v, %v, output seen: %v", st, err, !fb.at.IsZero())
			}
			ph := g.Phases()
			theirs += fb.at.Sub(start)
			theirsInit += ph.ToInit()
			b.Logf("qemu boot %d: first output after %v; init marker +%v, agent connected +%v", i, fb.at.Sub(start), ph.ToInit(), ph.ToAgentConnected())
			g.Close()
		}
		b.ReportMetric(ours.Seconds()/float64(b.N), "gosandbox-s")
		b.ReportMetric(theirs.Seconds()/float64(b.N), "qemu-s")
		b.ReportMetric(ours.Seconds()/theirs.Seconds(), "ratio")
		b.ReportMetric(oursInit.Seconds()/float64(b.N), "gosandbox-s-to-init")
		b.ReportMetric(theirsInit.Seconds()/float64(b.N), "qemu-s-to-init")
		b.ReportMetric(float64(exits)/float64(b.N), "vm-exits/boot")
	})

	b.Run("Network", func(b *testing.B) {
		size := int64(64 << 20)
		if s := os.Getenv("GOSANDBOX_BENCH_NET_BYTES"); s != "" {
			if size, err = parseBenchSize(s); err != nil {
				b.Fatalf("GOSANDBOX_BENCH_NET_BYTES: %v", err)
			}
		}
		conns := 200
		if s := os.Getenv("GOSANDBOX_BENCH_CONNS"); s != "" {
			if conns, err = strconv.Atoi(s); err != nil || conns < 1 {
				b.Fatalf("GOSANDBOX_BENCH_CONNS=%q: want a positive count", s)
			}
		}
		hs := newBlastServer(b)
		rules, err := netstack.ParseRules("allow@host")
		if err != nil {
			b.Fatal(err)
		}
		var ours, ours1500, theirs netFigures
		for i := 0; i < b.N; i++ {
			for _, v := range []struct {
				name string
				opt  Option
				into *netFigures
			}{
				{"gosandbox", NetworkRules("allow@host"), &ours},
				{"gosandbox-mtu1500", Network(netstack.Config{MTU: 1500, Rules: rules}), &ours1500},
			} {
				bctx, bcancel := context.WithTimeout(ctx, blastPhaseTimeout) // a boot that stalls fails with its console
				sb, err := New(bctx, v.opt)
				bcancel()
				if err != nil {
					b.Fatalf("%s: %v", v.name, err)
				}
				run := func(ctx context.Context, args ...string) (string, error) {
					res, err := sb.Run(ctx, args[0], args[1:]...)
					if err == nil && !res.Success() {
						err = fmt.Errorf("%q: exit %d, stderr %q", args, res.ExitCode, res.Stderr)
					}
					return string(res.Stdout), err
				}
				mtu, _ := runBounded(ctx, run, "sh", "-c", "cat /sys/class/net/eth*/mtu")
				boot := sb.NetworkStats()
				f, err := hs.measure(ctx, run, netstack.HostAlias, size, conns)
				st := sb.NetworkStats()
				b.Logf("%s (guest MTU %s): %s; network stats %+v (frames dropped before the transfers: %d)", v.name, strings.TrimSpace(mtu), f, st, boot.FramesDropped)
				sb.Close()
				if err != nil {
					b.Fatalf("%s: %v", v.name, err)
				}
				v.into.add(f)
			}

			cfg := qcfg
			cfg.UserNet = true
			bctx, bcancel := context.WithTimeout(ctx, blastPhaseTimeout)
			g, err := qemuguest.Start(bctx, cfg)
			bcancel()
			if err != nil {
				b.Fatalf("qemu: %v", err)
			}
			run := func(ctx context.Context, args ...string) (string, error) {
				var out, errb bytes.Buffer
				st, err := g.Agent().Run(ctx, agentclient.Cmd{Args: args, Stdout: &out, Stderr: &errb})
				if err == nil && !st.Success() {
					err = fmt.Errorf("%q: %v, stderr %q", args, st, errb.String())
				}
				return out.String(), err
			}
			mtu, _ := runBounded(ctx, run, "sh", "-c", "cat /sys/class/net/eth*/mtu")
			f, err := hs.measure(ctx, run, qemuguest.UserNetGateway, size, conns)
			b.Logf("qemu (slirp, guest MTU %s): %s", strings.TrimSpace(mtu), f)
			g.Close()
			if err != nil {
				b.Fatalf("qemu: %v", err)
			}
			theirs.add(f)
		}
		n := float64(b.N)
		for _, r := range []struct {
			name string
			f    netFigures
		}{{"gosandbox", ours}, {"gosandbox-mtu1500", ours1500}, {"qemu", theirs}} {
			b.ReportMetric(r.f.g2h/n, r.name+"-g2h-MB/s")
			b.ReportMetric(r.f.h2g/n, r.name+"-h2g-MB/s")
			b.ReportMetric(r.f.conns/n, r.name+"-conn/s")
		}
		for _, r := range []struct {
			name string
			f    netFigures
		}{{"", ours}, {"-mtu1500", ours1500}} {
			b.ReportMetric(r.f.g2h/theirs.g2h, "ratio"+r.name+"-g2h")
			b.ReportMetric(r.f.h2g/theirs.h2g, "ratio"+r.name+"-h2g")
			b.ReportMetric(r.f.conns/theirs.conns, "ratio"+r.name+"-conn")
		}
	})
}

// netFigures are one network run's results (sums over runs when added).
type netFigures struct {
	g2h, h2g   float64 // MB/s measured on the host
	g2hGuest   float64 // MB/s as the guest measured it
	h2gGuest   float64
	conns      float64 // connections per second, as the guest counted
	connsHost  int     // connections the host accepted
	durG2H     time.Duration
	durH2G     time.Duration
	durConnect time.Duration
}

func (f *netFigures) add(o netFigures) {
	f.g2h += o.g2h
	f.h2g += o.h2g
	f.conns += o.conns
}

func (f netFigures) String() string {
	return fmt.Sprintf("guest→host %.1f MB/s (guest saw %.1f; %v), host→guest %.1f MB/s (guest saw %.1f; %v), %.0f connections/s (host accepted %d; %v)",
		f.g2h, f.g2hGuest, f.durG2H.Round(time.Millisecond), f.h2g, f.h2gGuest, f.durH2G.Round(time.Millisecond),
		f.conns, f.connsHost, f.durConnect.Round(time.Millisecond))
}

// blastServer is the host side of tcpblast: a sink (guest sends), a
// source (guest receives) and an accept-and-close listener, on loopback.
type blastServer struct {
	sink, source, accept *net.TCPListener
}

func newBlastServer(b *testing.B) *blastServer {
	listen := func() *net.TCPListener {
		ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { ln.Close() })
		return ln
	}
	return &blastServer{sink: listen(), source: listen(), accept: listen()}
}

type transfer struct {
	n   int64
	d   time.Duration
	err error
}

// serveOne accepts one connection on ln and runs fn on it, timed from the
// accept; the deadline bounds a guest that never connects.
func serveOne(ln *net.TCPListener, fn func(*net.TCPConn) (int64, error)) <-chan transfer {
	ch := make(chan transfer, 1)
	ln.SetDeadline(time.Now().Add(blastPhaseTimeout))
	go func() {
		c, err := ln.AcceptTCP()
		if err != nil {
			ch <- transfer{err: err}
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(blastPhaseTimeout))
		start := time.Now()
		n, err := fn(c)
		ch <- transfer{n: n, d: time.Since(start), err: err}
	}()
	return ch
}

type zeros struct{}

func (zeros) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}

// blastPhaseTimeout bounds each tcpblast run and the host side of it.
const blastPhaseTimeout = 8 * time.Minute

// runBounded runs a guest command for at most blastPhaseTimeout.
func runBounded(ctx context.Context, run func(ctx context.Context, args ...string) (string, error), args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, blastPhaseTimeout)
	defer cancel()
	return run(ctx, args...)
}

// measure runs the three tcpblast modes with run (a command in the guest)
// against the server, reached from the guest at host.
func (s *blastServer) measure(ctx context.Context, run func(ctx context.Context, args ...string) (string, error), host string, size int64, conns int) (netFigures, error) {
	var f netFigures
	// Each phase is bounded, so that a stalled transfer fails and says where.
	phase := func(args ...string) (string, error) { return runBounded(ctx, run, args...) }
	addr := func(ln *net.TCPListener) string {
		return net.JoinHostPort(host, strconv.Itoa(ln.Addr().(*net.TCPAddr).Port))
	}
	guestFigures := func(out string) (float64, float64, error) {
		fs := strings.Fields(out)
		if len(fs) != 2 {
			return 0, 0, fmt.Errorf("tcpblast printed %q", out)
		}
		n, err1 := strconv.ParseFloat(fs[0], 64)
		sec, err2 := strconv.ParseFloat(fs[1], 64)
		if err := errors.Join(err1, err2); err != nil || sec <= 0 {
			return 0, 0, fmt.Errorf("tcpblast printed %q", out)
		}
		return n, sec, nil
	}

	// Guest → host.
	got := serveOne(s.sink, func(c *net.TCPConn) (int64, error) { return io.Copy(io.Discard, c) })
	out, err := phase("tcpblast", "send", addr(s.sink), strconv.FormatInt(size, 10))
	if err != nil {
		s.sink.SetDeadline(time.Now())
		<-got
		return f, fmt.Errorf("guest→host: %w", err)
	}
	t := <-got
	if t.err != nil || t.n != size {
		return f, fmt.Errorf("guest→host: the host received %d of %d bytes: %v", t.n, size, t.err)
	}
	f.g2h, f.durG2H = float64(t.n)/1e6/t.d.Seconds(), t.d
	if n, sec, err := guestFigures(out); err == nil {
		f.g2hGuest = n / 1e6 / sec
	} else {
		return f, err
	}

	// Host → guest: write size bytes, close the write side, and wait for
	// the guest to close its end after reading everything.
	got = serveOne(s.source, func(c *net.TCPConn) (int64, error) {
		n, err := io.CopyN(c, zeros{}, size)
		if err != nil {
			return n, err
		}
		if err := c.CloseWrite(); err != nil {
			return n, err
		}
		_, err = io.Copy(io.Discard, c)
		return n, err
	})
	out, err = phase("tcpblast", "recv", addr(s.source))
	if err != nil {
		s.source.SetDeadline(time.Now())
		<-got
		return f, fmt.Errorf("host→guest: %w", err)
	}
	t = <-got
	n, sec, err := guestFigures(out)
	if err != nil {
		return f, err
	}
	if t.err != nil || t.n != size || int64(n) != size {
		return f, fmt.Errorf("host→guest: the host sent %d of %d bytes (%v), the guest read %d", t.n, size, t.err, int64(n))
	}
	f.h2g, f.durH2G, f.h2gGuest = float64(t.n)/1e6/t.d.Seconds(), t.d, n/1e6/sec

	// Sequential connections.
	accepted := make(chan int, 1)
	s.accept.SetDeadline(time.Now().Add(blastPhaseTimeout))
	go func() {
		k := 0
		for ; k < conns; k++ {
			c, err := s.accept.Accept()
			if err != nil {
				break
			}
			c.Close()
		}
		accepted <- k
	}()
	out, err = phase("tcpblast", "connect", addr(s.accept), strconv.Itoa(conns))
	if err != nil {
		s.accept.SetDeadline(time.Now())
		<-accepted
		return f, fmt.Errorf("connect: %w", err)
	}
	f.connsHost = <-accepted
	cn, csec, err := guestFigures(out)
	if err != nil {
		return f, err
	}
	if int(cn) != conns || f.connsHost != conns {
		return f, fmt.Errorf("connect: the guest made %d connections, the host accepted %d, want %d", int(cn), f.connsHost, conns)
	}
	f.conns, f.durConnect = cn/csec, time.Duration(csec*float64(time.Second))
	return f, nil
}

// parseBenchSize reads a byte count with an optional K, M or G (binary)
// suffix.
func parseBenchSize(s string) (int64, error) {
	mult := int64(1)
	switch {
	case strings.HasSuffix(s, "K"):
		mult, s = 1<<10, strings.TrimSuffix(s, "K")
	case strings.HasSuffix(s, "M"):
		mult, s = 1<<20, strings.TrimSuffix(s, "M")
	case strings.HasSuffix(s, "G"):
		mult, s = 1<<30, strings.TrimSuffix(s, "G")
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n <= 0 || n > (1<<40)/mult {
		return 0, fmt.Errorf("%q is not a byte count such as 64M", s)
	}
	return n * mult, nil
}
