package netstack

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/network/arp"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/icmp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
)

// HostAlias is the name the gateway's DNS answers with the gateway's own
// addresses; connections to them reach the host's loopback when a rule
// allows the host group ("allow@host").
const HostAlias = "host.gosandbox.internal"

// Default timeouts.
const (
	DefaultTCPIdleTimeout = 30 * time.Minute
	DefaultUDPIdleTimeout = 60 * time.Second
	DefaultDialTimeout    = 30 * time.Second
	DefaultDNSTimeout     = 5 * time.Second
)

const nicID tcpip.NICID = 1

// timeWait is how long the gateway keeps a connection it closed first in
// TIME_WAIT. gVisor's default is 60 s, and with the forwarder (no listening
// endpoint) gVisor drops a new SYN for a 4-tuple still in TIME_WAIT instead
// of reopening it as Linux does: a guest that reused a source port within a
// minute got no answer until the entry expired (a 63 s stall, six SYN
// retransmissions, was seen in a VM). TIME_WAIT guards against old
// duplicates delayed in the network; the guest link is a point-to-point
// queue that holds nothing that long, so a short one keeps that guard and
// a reused port waits at most one SYN retransmission.
const timeWait = 250 * time.Millisecond

// Dialer opens host sockets for proxied flows and upstream DNS queries.
// *net.Dialer implements it. UDP flows are dialed on the stack's receive
// path, so DialContext for "udp" must not block for long.
type Dialer interface {
	DialContext(ctx context.Context, network, address string) (net.Conn, error)
}

// DNSConfig configures the gateway's DNS forwarder.
type DNSConfig struct {
	// Servers are the upstream resolvers, tried in order. If empty, the
	// nameservers of ResolvConf are used.
	Servers []netip.AddrPort
	// ResolvConf is the resolver file read when Servers is empty; empty
	// means /etc/resolv.conf.
	ResolvConf string
	// QueryTimeout bounds each upstream attempt; 0 means DefaultDNSTimeout.
	QueryTimeout time.Duration
	// DisableRebindProtection lets answers with private, loopback,
	// link-local or metadata addresses through even when no address rule
	// allows them.
	DisableRebindProtection bool
}

// Config configures a Network. Only Name is required.
type Config struct {
	// Name identifies the sandbox. It seeds the guest's MAC address and its
	// slot in Pool, so the same name gets the same addresses.
	Name string
	// Pool hands out the guest's subnets. nil means a private pool over
	// DefaultIPv4Pool and DefaultIPv6Pool (every network is isolated anyway;
	// share a Pool to keep subnets distinct across sandboxes).
	Pool *Pool
	// DisableIPv6 gives the guest IPv4 only.
	DisableIPv6 bool
	// MTU is the IP MTU of the guest link; 0 means DefaultMTU. It must be
	// between MinMTU and MaxMTU.
	MTU int

	// Rules are checked in order for every flow; the first match wins.
	Rules []Rule
	// DefaultEgress applies to guest-opened flows no rule matches. Unset
	// means: allow the public group, deny everything else.
	DefaultEgress Action
	// DefaultIngress applies to published-port connections no rule
	// matches. Unset means Allow (only published ports are reachable).
	DefaultIngress Action

	// DNS configures the gateway's resolver.
	DNS DNSConfig
	// Limits bounds connections, bandwidth and packet rates.
	Limits Limits
	// TCPIdleTimeout closes proxied TCP connections idle in both directions
	// for this long; 0 means DefaultTCPIdleTimeout.
	TCPIdleTimeout time.Duration
	// UDPIdleTimeout ends UDP flows idle for this long; 0 means
	// DefaultUDPIdleTimeout.
	UDPIdleTimeout time.Duration
	// DialTimeout bounds each host-side connect; 0 means DefaultDialTimeout.
	DialTimeout time.Duration

	// Ports are published when the network starts (see Publish).
	Ports []PortMapping
	// Output receives host→guest frames. It may be set later with SetOutput;
	// until then such frames are dropped.
	Output FrameWriter
	// Dialer opens host sockets; nil means a *net.Dialer.
	Dialer Dialer
	// Clock drives the rate limiters; nil means the system clock.
	Clock Clock
	// Logger receives debug logs; nil means silent.
	Logger *slog.Logger
}

