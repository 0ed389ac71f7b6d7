package netstack

import (
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
	"gvisor.dev/gvisor/pkg/waiter"
)

// handleTCP terminates one guest TCP connection attempt. It runs in a
// goroutine the forwarder starts per SYN.
func (n *Network) handleTCP(r *tcp.ForwarderRequest) {
	if !n.enter() {
		r.Complete(true)
		return
	}
	defer n.leave()
	id := r.ID()
	dst, port := addrOf(id.LocalAddress), id.LocalPort
	if port == 53 {
		// All DNS goes to the gateway's resolver, whatever server the guest
		// picked, so blocking and pinning cannot be bypassed.
		if !n.conns.acquire() {
			r.Complete(true)
			return
		}
		defer n.conns.release()
		c, ok := n.acceptTCP(r)
		if !ok {
			return
		}
		stop := n.closeOnDone(c)
		defer stop()
		n.dns.serveTCP(c)
		return
	}
	target, ok := n.egressTarget(TCP, dst, port)
	if !ok {
		r.Complete(true) // RST: connection refused
		return
	}
	if !n.conns.acquire() {
		r.Complete(true)
		return
	}
	defer n.conns.release()
	ctx, cancel := context.WithTimeout(n.ctx, n.dialTimeout)
	hc, err := n.dialer.DialContext(ctx, "tcp", target.String())
	cancel()
	if err != nil {
		n.log.Debug("tcp dial failed", "target", target, "err", err)
		r.Complete(true)
		return
	}
	gc, ok := n.acceptTCP(r)
	if !ok {
		hc.Close()
		return
	}
	n.splice(gc, hc)
}

func (n *Network) acceptTCP(r *tcp.ForwarderRequest) (*gonet.TCPConn, bool) {
	var wq waiter.Queue
	ep, err := r.CreateEndpoint(&wq)
	if err != nil {
		r.Complete(true)
		return nil, false
	}
	r.Complete(false)
	ep.SocketOptions().SetKeepAlive(true)
	return gonet.NewTCPConn(&wq, ep), true
}

// halfCloser is a connection whose write side can be shut down alone.
type halfCloser interface {
	net.Conn
	CloseWrite() error
}

// splice copies guest↔host until both directions end, with half-close,
// idle timeout and the bandwidth limits. It closes both connections.
func (n *Network) splice(guest, host net.Conn) {
	var once sync.Once
	closeBoth := func() {
		once.Do(func() {
			guest.Close()
			host.Close()
		})
	}
	stop := context.AfterFunc(n.ctx, closeBoth)
	defer stop()
	defer closeBoth()

	var last atomic.Int64
	last.Store(time.Now().UnixNano())
	idle := newIdleTimer(n.tcpIdle, &last, closeBoth)
	defer idle.stop()

	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		n.copyHalf(host, guest, n.egressBytes, &n.stats.egressBytes, &last, closeBoth)
	}()
	n.copyHalf(guest, host, n.ingressBytes, &n.stats.ingressBytes, &last, closeBoth)
	wg.Wait()
}

// copyHalf copies src to dst, then shuts dst's write side. An error other
// than EOF aborts both directions.
func (n *Network) copyHalf(dst, src net.Conn, bucket *tokenBucket, counter *atomic.Uint64, last *atomic.Int64, abort func()) {
	bp := n.bufs.Get().(*[]byte)
	defer n.bufs.Put(bp)
	buf := *bp
	for {
		nr, rerr := src.Read(buf)
		if nr > 0 {
			last.Store(time.Now().UnixNano())
			if bucket.wait(n.ctx, nr) != nil {
				abort()
				return
			}
			if _, werr := dst.Write(buf[:nr]); werr != nil {
				abort()
				return
			}
			counter.Add(uint64(nr))
			last.Store(time.Now().UnixNano())
		}
		if rerr != nil {
			if errors.Is(rerr, io.EOF) {
				if hc, ok := dst.(halfCloser); ok {
					hc.CloseWrite()
					return
				}
			}
			abort()
			return
		}
	}
}

