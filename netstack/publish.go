package netstack

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
)

// PortMapping publishes a guest port on the host.
type PortMapping struct {
	// Proto is TCP or UDP; ProtoAny means TCP.
	Proto Proto
	// Host is the host address to listen on. The zero Addr means 127.0.0.1;
	// port 0 picks a free port (see Published.Addr).
	Host netip.AddrPort
	// GuestPort is the port the guest listens on, on its interface address
	// (services bound only to the guest's 127.0.0.1 are not reachable).
	GuestPort uint16
	// GuestIPv6 connects to the guest's IPv6 address instead of its IPv4 one.
	GuestIPv6 bool
}

// Published is a published port. Close stops listening.
type Published struct {
	n     *Network
	m     PortMapping
	addr  netip.AddrPort
	close func() error
	once  sync.Once
}

// Addr returns the host address the port listens on.
func (p *Published) Addr() netip.AddrPort { return p.addr }

// Close stops listening. Connections already accepted continue until they
// end or the network closes. It is safe to call twice.
func (p *Published) Close() error {
	p.n.mu.Lock()
	delete(p.n.published, p)
	p.n.mu.Unlock()
	return p.closeListener()
}

func (p *Published) closeListener() error {
	var err error
	p.once.Do(func() { err = p.close() })
	return err
}

// Publish starts a host listener whose connections are forwarded to the
// guest's port through the stack. Each connection is checked against the
// ingress rules with the connecting peer's address and the guest port.
func (n *Network) Publish(m PortMapping) (*Published, error) {
	if m.Proto == ProtoAny {
		m.Proto = TCP
	}
	if m.Proto != TCP && m.Proto != UDP {
		return nil, &ConfigError{Field: "PortMapping.Proto", Reason: "must be TCP or UDP"}
	}
	if m.GuestPort == 0 {
		return nil, &ConfigError{Field: "PortMapping.GuestPort", Reason: "must be 1..65535"}
	}
	if m.GuestIPv6 && !n.g6.IsValid() {
		return nil, &ConfigError{Field: "PortMapping.GuestIPv6", Reason: "the network has no IPv6"}
	}
	host := m.Host
	if !host.Addr().IsValid() {
		host = netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), host.Port())
	}
	if !n.enter() {
		return nil, ErrClosed
	}
	defer n.leave()
	p := &Published{n: n, m: m}
	var lc net.ListenConfig
	switch m.Proto {
	case TCP:
		ln, err := lc.Listen(n.ctx, "tcp", host.String())
		if err != nil {
			return nil, fmt.Errorf("netstack: publish guest port %d on %v: %w", m.GuestPort, host, err)
		}
		p.addr = ln.Addr().(*net.TCPAddr).AddrPort()
		p.close = ln.Close
		if !n.goTracked(func() { p.acceptTCP(ln) }) {
			ln.Close()
			return nil, ErrClosed
		}
	case UDP:
		pc, err := lc.ListenPacket(n.ctx, "udp", host.String())
		if err != nil {
			return nil, fmt.Errorf("netstack: publish guest port %d/udp on %v: %w", m.GuestPort, host, err)
		}
		uc := pc.(*net.UDPConn)
		p.addr = uc.LocalAddr().(*net.UDPAddr).AddrPort()
		p.close = uc.Close
		if !n.goTracked(func() { p.serveUDP(uc) }) {
			uc.Close()
			return nil, ErrClosed
		}
	}
	n.mu.Lock()
	n.published[p] = struct{}{}
	n.mu.Unlock()
	return p, nil
}

func (p *Published) guestAddr() (tcpip.FullAddress, tcpip.NetworkProtocolNumber) {
	if p.m.GuestIPv6 {
		return tcpip.FullAddress{NIC: nicID, Addr: tcpip.AddrFrom16(p.n.g6.As16()), Port: p.m.GuestPort}, ipv6.ProtocolNumber
	}
	return tcpip.FullAddress{NIC: nicID, Addr: tcpip.AddrFrom4(p.n.g4.As4()), Port: p.m.GuestPort}, ipv4.ProtocolNumber
}

// allowIngress checks a peer against the ingress rules.
func (p *Published) allowIngress(peer netip.Addr) bool {
	f := flow{dir: Ingress, proto: p.m.Proto, addr: peer.Unmap(), port: p.m.GuestPort}
	if p.n.pol.decide(f) != Allow {
		p.n.stats.flowsDenied.Add(1)
		return false
	}
	p.n.stats.flowsAllowed.Add(1)
	return true
}

func (p *Published) acceptTCP(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		if !p.n.goTracked(func() { p.forwardTCP(c) }) {
			c.Close()
			return
		}
	}
}

func (p *Published) forwardTCP(c net.Conn) {
	n := p.n
	peer := c.RemoteAddr().(*net.TCPAddr).AddrPort().Addr()
	if !p.allowIngress(peer) {
		c.Close()
		return
	}
	if !n.conns.acquire() {
		c.Close()
		return
	}
	defer n.conns.release()
	ctx, cancel := context.WithTimeout(n.ctx, n.dialTimeout)
	addr, proto := p.guestAddr()
	gc, err := gonet.DialContextTCP(ctx, n.stack, addr, proto)
	cancel()
	if err != nil {
		n.log.Debug("published port: guest refused", "port", p.m.GuestPort, "err", err)
		c.Close()
		return
	}
	n.splice(gc, c)
}

// udpSession is one host peer of a published UDP port.
type udpSession struct {
	guest *gonet.UDPConn
	last  atomic.Int64
}

func (p *Published) serveUDP(uc *net.UDPConn) {
	n := p.n
	var mu sync.Mutex
	sessions := make(map[netip.AddrPort]*udpSession)
	defer func() {
		mu.Lock()
		for _, s := range sessions {
			s.guest.Close()
		}
		mu.Unlock()
	}()
	buf := make([]byte, 65536)
	for {
		nr, peer, err := uc.ReadFromUDPAddrPort(buf)
		if err != nil {
			return
		}
		mu.Lock()
		s := sessions[peer]
		mu.Unlock()
		if s == nil {
			if !p.allowIngress(peer.Addr()) || !n.conns.acquire() {
				continue
			}
			addr, proto := p.guestAddr()
			gc, err := gonet.DialUDP(n.stack, nil, &addr, proto)
			if err != nil {
				n.conns.release()
				continue
			}
			s = &udpSession{guest: gc}
			s.last.Store(time.Now().UnixNano())
			mu.Lock()
			sessions[peer] = s
			mu.Unlock()
			if !n.goTracked(func() {
				defer n.conns.release()
				defer func() {
					mu.Lock()
					delete(sessions, peer)
					mu.Unlock()
					gc.Close()
				}()
				stop := n.closeOnDone(gc)
				defer stop()
				idle := newIdleTimer(n.udpIdle, &s.last, func() { gc.Close() })
				defer idle.stop()
				rb := make([]byte, 65536)
				for {
					nr, err := gc.Read(rb)
					if err != nil {
						return
					}
					s.last.Store(time.Now().UnixNano())
					if n.egressBytes.wait(n.ctx, nr) != nil {
						return
					}
					uc.WriteToUDPAddrPort(rb[:nr], peer)
					n.stats.egressBytes.Add(uint64(nr))
				}
			}) {
				gc.Close()
				n.conns.release()
				return
			}
		}
		s.last.Store(time.Now().UnixNano())
		if n.ingressBytes.wait(n.ctx, nr) != nil {
			return
		}
		s.guest.Write(buf[:nr])
		n.stats.ingressBytes.Add(uint64(nr))
	}
}