// GuestConfig is what the guest agent applies to its interface at boot.
type GuestConfig struct {
	// MAC is the guest interface's address; the virtio-net device reports it
	// in its config space.
	MAC net.HardwareAddr
	// MTU is the interface MTU (the device reports it with VIRTIO_NET_F_MTU).
	MTU int
	// IPv4 is the guest's address with its prefix length (a /30).
	IPv4 netip.Prefix
	// GatewayIPv4 is the IPv4 default route's next hop.
	GatewayIPv4 netip.Addr
	// IPv6 is the guest's address with its prefix length (a /64); the zero
	// Prefix when IPv6 is off. Configure it without duplicate address
	// detection (IFA_F_NODAD): there is nobody else on the link.
	IPv6 netip.Prefix
	// GatewayIPv6 is the IPv6 default route's next hop, or the zero Addr.
	GatewayIPv6 netip.Addr
	// DNS are the nameservers for /etc/resolv.conf.
	DNS []netip.Addr
	// HostAlias resolves to the gateway (the host's loopback, if allowed).
	HostAlias string
}

// ResolvConf returns /etc/resolv.conf contents for the guest.
func (g GuestConfig) ResolvConf() string {
	var b strings.Builder
	for _, a := range g.DNS {
		fmt.Fprintf(&b, "nameserver %s\n", a)
	}
	b.WriteString("options edns0 trust-ad\n")
	return b.String()
}

// Stats are counters of a Network.
type Stats struct {
	FramesFromGuest, FramesToGuest uint64
	BytesFromGuest, BytesToGuest   uint64
	// FramesDropped counts frames refused at the boundary (malformed,
	// spoofed, over the packet limit, no output).
	FramesDropped uint64
	FlowsAllowed  uint64
	FlowsDenied   uint64
	// FlowsOverLimit counts flows refused by Limits.MaxConnections.
	FlowsOverLimit uint64
	ActiveFlows    int64
	DNSQueries     uint64
	DNSBlocked     uint64
	// DNSRebindDrops counts answer records removed by rebind protection.
	DNSRebindDrops uint64
	// EgressBytes and IngressBytes are proxied payload bytes.
	EgressBytes, IngressBytes uint64
}

// Network is one sandbox's network: a gVisor stack playing the guest's
// gateway. It is safe for concurrent use. Close releases everything.
type Network struct {
	log         *slog.Logger
	lease       *Lease
	guest       GuestConfig
	gw4, gw6    netip.Addr
	g4, g6      netip.Addr
	gwMAC       tcpip.LinkAddress
	guestMAC    tcpip.LinkAddress
	mtu         int
	dialer      Dialer
	dialTimeout time.Duration
	tcpIdle     time.Duration
	udpIdle     time.Duration
	clock       Clock

	stack *stack.Stack
	ep    *linkEndpoint
	pol   *policy
	pins  *pinTable
	dns   *dnsServer

	out atomic.Pointer[writerBox]

	ctx    context.Context
	cancel context.CancelFunc

	mu     sync.Mutex
	closed bool
	wg     sync.WaitGroup
	// +checklocks:mu
	published map[*Published]struct{}

	// frameMu is held shared by DeliverFrame and exclusively by Close.
	frameMu  sync.RWMutex
	isClosed atomic.Bool

	conns                     connLimiter
	egressBytes, ingressBytes *tokenBucket
	egressPkts, ingressPkts   *tokenBucket
	bufs                      sync.Pool

	stats struct {
		framesIn, framesOut, bytesIn, bytesOut, framesDropped atomic.Uint64
		flowsAllowed, flowsDenied                             atomic.Uint64
		dnsQueries, dnsBlocked, dnsRebindDrops                atomic.Uint64
		egressBytes, ingressBytes                             atomic.Uint64
	}
}

type writerBox struct {
	w   FrameWriter
	gso GSOFrameWriter // w, if it takes offload metadata
}

const copyBufSize = 64 << 10

