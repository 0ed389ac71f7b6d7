package netstack

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"time"

	"golang.org/x/net/dns/dnsmessage"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
)

const (
	maxDNSInFlight  = 64
	dnsTCPIdle      = 10 * time.Second
	upstreamUDPSize = 1232
	hostAliasTTL    = 60
)

// dnsServers returns the upstream resolvers of cfg.
func dnsServers(cfg DNSConfig) ([]netip.AddrPort, error) {
	if len(cfg.Servers) > 0 {
		out := make([]netip.AddrPort, 0, len(cfg.Servers))
		for _, s := range cfg.Servers {
			if !s.IsValid() || s.Addr().Zone() != "" {
				return nil, &ConfigError{Field: "DNS.Servers", Reason: s.String() + " is not an IP:port"}
			}
			if s.Port() == 0 {
				s = netip.AddrPortFrom(s.Addr(), 53)
			}
			out = append(out, netip.AddrPortFrom(s.Addr().Unmap(), s.Port()))
		}
		return out, nil
	}
	path := cfg.ResolvConf
	if path == "" {
		path = "/etc/resolv.conf"
	}
	data, err := os.ReadFile(path)
	if err != nil {
		// No resolver: DNS answers SERVFAIL, everything else still works.
		return nil, nil
	}
	return parseResolvConf(data), nil
}

// parseResolvConf returns the nameserver lines of a resolv.conf file.
func parseResolvConf(data []byte) []netip.AddrPort {
	var out []netip.AddrPort
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 2 || f[0] != "nameserver" {
			continue
		}
		a, err := netip.ParseAddr(f[1])
		if err != nil || a.Zone() != "" {
			continue
		}
		out = append(out, netip.AddrPortFrom(a.Unmap(), 53))
	}
	return out
}

// dnsServer is the gateway's resolver: it validates guest queries, answers
// blocked names and the host alias itself, forwards the rest and filters the
// answers (rebind protection) while recording DNS pins.
type dnsServer struct {
	n       *Network
	servers []netip.AddrPort
	timeout time.Duration
	rebind  bool
	sem     chan struct{}

	mu        sync.Mutex
	closers   []io.Closer
	closedAll bool
}

func (d *dnsServer) start() error {
	d.sem = make(chan struct{}, maxDNSInFlight)
	n := d.n
	type gw struct {
		addr  tcpip.Address
		proto tcpip.NetworkProtocolNumber
	}
	gws := []gw{{tcpip.AddrFrom4(n.gw4.As4()), ipv4.ProtocolNumber}}
	if n.gw6.IsValid() {
		gws = append(gws, gw{tcpip.AddrFrom16(n.gw6.As16()), ipv6.ProtocolNumber})
	}
	for _, g := range gws {
		fa := tcpip.FullAddress{NIC: nicID, Addr: g.addr, Port: 53}
		uc, err := gonet.DialUDP(n.stack, &fa, nil, g.proto)
		if err != nil {
			return err
		}
		d.track(uc)
		if !n.goTracked(func() { d.serveUDP(uc) }) {
			return ErrClosed
		}
		tl, err := gonet.ListenTCP(n.stack, fa, g.proto)
		if err != nil {
			return err
		}
		d.track(tl)
		if !n.goTracked(func() { d.acceptTCP(tl) }) {
			return ErrClosed
		}
	}
	return nil
}

func (d *dnsServer) track(c io.Closer) {
	d.mu.Lock()
	d.closers = append(d.closers, c)
	d.mu.Unlock()
}

func (d *dnsServer) close() {
	d.mu.Lock()
	cs := d.closers
	d.closers = nil
	d.mu.Unlock()
	for _, c := range cs {
		c.Close()
	}
}

// serveUDP answers queries sent to the gateway's port 53.
func (d *dnsServer) serveUDP(c *gonet.UDPConn) {
	buf := make([]byte, 65536)
	for {
		nr, from, err := c.ReadFrom(buf)
		if err != nil {
			return
		}
		select {
		case d.sem <- struct{}{}:
		default:
			continue // too many queries in flight: drop, the guest retries
		}
		q := append([]byte(nil), buf[:nr]...)
		if !d.n.goTracked(func() {
			defer func() { <-d.sem }()
			if resp := d.answer(q, false); resp != nil {
				c.WriteTo(resp, from)
			}
		}) {
			<-d.sem
			return
		}
	}
}

// serveUDPFlow answers queries of one intercepted guest UDP flow to another
// server's port 53.
func (d *dnsServer) serveUDPFlow(c *gonet.UDPConn) {
	defer c.Close()
	buf := make([]byte, 65536)
	for {
		c.SetReadDeadline(time.Now().Add(d.n.udpIdle))
		nr, err := c.Read(buf)
		if err != nil {
			return
		}
		if resp := d.answer(buf[:nr], false); resp != nil {
			c.Write(resp)
		}
	}
}

func (d *dnsServer) acceptTCP(l *gonet.TCPListener) {
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		if !d.n.goTracked(func() {
			stop := d.n.closeOnDone(c)
			defer stop()
			d.serveTCP(c)
		}) {
			c.Close()
			return
		}
	}
}

