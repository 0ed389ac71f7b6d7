package sandbox

import (
	"fmt"
	"net/netip"

	"github.com/gosandbox/sandbox/guest/agentproto"
	"github.com/gosandbox/sandbox/netstack"
	virtionet "github.com/gosandbox/sandbox/virtio/net"
)

// Networking. Every sandbox has a network unless NoNetwork is given: a
// virtio-net interface whose other end is an in-process user-space TCP/IP
// stack (package netstack). Each flow the guest opens is checked against
// the policy and re-originated from an ordinary host socket; nothing needs
// root, TAP devices or host NAT. By default the guest reaches the public
// internet only (not the host, private networks, link-local or cloud
// metadata addresses).

// NoNetwork gives the sandbox no network interface at all: the guest has
// only lo, and there is no path of any kind out of it.
func NoNetwork() Option {
	return func(c *config) error {
		if c.netSet {
			return &OptionError{"NoNetwork", "conflicts with network options given before it"}
		}
		c.noNetwork = true
		return nil
	}
}

// NetworkRules sets the network policy: rules of the form
// "allow|deny[:egress|ingress]@target[:tcp|udp|icmp[:port|lo-hi]]", checked
// in order for every flow, the first match winning (see package netstack).
// Targets are IPs, CIDRs, exact domains, "*.suffix" and the groups public,
// private, loopback, link-local, metadata, multicast, host and any. For
// example "allow@host:tcp:8080" lets the guest reach a service on the
// host's loopback port 8080 as host.gosandbox.internal.
func NetworkRules(rules ...string) Option {
	return func(c *config) error {
		if c.noNetwork {
			return &OptionError{"NetworkRules", "conflicts with NoNetwork"}
		}
		rs, err := netstack.ParseRules(rules...)
		if err != nil {
			return &OptionError{"NetworkRules", err.Error()}
		}
		c.net.Rules = append(c.net.Rules, rs...)
		c.netSet = true
		return nil
	}
}

// PublishPort makes the guest's TCP port guestPort reachable on the host
// at hostAddr ("127.0.0.1:8080"; port 0 picks a free one, see Ports). The
// connection enters the guest through the network stack and is subject to
// ingress rules.
func PublishPort(hostAddr string, guestPort uint16) Option {
	return func(c *config) error {
		if c.noNetwork {
			return &OptionError{"PublishPort", "conflicts with NoNetwork"}
		}
		ap, err := netip.ParseAddrPort(hostAddr)
		if err != nil {
			return &OptionError{"PublishPort", fmt.Sprintf("host address %q: %v (want ip:port)", hostAddr, err)}
		}
		if guestPort == 0 {
			return &OptionError{"PublishPort", "guest port 0"}
		}
		c.net.Ports = append(c.net.Ports, netstack.PortMapping{Proto: netstack.TCP, Host: ap, GuestPort: guestPort})
		c.netSet = true
		return nil
	}
}

// Network replaces the whole network configuration (pools, rules, DNS,
// limits, ports, MTU, IPv6); see netstack.Config. Its Name, Output and
// Logger are set by New.
func Network(cfg netstack.Config) Option {
	return func(c *config) error {
		if c.noNetwork {
			return &OptionError{"Network", "conflicts with NoNetwork"}
		}
		c.net = cfg
		c.netSet = true
		return nil
	}
}

// startNetwork makes the network and its device.
func startNetwork(cfg *config, name string) (*netstack.Network, *virtionet.Device, *agentproto.NetConfig, error) {
	nc := cfg.net
	nc.Name, nc.Output, nc.Logger = name, nil, cfg.logger
	n, err := netstack.New(nc)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("sandbox: network: %w", err)
	}
	g := n.Guest()
	dev, err := virtionet.New(virtionet.Options{MAC: g.MAC, MTU: g.MTU, Backend: n, Logger: cfg.logger})
	if err != nil {
		n.Close()
		return nil, nil, nil, fmt.Errorf("sandbox: network device: %w", err)
	}
	n.SetOutput(dev)
	pc := &agentproto.NetConfig{MAC: g.MAC.String(), MTU: g.MTU, IPv4: g.IPv4.String(), GatewayIPv4: g.GatewayIPv4.String()}
	if g.IPv6.IsValid() {
		pc.IPv6 = g.IPv6.String()
		if g.GatewayIPv6.IsValid() {
			pc.GatewayIPv6 = g.GatewayIPv6.String()
		}
	}
	for _, d := range g.DNS {
		if len(pc.DNS) < agentproto.MaxNameservers {
			pc.DNS = append(pc.DNS, d.String())
		}
	}
	if g.HostAlias != "" {
		pc.Hosts = map[string]string{g.HostAlias: g.GatewayIPv4.String()}
	}
	return n, dev, pc, nil
}

// Ports returns the published ports with the host addresses they are
// bound to; nil without a network.
func (sb *Sandbox) Ports() []*netstack.Published {
	if sb.net == nil {
		return nil
	}
	return sb.net.Ports()
}

// NetworkStats returns the network's counters (flows, bytes, denials);
// the zero Stats without a network.
func (sb *Sandbox) NetworkStats() netstack.Stats {
	if sb.net == nil {
		return netstack.Stats{}
	}
	return sb.net.Stats()
}