// New builds the network of one sandbox. The returned Network owns a gVisor
// stack, DNS service goroutines and any published-port listeners; Close
// releases them.
func New(cfg Config) (*Network, error) {
	if cfg.Name == "" {
		return nil, &ConfigError{Field: "Name", Reason: "empty; give the sandbox a name or id"}
	}
	mtu := cfg.MTU
	if mtu == 0 {
		mtu = DefaultMTU
	}
	if mtu < MinMTU || mtu > MaxMTU {
		return nil, &ConfigError{Field: "MTU", Reason: fmt.Sprintf("%d is outside %d..%d", mtu, MinMTU, MaxMTU)}
	}
	maxConns := cfg.Limits.MaxConnections
	if maxConns == 0 {
		maxConns = DefaultMaxConnections
	}
	if maxConns < 0 || maxConns > MaxConnectionsLimit {
		return nil, &ConfigError{Field: "Limits.MaxConnections", Reason: fmt.Sprintf("%d is outside 1..%d", maxConns, MaxConnectionsLimit)}
	}
	for _, a := range []Action{cfg.DefaultEgress, cfg.DefaultIngress} {
		if a > Deny {
			return nil, &ConfigError{Field: "DefaultEgress/DefaultIngress", Reason: "must be Allow, Deny or unset"}
		}
	}
	for i, r := range cfg.Rules {
		if r.Action != Allow && r.Action != Deny || r.Direction == 0 || r.Direction > AnyDirection || r.Target.kind == 0 {
			return nil, &ConfigError{Field: fmt.Sprintf("Rules[%d]", i), Reason: "not a parsed rule; build rules with ParseRule"}
		}
	}
	pool := cfg.Pool
	if pool == nil {
		v6 := DefaultIPv6Pool
		var err error
		if pool, err = NewPool(DefaultIPv4Pool, v6); err != nil {
			return nil, err
		}
	}
	servers, err := dnsServers(cfg.DNS)
	if err != nil {
		return nil, err
	}
	lease, err := pool.Allocate(cfg.Name)
	if err != nil {
		return nil, err
	}

	n := &Network{
		log:         cfg.Logger,
		lease:       lease,
		mtu:         mtu,
		dialer:      cfg.Dialer,
		dialTimeout: cmpOr(cfg.DialTimeout, DefaultDialTimeout),
		tcpIdle:     cmpOr(cfg.TCPIdleTimeout, DefaultTCPIdleTimeout),
		udpIdle:     cmpOr(cfg.UDPIdleTimeout, DefaultUDPIdleTimeout),
		clock:       cfg.Clock,
		published:   make(map[*Published]struct{}),
	}
	if n.log == nil {
		n.log = slog.New(slog.DiscardHandler)
	}
	if n.dialer == nil {
		n.dialer = &net.Dialer{}
	}
	if n.clock == nil {
		n.clock = systemClock{}
	}
	n.conns.max = int64(maxConns)
	n.egressBytes = newBucket(cfg.Limits.EgressBytes, n.clock)
	n.ingressBytes = newBucket(cfg.Limits.IngressBytes, n.clock)
	n.egressPkts = newBucket(cfg.Limits.EgressPackets, n.clock)
	n.ingressPkts = newBucket(cfg.Limits.IngressPackets, n.clock)
	n.bufs.New = func() any { b := make([]byte, copyBufSize); return &b }

	n.gw4, n.g4 = nthAddr(lease.IPv4, 1), nthAddr(lease.IPv4, 2)
	if !cfg.DisableIPv6 && lease.IPv6.IsValid() {
		n.gw6, n.g6 = nthAddr(lease.IPv6, 1), nthAddr(lease.IPv6, 2)
	}
	guestMAC, gwMAC := MACFor(cfg.Name), gatewayMACFor(cfg.Name)
	n.guestMAC, n.gwMAC = tcpip.LinkAddress(guestMAC), tcpip.LinkAddress(gwMAC)
	n.guest = GuestConfig{
		MAC: guestMAC, MTU: mtu,
		IPv4:        netip.PrefixFrom(n.g4, 30),
		GatewayIPv4: n.gw4,
		DNS:         []netip.Addr{n.gw4},
		HostAlias:   HostAlias,
	}
	gateways := []netip.Addr{n.gw4}
	if n.gw6.IsValid() {
		n.guest.IPv6 = netip.PrefixFrom(n.g6, 64)
		n.guest.GatewayIPv6 = n.gw6
		n.guest.DNS = append(n.guest.DNS, n.gw6)
		gateways = append(gateways, n.gw6)
	}
	n.pins = newPinTable(n.clock.Now)
	n.pol = &policy{
		rules:          append([]Rule(nil), cfg.Rules...),
		defaultEgress:  cfg.DefaultEgress,
		defaultIngress: cfg.DefaultIngress,
		gateways:       gateways,
		pins:           n.pins,
	}
	n.ctx, n.cancel = context.WithCancel(context.Background())

	if err := n.startStack(); err != nil {
		n.cancel()
		lease.Release()
		return nil, err
	}
	if cfg.Output != nil {
		n.SetOutput(cfg.Output)
	}
	n.dns = &dnsServer{n: n, servers: servers, timeout: cmpOr(cfg.DNS.QueryTimeout, DefaultDNSTimeout), rebind: !cfg.DNS.DisableRebindProtection}
	if err := n.dns.start(); err != nil {
		n.Close()
		return nil, err
	}
	for _, m := range cfg.Ports {
		if _, err := n.Publish(m); err != nil {
			n.Close()
			return nil, err
		}
	}
	return n, nil
}

