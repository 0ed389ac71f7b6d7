package netstack

import (
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"sync"
)

// Default address pools. The IPv4 pool is carrier-grade NAT space
// (RFC 6598), which rarely collides with LANs a guest might want to reach; the
// IPv6 pool is a fixed unique-local /48.
var (
	DefaultIPv4Pool = netip.MustParsePrefix("100.96.0.0/12")
	DefaultIPv6Pool = netip.MustParsePrefix("fd67:6f73:6278::/48")
)

// maxSlots bounds a Pool's bookkeeping however large its prefixes are.
const maxSlots = 1 << 20

// Pool hands out one IPv4 /30 and one IPv6 /64 per sandbox. Allocation is
// deterministic: the slot is derived from the sandbox name and the next free
// slot is taken on collision. A Pool is safe for concurrent use; share one
// between Networks to keep their subnets distinct.
type Pool struct {
	v4, v6 netip.Prefix
	slots  uint64

	mu   sync.Mutex
	used map[uint64]string
}

// NewPool returns a pool that carves /30s out of v4 and /64s out of v6. v6 may
// be the zero Prefix to hand out IPv4 only. v4 must be an IPv4 prefix no longer
// than /30; v6 an IPv6 prefix no longer than /64.
func NewPool(v4, v6 netip.Prefix) (*Pool, error) {
	if !v4.IsValid() || !v4.Addr().Is4() || v4.Bits() > 30 {
		return nil, &ConfigError{Field: "Pool IPv4", Reason: fmt.Sprintf("%v is not an IPv4 prefix of /30 or shorter", v4)}
	}
	slots := uint64(1) << min(30-v4.Bits(), 20)
	if v6.IsValid() {
		if !v6.Addr().Is6() || v6.Addr().Is4In6() || v6.Bits() > 64 {
			return nil, &ConfigError{Field: "Pool IPv6", Reason: fmt.Sprintf("%v is not an IPv6 prefix of /64 or shorter", v6)}
		}
		slots = min(slots, uint64(1)<<min(64-v6.Bits(), 20))
	} else if v6 != (netip.Prefix{}) {
		return nil, &ConfigError{Field: "Pool IPv6", Reason: "invalid prefix"}
	}
	return &Pool{v4: v4.Masked(), v6: v6.Masked(), slots: min(slots, maxSlots), used: make(map[uint64]string)}, nil
}

// Lease is one sandbox's share of a Pool.
type Lease struct {
	// IPv4 is the /30 subnet: .0 network, .1 gateway, .2 guest, .3 broadcast.
	IPv4 netip.Prefix
	// IPv6 is the /64 subnet (gateway ::1, guest ::2), or the zero Prefix.
	IPv6 netip.Prefix

	pool *Pool
	slot uint64
	once sync.Once
}

// Allocate reserves a slot for name. The same name gets the same slot as long
// as that slot is free.
func (p *Pool) Allocate(name string) (*Lease, error) {
	h := sha256.Sum256([]byte("gosandbox-pool\x00" + name))
	start := binary.BigEndian.Uint64(h[:8]) % p.slots
	p.mu.Lock()
	defer p.mu.Unlock()
	for i := uint64(0); i < p.slots; i++ {
		slot := (start + i) % p.slots
		if _, taken := p.used[slot]; taken {
			continue
		}
		p.used[slot] = name
		l := &Lease{pool: p, slot: slot, IPv4: p.v4Slot(slot)}
		if p.v6.IsValid() {
			l.IPv6 = p.v6Slot(slot)
		}
		return l, nil
	}
	return nil, ErrPoolExhausted
}

func (p *Pool) v4Slot(slot uint64) netip.Prefix {
	b := p.v4.Addr().As4()
	base := binary.BigEndian.Uint32(b[:]) + uint32(slot)*4
	binary.BigEndian.PutUint32(b[:], base)
	return netip.PrefixFrom(netip.AddrFrom4(b), 30)
}

func (p *Pool) v6Slot(slot uint64) netip.Prefix {
	b := p.v6.Addr().As16()
	hi := binary.BigEndian.Uint64(b[:8]) + slot
	binary.BigEndian.PutUint64(b[:8], hi)
	return netip.PrefixFrom(netip.AddrFrom16(b), 64)
}

// InUse reports how many slots are allocated.
func (p *Pool) InUse() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.used)
}

// Release returns the lease's slot to its pool. It is safe to call twice.
func (l *Lease) Release() {
	l.once.Do(func() {
		l.pool.mu.Lock()
		delete(l.pool.used, l.slot)
		l.pool.mu.Unlock()
	})
}