// idleTimer calls fire once the time stored in last is older than d.
type idleTimer struct {
	t *time.Timer
}

func newIdleTimer(d time.Duration, last *atomic.Int64, fire func()) *idleTimer {
	it := &idleTimer{}
	var check func()
	check = func() {
		since := time.Since(time.Unix(0, last.Load()))
		if since >= d {
			fire()
			return
		}
		it.t.Reset(d - since)
	}
	it.t = time.AfterFunc(d, check)
	return it
}

func (it *idleTimer) stop() { it.t.Stop() }

// handleUDP handles the first datagram of a new guest UDP flow. It runs
// inline in the stack's receive path and must not block.
func (n *Network) handleUDP(r *udp.ForwarderRequest) bool {
	id := r.ID()
	dst, port := addrOf(id.LocalAddress), id.LocalPort
	if port == 53 {
		if !n.conns.acquire() {
			return true // dropped; the guest retries
		}
		c, ok := n.udpEndpoint(r)
		if !ok {
			n.conns.release()
			return true
		}
		if !n.goTracked(func() {
			defer n.conns.release()
			stop := n.closeOnDone(c)
			defer stop()
			n.dns.serveUDPFlow(c)
		}) {
			c.Close()
			n.conns.release()
		}
		return true
	}
	target, ok := n.egressTarget(UDP, dst, port)
	if !ok {
		return false // ICMP port unreachable
	}
	if !n.conns.acquire() {
		return false
	}
	ctx, cancel := context.WithTimeout(n.ctx, n.dialTimeout)
	hc, err := n.dialer.DialContext(ctx, "udp", target.String())
	cancel()
	if err != nil {
		n.conns.release()
		return false
	}
	gc, ok := n.udpEndpoint(r)
	if !ok {
		hc.Close()
		n.conns.release()
		return true
	}
	if !n.goTracked(func() {
		defer n.conns.release()
		n.relayUDP(gc, hc)
	}) {
		gc.Close()
		hc.Close()
		n.conns.release()
	}
	return true
}

func (n *Network) udpEndpoint(r *udp.ForwarderRequest) (*gonet.UDPConn, bool) {
	var wq waiter.Queue
	ep, err := r.CreateEndpoint(&wq)
	if err != nil {
		return nil, false
	}
	return gonet.NewUDPConn(&wq, ep), true
}

// relayUDP copies datagrams between a guest flow and a connected host socket
// until the flow is idle for the UDP idle timeout.
func (n *Network) relayUDP(guest, host net.Conn) {
	var once sync.Once
	closeBoth := func() {
		once.Do(func() {
			guest.Close()
			host.Close()
		})
	}
	stop := context.AfterFunc(n.ctx, closeBoth)
	defer stop()
	defer closeBoth()
	var last atomic.Int64
	last.Store(time.Now().UnixNano())
	idle := newIdleTimer(n.udpIdle, &last, closeBoth)
	defer idle.stop()

	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		n.copyDatagrams(host, guest, n.egressBytes, &n.stats.egressBytes, &last, closeBoth)
	}()
	n.copyDatagrams(guest, host, n.ingressBytes, &n.stats.ingressBytes, &last, closeBoth)
	wg.Wait()
}

func (n *Network) copyDatagrams(dst, src net.Conn, bucket *tokenBucket, counter *atomic.Uint64, last *atomic.Int64, abort func()) {
	defer abort()
	buf := make([]byte, 65536)
	for {
		nr, err := src.Read(buf)
		if err != nil {
			if isRefused(err) {
				continue // ICMP unreachable for an earlier datagram; keep the flow
			}
			return
		}
		last.Store(time.Now().UnixNano())
		if bucket.wait(n.ctx, nr) != nil {
			return
		}
		if _, err := dst.Write(buf[:nr]); err != nil && !isRefused(err) {
			return
		}
		counter.Add(uint64(nr))
	}
}

func isRefused(err error) bool { return errors.Is(err, syscall.ECONNREFUSED) }