func cmpOr(d, def time.Duration) time.Duration {
	if d > 0 {
		return d
	}
	return def
}

func (n *Network) startStack() error {
	n.stack = stack.New(stack.Options{
		NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol, ipv6.NewProtocol, arp.NewProtocol},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol, udp.NewProtocol, icmp.NewProtocol4, icmp.NewProtocol6},
	})
	s := n.stack
	fail := func(op string, err tcpip.Error) error {
		s.Destroy()
		return tcpipErr(op, err)
	}
	sack := tcpip.TCPSACKEnabled(true)
	if err := s.SetTransportProtocolOption(tcp.ProtocolNumber, &sack); err != nil {
		return fail("enable SACK", err)
	}
	rcv := tcpip.TCPReceiveBufferSizeRangeOption{Min: 4 << 10, Default: 1 << 20, Max: 8 << 20}
	if err := s.SetTransportProtocolOption(tcp.ProtocolNumber, &rcv); err != nil {
		return fail("set receive buffer", err)
	}
	moderate := tcpip.TCPModerateReceiveBufferOption(true)
	if err := s.SetTransportProtocolOption(tcp.ProtocolNumber, &moderate); err != nil {
		return fail("enable receive buffer moderation", err)
	}
	tw := tcpip.TCPTimeWaitTimeoutOption(timeWait)
	if err := s.SetTransportProtocolOption(tcp.ProtocolNumber, &tw); err != nil {
		return fail("set TIME_WAIT timeout", err)
	}
	snd := tcpip.TCPSendBufferSizeRangeOption{Min: 4 << 10, Default: 1 << 20, Max: 8 << 20}
	if err := s.SetTransportProtocolOption(tcp.ProtocolNumber, &snd); err != nil {
		return fail("set send buffer", err)
	}
	n.ep = newLinkEndpoint(uint32(n.mtu), n.gwMAC, n.output)
	if err := s.CreateNICWithOptions(nicID, n.ep, stack.NICOptions{Name: "gateway"}); err != nil {
		return fail("create NIC", err)
	}
	addrs := []tcpip.ProtocolAddress{{
		Protocol:          ipv4.ProtocolNumber,
		AddressWithPrefix: tcpip.AddressWithPrefix{Address: tcpip.AddrFrom4(n.gw4.As4()), PrefixLen: 30},
	}}
	if n.gw6.IsValid() {
		addrs = append(addrs, tcpip.ProtocolAddress{
			Protocol:          ipv6.ProtocolNumber,
			AddressWithPrefix: tcpip.AddressWithPrefix{Address: tcpip.AddrFrom16(n.gw6.As16()), PrefixLen: 64},
		})
	}
	for _, a := range addrs {
		if err := s.AddProtocolAddress(nicID, a, stack.AddressProperties{}); err != nil {
			return fail("add address", err)
		}
	}
	if err := s.AddStaticNeighbor(nicID, ipv4.ProtocolNumber, tcpip.AddrFrom4(n.g4.As4()), n.guestMAC); err != nil {
		return fail("add neighbor", err)
	}
	routes := []tcpip.Route{{Destination: subnet(n.lease.IPv4), NIC: nicID}}
	if n.gw6.IsValid() {
		if err := s.AddStaticNeighbor(nicID, ipv6.ProtocolNumber, tcpip.AddrFrom16(n.g6.As16()), n.guestMAC); err != nil {
			return fail("add neighbor", err)
		}
		routes = append(routes,
			tcpip.Route{Destination: subnet(n.lease.IPv6), NIC: nicID},
			tcpip.Route{Destination: subnet(netip.MustParsePrefix("fe80::/64")), NIC: nicID})
	}
	s.SetRouteTable(routes)
	// Promiscuous: accept packets for any destination (the flows to proxy).
	// Spoofing: answer from those destinations' addresses.
	if err := s.SetPromiscuousMode(nicID, true); err != nil {
		return fail("set promiscuous", err)
	}
	if err := s.SetSpoofing(nicID, true); err != nil {
		return fail("set spoofing", err)
	}
	tcpFwd := tcp.NewForwarder(s, 0, 1024, n.handleTCP)
	s.SetTransportProtocolHandler(tcp.ProtocolNumber, tcpFwd.HandlePacket)
	udpFwd := udp.NewForwarder(s, n.handleUDP)
	s.SetTransportProtocolHandler(udp.ProtocolNumber, udpFwd.HandlePacket)
	return nil
}

