package agentproto

import (
	"fmt"
	"net/netip"
	"strings"
)

// Limits on the boot setup the host sends in Config.
const (
	MaxLayers      = 128 // layer devices of a root file system
	MaxSerialLen   = 20  // bytes of a virtio-blk serial (VIRTIO_BLK_ID_BYTES)
	MaxNameservers = 3   // resolv.conf honours three
	MaxUserSpec    = 256 // bytes of an ExecRequest.User
)

// RootConfig tells the guest to boot into an image instead of its own
// userland: it mounts each layer (a read-only SquashFS on a virtio-blk
// device), stacks them with overlayfs over a writable upper directory, and
// switches the agent's root to the result before it answers Ready.
type RootConfig struct {
	// Layers are the virtio-blk serials of the layer devices, top layer
	// first.
	Layers []string `json:"layers,omitempty"`
	// Shares are virtio-9p mount tags of read-only trees stacked above
	// Layers (top first): a lazily pulled image is one such tree.
	Shares []string `json:"shares,omitempty"`
	// Upper is the serial of a read-write virtio-blk device holding an
	// ext4 file system for the writable layer; "" means a tmpfs.
	Upper string `json:"upper,omitempty"`
	// UpperSize bounds a tmpfs upper in bytes; 0 means the kernel's
	// default (half of guest RAM).
	UpperSize uint64 `json:"upper_size,omitempty"`
}

// Validate implements Payload.
func (r *RootConfig) Validate() error {
	if n := len(r.Layers) + len(r.Shares); n == 0 || n > MaxLayers {
		return fmt.Errorf("root: %d layers, want 1..%d", n, MaxLayers)
	}
	seen := make(map[string]bool, len(r.Layers)+len(r.Shares)+1)
	all := append(append([]string(nil), r.Shares...), r.Layers...)
	if r.Upper != "" {
		all = append(all, r.Upper)
	}
	for _, s := range all {
		if err := validSerial(s); err != nil {
			return fmt.Errorf("root: %w", err)
		}
		if seen[s] {
			return fmt.Errorf("root: serial or tag %q used twice", s)
		}
		seen[s] = true
	}
	return nil
}

func validSerial(s string) error {
	if s == "" || len(s) > MaxSerialLen {
		return fmt.Errorf("device serial %.40q is not 1..%d bytes", s, MaxSerialLen)
	}
	for _, c := range []byte(s) {
		if c <= ' ' || c >= 0x7f || c == '/' {
			return fmt.Errorf("device serial %.40q has a byte outside printable ASCII or a slash", s)
		}
	}
	return nil
}

// NetConfig tells the guest how to configure its one network interface.
type NetConfig struct {
	// MAC finds the interface ("02:xx:..").
	MAC string `json:"mac"`
	// MTU of the interface; 0 leaves the driver's.
	MTU int `json:"mtu,omitempty"`
	// IPv4 is the address with its prefix length ("100.96.0.2/30").
	IPv4 string `json:"ipv4"`
	// GatewayIPv4 is the default route's next hop.
	GatewayIPv4 string `json:"gateway_ipv4"`
	// IPv6 and GatewayIPv6 are empty when IPv6 is off.
	IPv6        string `json:"ipv6,omitempty"`
	GatewayIPv6 string `json:"gateway_ipv6,omitempty"`
	// DNS are the nameservers for /etc/resolv.conf.
	DNS []string `json:"dns,omitempty"`
	// Hosts are extra /etc/hosts entries, name to address.
	Hosts map[string]string `json:"hosts,omitempty"`
}

// Validate implements Payload.
func (n *NetConfig) Validate() error {
	if _, err := parseMAC(n.MAC); err != nil {
		return fmt.Errorf("net: %w", err)
	}
	if n.MTU != 0 && (n.MTU < 68 || n.MTU > 65535) {
		return fmt.Errorf("net: MTU %d not in 68..65535", n.MTU)
	}
	p4, err := netip.ParsePrefix(n.IPv4)
	if err != nil || !p4.Addr().Is4() {
		return fmt.Errorf("net: IPv4 address %.60q is not an IPv4 prefix", n.IPv4)
	}
	if g, err := netip.ParseAddr(n.GatewayIPv4); err != nil || !g.Is4() {
		return fmt.Errorf("net: IPv4 gateway %.60q is not an IPv4 address", n.GatewayIPv4)
	}
	if n.IPv6 != "" {
		p6, err := netip.ParsePrefix(n.IPv6)
		if err != nil || !p6.Addr().Is6() || p6.Addr().Is4In6() {
			return fmt.Errorf("net: IPv6 address %.60q is not an IPv6 prefix", n.IPv6)
		}
	}
	if n.GatewayIPv6 != "" {
		if g, err := netip.ParseAddr(n.GatewayIPv6); err != nil || !g.Is6() || n.IPv6 == "" {
			return fmt.Errorf("net: IPv6 gateway %.60q is not an IPv6 address (or IPv6 is off)", n.GatewayIPv6)
		}
	}
	if len(n.DNS) > MaxNameservers {
		return fmt.Errorf("net: %d nameservers, at most %d", len(n.DNS), MaxNameservers)
	}
	for _, d := range n.DNS {
		if _, err := netip.ParseAddr(d); err != nil {
			return fmt.Errorf("net: nameserver %.60q is not an address", d)
		}
	}
	if len(n.Hosts) > 64 {
		return fmt.Errorf("net: %d hosts entries, at most 64", len(n.Hosts))
	}
	for name, a := range n.Hosts {
		if name == "" || len(name) > 253 || strings.ContainsAny(name, " \t\r\n#\x00") {
			return fmt.Errorf("net: hosts name %.60q is not a host name", name)
		}
		if _, err := netip.ParseAddr(a); err != nil {
			return fmt.Errorf("net: hosts address %.60q is not an address", a)
		}
	}
	return nil
}

// parseMAC accepts six colon-separated hex bytes.
func parseMAC(s string) ([6]byte, error) {
	var m [6]byte
	parts := strings.Split(s, ":")
	if len(parts) != 6 {
		return m, fmt.Errorf("MAC %.40q is not six colon-separated bytes", s)
	}
	for i, p := range parts {
		if len(p) != 2 {
			return m, fmt.Errorf("MAC %.40q is not six colon-separated bytes", s)
		}
		var v byte
		for _, c := range []byte(p) {
			switch {
			case c >= '0' && c <= '9':
				v = v<<4 | (c - '0')
			case c >= 'a' && c <= 'f':
				v = v<<4 | (c - 'a' + 10)
			case c >= 'A' && c <= 'F':
				v = v<<4 | (c - 'A' + 10)
			default:
				return m, fmt.Errorf("MAC %.40q is not six colon-separated bytes", s)
			}
		}
		m[i] = v
	}
	return m, nil
}