// serveTCP answers length-prefixed queries on one TCP connection.
func (d *dnsServer) serveTCP(c net.Conn) {
	defer c.Close()
	var lenb [2]byte
	for {
		c.SetReadDeadline(time.Now().Add(dnsTCPIdle))
		if _, err := io.ReadFull(c, lenb[:]); err != nil {
			return
		}
		q := make([]byte, binary.BigEndian.Uint16(lenb[:]))
		if _, err := io.ReadFull(c, q); err != nil {
			return
		}
		resp := d.answer(q, true)
		if resp == nil {
			return
		}
		out := make([]byte, 2+len(resp))
		binary.BigEndian.PutUint16(out, uint16(len(resp)))
		copy(out[2:], resp)
		c.SetWriteDeadline(time.Now().Add(dnsTCPIdle))
		if _, err := c.Write(out); err != nil {
			return
		}
	}
}

// answer returns the response to one guest query, or nil to drop it.
func (d *dnsServer) answer(q []byte, viaTCP bool) []byte {
	d.n.stats.dnsQueries.Add(1)
	var p dnsmessage.Parser
	h, err := p.Start(q)
	if err != nil || h.Response {
		return nil
	}
	var m dnsmessage.Message
	if err := m.Unpack(q); err != nil {
		return errorReply(h, nil, dnsmessage.RCodeFormatError)
	}
	if h.OpCode != 0 {
		return errorReply(h, nil, dnsmessage.RCodeNotImplemented)
	}
	if len(m.Questions) != 1 {
		return errorReply(h, nil, dnsmessage.RCodeFormatError)
	}
	question := m.Questions[0]
	if question.Class != dnsmessage.ClassINET {
		return errorReply(h, m.Questions, dnsmessage.RCodeRefused)
	}
	name, ok := normalizeName(question.Name.String())
	if !ok {
		return errorReply(h, m.Questions, dnsmessage.RCodeRefused)
	}
	maxSize := 512
	for _, rr := range m.Additionals {
		if rr.Header.Type == dnsmessage.TypeOPT {
			maxSize = min(max(int(rr.Header.Class), 512), 4096)
		}
	}
	if viaTCP {
		maxSize = 65535
	}

	if name == HostAlias {
		return d.hostAlias(h, question, maxSize)
	}
	if d.n.pol.nameBlocked(name) {
		d.n.stats.dnsBlocked.Add(1)
		return errorReply(h, m.Questions, dnsmessage.RCodeNameError)
	}
	resp := d.forward(question)
	if resp == nil {
		return errorReply(h, m.Questions, dnsmessage.RCodeServerFailure)
	}
	out := d.filter(h, question, name, resp)
	return finish(out, maxSize)
}

func errorReply(h dnsmessage.Header, qs []dnsmessage.Question, rcode dnsmessage.RCode) []byte {
	m := dnsmessage.Message{
		Header:    dnsmessage.Header{ID: h.ID, Response: true, OpCode: h.OpCode, RecursionDesired: h.RecursionDesired, RecursionAvailable: true, RCode: rcode},
		Questions: qs,
	}
	b, err := m.Pack()
	if err != nil {
		return nil
	}
	return b
}

// finish packs m, truncating it (TC bit, no records) if it exceeds maxSize.
func finish(m *dnsmessage.Message, maxSize int) []byte {
	b, err := m.Pack()
	if err != nil {
		return errorReply(m.Header, m.Questions, dnsmessage.RCodeServerFailure)
	}
	if len(b) > maxSize {
		m.Header.Truncated = true
		m.Answers, m.Authorities, m.Additionals = nil, nil, nil
		if b, err = m.Pack(); err != nil {
			return nil
		}
	}
	return b
}

func (d *dnsServer) hostAlias(h dnsmessage.Header, q dnsmessage.Question, maxSize int) []byte {
	m := &dnsmessage.Message{
		Header:    dnsmessage.Header{ID: h.ID, Response: true, Authoritative: true, RecursionDesired: h.RecursionDesired, RecursionAvailable: true},
		Questions: []dnsmessage.Question{q},
	}
	rh := dnsmessage.ResourceHeader{Name: q.Name, Class: dnsmessage.ClassINET, TTL: hostAliasTTL}
	switch {
	case q.Type == dnsmessage.TypeA:
		rh.Type = dnsmessage.TypeA
		m.Answers = append(m.Answers, dnsmessage.Resource{Header: rh, Body: &dnsmessage.AResource{A: d.n.gw4.As4()}})
	case q.Type == dnsmessage.TypeAAAA && d.n.gw6.IsValid():
		rh.Type = dnsmessage.TypeAAAA
		m.Answers = append(m.Answers, dnsmessage.Resource{Header: rh, Body: &dnsmessage.AAAAResource{AAAA: d.n.gw6.As16()}})
	}
	return finish(m, maxSize)
}