func subnet(p netip.Prefix) tcpip.Subnet {
	p = p.Masked()
	var addr, mask tcpip.Address
	if p.Addr().Is4() {
		addr = tcpip.AddrFrom4(p.Addr().As4())
		mask = tcpip.AddrFrom4([4]byte(net.CIDRMask(p.Bits(), 32)))
	} else {
		addr = tcpip.AddrFrom16(p.Addr().As16())
		mask = tcpip.AddrFrom16([16]byte(net.CIDRMask(p.Bits(), 128)))
	}
	s, err := tcpip.NewSubnet(addr, tcpip.MaskFromBytes(mask.AsSlice()))
	if err != nil {
		panic("netstack: bad subnet " + p.String()) // unreachable: masked prefix
	}
	return s
}

// Guest returns the configuration the guest agent applies to its interface.
func (n *Network) Guest() GuestConfig {
	g := n.guest
	g.MAC = append(net.HardwareAddr(nil), g.MAC...)
	g.DNS = append([]netip.Addr(nil), g.DNS...)
	return g
}

// SetOutput sets (or replaces) the writer of host→guest frames. If w is a
// GSOFrameWriter, connections opened from then on send large TCP segments
// with offload metadata to it.
func (n *Network) SetOutput(w FrameWriter) {
	if w == nil {
		n.ep.hostGSO.Store(false)
		n.out.Store(nil)
		return
	}
	box := &writerBox{w: w}
	box.gso, _ = w.(GSOFrameWriter)
	n.out.Store(box)
	n.ep.hostGSO.Store(box.gso != nil)
}

// Ports returns the ports currently published (from Config.Ports and
// Publish), in no particular order.
func (n *Network) Ports() []*Published {
	n.mu.Lock()
	defer n.mu.Unlock()
	out := make([]*Published, 0, len(n.published))
	for p := range n.published {
		out = append(out, p)
	}
	return out
}

// Stats returns a snapshot of the network's counters.
func (n *Network) Stats() Stats {
	s := &n.stats
	return Stats{
		FramesFromGuest: s.framesIn.Load(), FramesToGuest: s.framesOut.Load(),
		BytesFromGuest: s.bytesIn.Load(), BytesToGuest: s.bytesOut.Load(),
		FramesDropped: s.framesDropped.Load(),
		FlowsAllowed:  s.flowsAllowed.Load(), FlowsDenied: s.flowsDenied.Load(),
		FlowsOverLimit: n.conns.denied.Load(), ActiveFlows: n.conns.active.Load(),
		DNSQueries: s.dnsQueries.Load(), DNSBlocked: s.dnsBlocked.Load(), DNSRebindDrops: s.dnsRebindDrops.Load(),
		EgressBytes: s.egressBytes.Load(), IngressBytes: s.ingressBytes.Load(),
	}
}

