package netcfg

import (
	"net"
	"net/netip"
	"slices"
	"strings"

	"github.com/gosandbox/sandbox/guest/agentproto"
)

// FromProto converts the host's agentproto.NetConfig into a Config with
// the default paths and wait, and validates it. Hosts come out sorted by
// name, so the hosts file is the same on every boot.
func FromProto(n *agentproto.NetConfig) (Config, error) {
	var c Config
	if n == nil {
		return c, cfgErr(ErrInvalidConfig, "Net", "", "no network configuration")
	}
	mac, err := net.ParseMAC(n.MAC)
	if err != nil {
		return c, cfgErr(ErrMAC, "MAC", n.MAC, "want six colon-separated hex bytes")
	}
	c.MAC, c.MTU = mac, n.MTU
	if c.IPv4, err = parsePrefix(n.IPv4); err != nil {
		return c, cfgErr(ErrAddress, "IPv4", n.IPv4, "want an address with a prefix length, such as 100.96.0.2/30")
	}
	if c.GatewayIPv4, err = parseAddr(n.GatewayIPv4); err != nil {
		return c, cfgErr(ErrGateway, "GatewayIPv4", n.GatewayIPv4, "not an address")
	}
	if c.IPv6, err = parsePrefix(n.IPv6); err != nil {
		return c, cfgErr(ErrAddress, "IPv6", n.IPv6, "want an address with a prefix length, such as fd00::2/64")
	}
	if c.GatewayIPv6, err = parseAddr(n.GatewayIPv6); err != nil {
		return c, cfgErr(ErrGateway, "GatewayIPv6", n.GatewayIPv6, "not an address")
	}
	for _, s := range n.DNS {
		a, err := netip.ParseAddr(s)
		if err != nil {
			return c, cfgErr(ErrDNS, "DNS", s, "not an address")
		}
		c.DNS = append(c.DNS, a)
	}
	for name, s := range n.Hosts {
		a, err := netip.ParseAddr(s)
		if err != nil {
			return c, cfgErr(ErrAddress, "Hosts["+name+"]", s, "not an address")
		}
		c.Hosts = append(c.Hosts, HostEntry{Name: name, Addr: a})
	}
	slices.SortFunc(c.Hosts, func(a, b HostEntry) int { return strings.Compare(a.Name, b.Name) })
	return c, c.Validate()
}

func parsePrefix(s string) (netip.Prefix, error) {
	if s == "" {
		return netip.Prefix{}, nil
	}
	return netip.ParsePrefix(s)
}

func parseAddr(s string) (netip.Addr, error) {
	if s == "" {
		return netip.Addr{}, nil
	}
	return netip.ParseAddr(s)
}