// nthAddr returns the address n positions after p's network address.
func nthAddr(p netip.Prefix, n uint8) netip.Addr {
	a := p.Masked().Addr()
	for range n {
		a = a.Next()
	}
	return a
}

// MACFor returns the deterministic, locally administered unicast MAC address
// of the guest of the sandbox called name.
func MACFor(name string) net.HardwareAddr { return macFrom("gosandbox-guest-mac\x00" + name) }

func gatewayMACFor(name string) net.HardwareAddr { return macFrom("gosandbox-gateway-mac\x00" + name) }

func macFrom(seed string) net.HardwareAddr {
	h := sha256.Sum256([]byte(seed))
	mac := net.HardwareAddr(h[:6:6])
	mac[0] = (mac[0] | 0x02) &^ 0x01 // locally administered, unicast
	return mac
}

// Group is a named class of addresses a rule can target.
type Group uint8

// Address groups. Every address is in exactly one of public, private,
// loopback, link-local, metadata, multicast and host; any matches all.
const (
	groupNone Group = iota
	// GroupPublic is every address not in another group.
	GroupPublic
	// GroupPrivate is RFC 1918, carrier-grade NAT (100.64/10), unique-local
	// (fc00::/7), site-local and other non-routable ranges.
	GroupPrivate
	// GroupLoopback is 127/8, ::1 and the unspecified addresses (connecting to
	// 0.0.0.0 reaches the host's loopback on Linux).
	GroupLoopback
	// GroupLinkLocal is 169.254/16 and fe80::/10 except metadata.
	GroupLinkLocal
	// GroupMetadata is the cloud metadata service: 169.254.169.254,
	// 169.254.170.2 and fd00:ec2::254.
	GroupMetadata
	// GroupMulticast is multicast and the limited broadcast address.
	GroupMulticast
	// GroupHost is the gateway's own addresses: connections to them reach
	// the host's loopback (the "host" alias).
	GroupHost
	// GroupAny matches every address.
	GroupAny
)

var groupNames = [...]string{
	groupNone: "", GroupPublic: "public", GroupPrivate: "private", GroupLoopback: "loopback",
	GroupLinkLocal: "link-local", GroupMetadata: "metadata", GroupMulticast: "multicast",
	GroupHost: "host", GroupAny: "any",
}

// String returns the group's name as written in rules.
func (g Group) String() string {
	if int(g) < len(groupNames) {
		return groupNames[g]
	}
	return fmt.Sprintf("Group(%d)", uint8(g))
}

func parseGroup(s string) Group {
	if s == "meta" {
		return GroupMetadata
	}
	for g, n := range groupNames {
		if n != "" && n == s {
			return Group(g)
		}
	}
	return groupNone
}

var (
	metadataAddrs = []netip.Addr{
		netip.MustParseAddr("169.254.169.254"),
		netip.MustParseAddr("169.254.170.2"),
		netip.MustParseAddr("fd00:ec2::254"),
	}
	privatePrefixes = []netip.Prefix{
		netip.MustParsePrefix("0.0.0.0/8"),
		netip.MustParsePrefix("10.0.0.0/8"),
		netip.MustParsePrefix("100.64.0.0/10"),
		netip.MustParsePrefix("172.16.0.0/12"),
		netip.MustParsePrefix("192.0.0.0/24"),
		netip.MustParsePrefix("192.168.0.0/16"),
		netip.MustParsePrefix("198.18.0.0/15"),
		netip.MustParsePrefix("240.0.0.0/4"),
		netip.MustParsePrefix("fc00::/7"),
		netip.MustParsePrefix("fec0::/10"),
		netip.MustParsePrefix("100::/64"),
	}
	nat64Prefix = netip.MustParsePrefix("64:ff9b::/96")
)

// classify returns the group of a (gateway addresses are GroupHost).
func classify(a netip.Addr, gateways []netip.Addr) Group {
	a = a.Unmap()
	for _, g := range gateways {
		if a == g {
			return GroupHost
		}
	}
	if a.Is6() && nat64Prefix.Contains(a) {
		b := a.As16()
		a = netip.AddrFrom4([4]byte(b[12:16]))
	}
	switch {
	case !a.IsValid():
		return GroupLoopback
	case a.IsLoopback() || a.IsUnspecified():
		return GroupLoopback
	case a.IsMulticast() || a == netip.AddrFrom4([4]byte{255, 255, 255, 255}):
		return GroupMulticast
	}
	for _, m := range metadataAddrs {
		if a == m {
			return GroupMetadata
		}
	}
	if a.IsLinkLocalUnicast() {
		return GroupLinkLocal
	}
	for _, p := range privatePrefixes {
		if p.Contains(a) {
			return GroupPrivate
		}
	}
	return GroupPublic
}