// output sends one host→guest frame; it reports whether it was sent.
func (n *Network) output(frame []byte, o *Offload) bool {
	box := n.out.Load()
	if box == nil || !n.ingressPkts.tryTake(1) {
		n.stats.framesDropped.Add(1)
		return false
	}
	var err error
	switch {
	case o == nil:
		err = box.w.WriteFrame(frame)
	case box.gso != nil:
		err = box.gso.WriteFrameOffload(frame, *o)
	default:
		// The writer changed under a connection that uses offload: finish
		// the checksum here; a segment over the MTU cannot be sent.
		if len(frame) > n.mtu+header.EthernetMinimumSize {
			err = ErrNoOutput
		} else if o.NeedsChecksum {
			if err = completeChecksum(frame, int(o.ChecksumStart), int(o.ChecksumOffset)); err == nil {
				err = box.w.WriteFrame(frame)
			}
		} else {
			err = box.w.WriteFrame(frame)
		}
	}
	if err != nil {
		n.stats.framesDropped.Add(1)
		return false
	}
	n.stats.framesOut.Add(1)
	n.stats.bytesOut.Add(uint64(len(frame)))
	return true
}

// DeliverFrame hands one guest→host Ethernet frame (no virtio-net header, no
// FCS) to the network. The frame is copied; the caller may reuse it at once.
// The virtio-net device calls it from its transmit path. It may block while
// the egress packet-rate limit is exhausted (backpressure). Malformed frames
// and frames not from the guest's MAC return an error wrapping
// ErrFrameInvalid; frames dropped by policy return nil.
//
// Frames must carry complete checksums; a device that negotiates checksum or
// segmentation offload passes its virtio-net header's fields to
// DeliverFrameOffload instead.
func (n *Network) DeliverFrame(frame []byte) error {
	return n.deliverFrame(frame, n.mtu+header.EthernetMinimumSize)
}

func (n *Network) deliverFrame(frame []byte, maxLen int) error {
	n.frameMu.RLock()
	defer n.frameMu.RUnlock()
	if n.isClosed.Load() {
		return ErrClosed
	}
	if len(frame) < header.EthernetMinimumSize || len(frame) > maxLen {
		n.stats.framesDropped.Add(1)
		return fmt.Errorf("%w: length %d outside %d..%d", ErrFrameInvalid, len(frame), header.EthernetMinimumSize, maxLen)
	}
	eth := header.Ethernet(frame)
	if eth.SourceAddress() != n.guestMAC {
		n.stats.framesDropped.Add(1)
		return fmt.Errorf("%w: source MAC %v is not the guest's %v", ErrFrameInvalid, eth.SourceAddress(), n.guestMAC)
	}
	if err := n.egressPkts.wait(n.ctx, 1); err != nil {
		return ErrClosed
	}
	n.stats.framesIn.Add(1)
	n.stats.bytesIn.Add(uint64(len(frame)))
	if !n.filterFrame(eth.Type(), frame[header.EthernetMinimumSize:]) {
		n.stats.framesDropped.Add(1)
		return nil
	}
	n.ep.deliver(frame)
	return nil
}

// filterFrame drops what the gateway must not see: spoofed sources, ARP and
// neighbor solicitations for addresses other than the gateway's (the stack
// answers for every address in spoofing mode), and ICMP echo requests for
// other hosts, which are relayed instead. It reports whether to deliver.
func (n *Network) filterFrame(typ tcpip.NetworkProtocolNumber, p []byte) bool {
	switch typ {
	case header.ARPProtocolNumber:
		if len(p) < header.ARPSize {
			return false
		}
		a := header.ARP(p)
		if !a.IsValid() {
			return false
		}
		sender := netip.AddrFrom4([4]byte(a.ProtocolAddressSender()))
		if sender != n.g4 && !sender.IsUnspecified() {
			return false
		}
		if a.Op() == header.ARPRequest && netip.AddrFrom4([4]byte(a.ProtocolAddressTarget())) != n.gw4 {
			return false
		}
		return true
	case header.IPv4ProtocolNumber:
		ip := header.IPv4(p)
		if !ip.IsValid(len(p)) {
			return false
		}
		if netip.AddrFrom4(ip.SourceAddress().As4()) != n.g4 {
			return false
		}
		if ip.TransportProtocol() == header.ICMPv4ProtocolNumber && ip.FragmentOffset() == 0 && ip.Flags()&header.IPv4FlagMoreFragments == 0 {
			icmpb := p[ip.HeaderLength():ip.TotalLength()]
			if len(icmpb) >= header.ICMPv4MinimumSize && header.ICMPv4(icmpb).Type() == header.ICMPv4Echo {
				dst := netip.AddrFrom4(ip.DestinationAddress().As4())
				if dst != n.gw4 {
					n.relayEcho(dst, icmpb)
					return false
				}
			}
		}
		return true
	case header.IPv6ProtocolNumber:
		if !n.gw6.IsValid() {
			return false
		}
		ip := header.IPv6(p)
		if !ip.IsValid(len(p)) {
			return false
		}
		src := netip.AddrFrom16(ip.SourceAddress().As16())
		if src != n.g6 && !src.IsLinkLocalUnicast() && !src.IsUnspecified() {
			return false
		}
		if ip.TransportProtocol() == header.ICMPv6ProtocolNumber {
			icmpb := p[header.IPv6MinimumSize : header.IPv6MinimumSize+int(ip.PayloadLength())]
			if len(icmpb) < header.ICMPv6MinimumSize {
				return false
			}
			switch header.ICMPv6(icmpb).Type() {
			case header.ICMPv6NeighborSolicit:
				if len(icmpb) < header.ICMPv6NeighborSolicitMinimumSize {
					return false
				}
				target := netip.AddrFrom16(header.NDPNeighborSolicit(icmpb[header.ICMPv6HeaderSize:]).TargetAddress().As16())
				return target == n.gw6
			case header.ICMPv6EchoRequest:
				dst := netip.AddrFrom16(ip.DestinationAddress().As16())
				if dst != n.gw6 {
					if src == n.g6 {
						n.relayEcho(dst, icmpb)
					}
					return false
				}
			}
		} else if src != n.g6 {
			return false
		}
		return true
	}
	return false
}