// forward asks the upstream resolvers in order and returns the first valid
// answer that is not a server failure.
func (d *dnsServer) forward(q dnsmessage.Question) *dnsmessage.Message {
	id := uint16(rand.Uint32())
	req := dnsmessage.Message{
		Header:    dnsmessage.Header{ID: id, RecursionDesired: true},
		Questions: []dnsmessage.Question{q},
	}
	var opt dnsmessage.ResourceHeader
	if err := opt.SetEDNS0(upstreamUDPSize, dnsmessage.RCodeSuccess, false); err == nil {
		req.Additionals = []dnsmessage.Resource{{Header: opt, Body: &dnsmessage.OPTResource{}}}
	}
	wire, err := req.Pack()
	if err != nil {
		return nil
	}
	var last *dnsmessage.Message
	for _, s := range d.servers {
		resp := d.exchange(s, wire, id, q, false)
		if resp != nil && resp.Header.Truncated {
			resp = d.exchange(s, wire, id, q, true)
		}
		if resp == nil {
			continue
		}
		last = resp
		if resp.Header.RCode != dnsmessage.RCodeServerFailure && resp.Header.RCode != dnsmessage.RCodeRefused {
			return resp
		}
	}
	return last
}

// exchange sends one query to server and returns its validated response.
func (d *dnsServer) exchange(server netip.AddrPort, wire []byte, id uint16, q dnsmessage.Question, useTCP bool) *dnsmessage.Message {
	ctx, cancel := context.WithTimeout(d.n.ctx, d.timeout)
	defer cancel()
	network := "udp"
	if useTCP {
		network = "tcp"
	}
	c, err := d.n.dialer.DialContext(ctx, network, server.String())
	if err != nil {
		return nil
	}
	stop := context.AfterFunc(ctx, func() { c.Close() })
	defer stop()
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
	}
	buf := make([]byte, 65536)
	if useTCP {
		out := make([]byte, 2+len(wire))
		binary.BigEndian.PutUint16(out, uint16(len(wire)))
		copy(out[2:], wire)
		if _, err := c.Write(out); err != nil {
			return nil
		}
		if _, err := io.ReadFull(c, buf[:2]); err != nil {
			return nil
		}
		l := int(binary.BigEndian.Uint16(buf[:2]))
		if _, err := io.ReadFull(c, buf[:l]); err != nil {
			return nil
		}
		return validResponse(buf[:l], id, q)
	}
	if _, err := c.Write(wire); err != nil {
		return nil
	}
	for {
		nr, err := c.Read(buf)
		if err != nil {
			return nil
		}
		if m := validResponse(buf[:nr], id, q); m != nil {
			return m
		}
	}
}

// validResponse parses an upstream response and checks it answers the query.
func validResponse(b []byte, id uint16, q dnsmessage.Question) *dnsmessage.Message {
	var m dnsmessage.Message
	if err := m.Unpack(b); err != nil {
		return nil
	}
	if !m.Header.Response || m.Header.ID != id || len(m.Questions) != 1 {
		return nil
	}
	rq := m.Questions[0]
	if rq.Type != q.Type || rq.Class != q.Class || !strings.EqualFold(rq.Name.String(), q.Name.String()) {
		return nil
	}
	return &m
}

// filter builds the guest's response from an upstream one: rebind
// protection on A/AAAA answers, DNS pins for what is kept, only SOA/NS in the
// authority section, no additional records.
func (d *dnsServer) filter(h dnsmessage.Header, q dnsmessage.Question, name string, resp *dnsmessage.Message) *dnsmessage.Message {
	out := &dnsmessage.Message{
		Header: dnsmessage.Header{
			ID: h.ID, Response: true, RecursionDesired: h.RecursionDesired, RecursionAvailable: true,
			RCode: resp.Header.RCode, Truncated: resp.Header.Truncated,
		},
		Questions: []dnsmessage.Question{q},
	}
	dropped, kept := 0, 0
	for _, rr := range resp.Answers {
		var a netip.Addr
		switch b := rr.Body.(type) {
		case *dnsmessage.AResource:
			a = netip.AddrFrom4(b.A)
		case *dnsmessage.AAAAResource:
			a = netip.AddrFrom16(b.AAAA).Unmap()
		default:
			out.Answers = append(out.Answers, rr)
			continue
		}
		if d.rebind && classify(a, d.n.pol.gateways) != GroupPublic && !d.n.pol.addressExplicitlyAllowed(a) {
			dropped++
			d.n.stats.dnsRebindDrops.Add(1)
			continue
		}
		kept++
		ttl := time.Duration(rr.Header.TTL) * time.Second
		d.n.pins.record(name, a, ttl)
		if owner, ok := normalizeName(rr.Header.Name.String()); ok && owner != name {
			d.n.pins.record(owner, a, ttl)
		}
		out.Answers = append(out.Answers, rr)
	}
	if dropped > 0 && kept == 0 {
		out.Header.RCode = dnsmessage.RCodeNameError
		out.Answers = nil
		return out
	}
	for _, rr := range resp.Authorities {
		if rr.Header.Type == dnsmessage.TypeSOA || rr.Header.Type == dnsmessage.TypeNS {
			out.Authorities = append(out.Authorities, rr)
		}
	}
	return out
}