// enter registers a goroutine that does work for the network; it returns
// false once Close has begun. Each true return must be paired with leave.
func (n *Network) enter() bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		return false
	}
	n.wg.Add(1)
	return true
}

func (n *Network) leave() { n.wg.Done() }

// goTracked runs f in a goroutine Close waits for. It returns false (and does
// not run f) once Close has begun.
func (n *Network) goTracked(f func()) bool {
	if !n.enter() {
		return false
	}
	go func() {
		defer n.leave()
		f()
	}()
	return true
}

// Close stops the network: it closes published ports, DNS service and every
// proxied flow, waits for their goroutines, tears the stack down and releases
// the address lease. It is safe to call more than once.
func (n *Network) Close() error {
	n.mu.Lock()
	if n.closed {
		n.mu.Unlock()
		return nil
	}
	n.closed = true
	pubs := make([]*Published, 0, len(n.published))
	for p := range n.published {
		pubs = append(pubs, p)
	}
	n.mu.Unlock()

	n.isClosed.Store(true)
	n.cancel()
	n.frameMu.Lock() // wait for in-flight DeliverFrame calls
	n.frameMu.Unlock()
	for _, p := range pubs {
		p.closeListener()
	}
	if n.dns != nil {
		n.dns.close()
	}
	n.stack.Close()
	n.wg.Wait()
	n.stack.Wait()
	n.lease.Release()
	return nil
}

// egressTarget decides an egress flow and returns the host address to dial.
func (n *Network) egressTarget(proto Proto, dst netip.Addr, port uint16) (netip.AddrPort, bool) {
	dst = dst.Unmap()
	if n.pol.decide(flow{dir: Egress, proto: proto, addr: dst, port: port}) != Allow {
		n.stats.flowsDenied.Add(1)
		n.log.Debug("egress denied", "proto", proto, "dst", dst, "port", port)
		return netip.AddrPort{}, false
	}
	n.stats.flowsAllowed.Add(1)
	switch dst {
	case n.gw4:
		dst = netip.AddrFrom4([4]byte{127, 0, 0, 1})
	case n.gw6:
		dst = netip.IPv6Loopback()
	}
	return netip.AddrPortFrom(dst, port), true
}

func addrOf(a tcpip.Address) netip.Addr {
	switch a.Len() {
	case 4:
		return netip.AddrFrom4(a.As4())
	case 16:
		return netip.AddrFrom16(a.As16()).Unmap()
	}
	return netip.Addr{}
}

// closeOnDone closes c when the network closes; call the returned stop
// function when c is done.
func (n *Network) closeOnDone(cs ...io.Closer) (stop func() bool) {
	return context.AfterFunc(n.ctx, func() {
		for _, c := range cs {
			c.Close()
		}
	})
}
