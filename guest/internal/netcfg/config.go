package netcfg

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"time"
)

// Defaults and limits of a Config.
const (
	// DefaultLinkWait is how long Apply waits for the interface to appear
	// when Config.LinkWait is 0.
	DefaultLinkWait = 2 * time.Second
	// DefaultResolvConfPath and DefaultHostsPath are the files Apply
	// writes when Config leaves the paths empty.
	DefaultResolvConfPath = "/etc/resolv.conf"
	DefaultHostsPath      = "/etc/hosts"
	// MaxNameservers is the number of nameserver lines resolv.conf honours
	// (glibc's and musl's MAXNS).
	MaxNameservers = 3
	// MaxSearch and MaxSearchLen bound the search domains: at most six
	// domains, at most 256 bytes on the search line (musl's limit; old
	// glibc had the same two).
	MaxSearch    = 6
	MaxSearchLen = 256
	// MaxHosts bounds Config.Hosts.
	MaxHosts = 256
	// MaxHostsFile is the largest existing hosts file Apply merges into.
	MaxHostsFile = 1 << 20
	// MinMTU and MaxMTU bound Config.MTU; IPv6 needs MinIPv6MTU.
	MinMTU     = 68
	MaxMTU     = 65535
	MinIPv6MTU = 1280
)

// Config is the network setup of one guest interface. The zero value of
// every field but MAC means "leave it": no MTU change, no address of that
// family, no route, no resolv.conf.
type Config struct {
	// MAC finds the interface (six bytes). Required.
	MAC net.HardwareAddr
	// MTU of the interface, MinMTU..MaxMTU (at least MinIPv6MTU with
	// IPv6); 0 leaves the driver's.
	MTU int
	// IPv4 is the interface's IPv4 address with its prefix length, such
	// as 100.96.0.2/30.
	IPv4 netip.Prefix
	// GatewayIPv4 is the default route's next hop. It needs IPv4 and must
	// lie inside it (and differ from the address).
	GatewayIPv4 netip.Addr
	// IPv6 is the interface's IPv6 address with its prefix length; it is
	// added without duplicate address detection.
	IPv6 netip.Prefix
	// GatewayIPv6 is the IPv6 default route's next hop, taken as on-link.
	// It needs IPv6.
	GatewayIPv6 netip.Addr
	// DNS are the nameservers written to resolv.conf, at most
	// MaxNameservers.
	DNS []netip.Addr
	// Search are the search domains written to resolv.conf.
	Search []string
	// Hosts are lines added to the hosts file; a name listed here replaces
	// that name's lines in the image's file. "localhost" is reserved.
	Hosts []HostEntry
	// ResolvConfPath and HostsPath are the files written; empty means
	// DefaultResolvConfPath and DefaultHostsPath.
	ResolvConfPath, HostsPath string
	// LinkWait bounds the wait for the interface to appear; 0 means
	// DefaultLinkWait.
	LinkWait time.Duration
	// Logger receives debug lines about each step; nil is silent.
	Logger *slog.Logger
}

// HostEntry is one name to address mapping for the hosts file.
type HostEntry struct {
	Name string
	Addr netip.Addr
}

// ErrInvalidConfig is matched (errors.Is) by every *ConfigError.
var ErrInvalidConfig = errors.New("netcfg: invalid network configuration")

// Finer sentinels a *ConfigError wraps, one per kind of mistake.
var (
	ErrMAC      = errors.New("bad MAC address")
	ErrMTU      = errors.New("MTU out of range")
	ErrAddress  = errors.New("bad address or wrong address family")
	ErrGateway  = errors.New("bad gateway")
	ErrDNS      = errors.New("bad nameservers")
	ErrHostName = errors.New("bad host or domain name")
)

// ConfigError reports a Config that Apply refused before touching the
// system. It matches ErrInvalidConfig and unwraps to one of the finer
// sentinels (ErrMTU, ErrGateway, ...).
type ConfigError struct {
	Field  string // the Config field, such as "GatewayIPv4" or "Hosts[2].Name"
	Value  string // the offending value, as text
	Reason string // what is wrong and what would be right
	Err    error  // ErrMAC, ErrMTU, ErrAddress, ErrGateway, ErrDNS or ErrHostName
}

// Error names the field, its value and what is wrong with it.
func (e *ConfigError) Error() string {
	return fmt.Sprintf("netcfg: %s %.80q: %s", e.Field, e.Value, e.Reason)
}

// Unwrap returns the finer sentinel.
func (e *ConfigError) Unwrap() error { return e.Err }

// Is reports whether target is ErrInvalidConfig.
func (e *ConfigError) Is(target error) bool { return target == ErrInvalidConfig }

func cfgErr(sentinel error, field, value, format string, args ...any) *ConfigError {
	return &ConfigError{Field: field, Value: value, Reason: fmt.Sprintf(format, args...), Err: sentinel}
}

// Validate checks c as Apply does and returns the first problem as a
// *ConfigError, or nil.
func (c *Config) Validate() error {
	if len(c.MAC) != 6 {
		return cfgErr(ErrMAC, "MAC", c.MAC.String(), "want six bytes (a virtio-net MAC such as 02:00:00:00:00:01)")
	}
	if allZero(c.MAC) {
		return cfgErr(ErrMAC, "MAC", c.MAC.String(), "the all-zero MAC names no interface")
	}
	if c.MTU != 0 && (c.MTU < MinMTU || c.MTU > MaxMTU) {
		return cfgErr(ErrMTU, "MTU", fmt.Sprint(c.MTU), "want 0 (leave) or %d..%d", MinMTU, MaxMTU)
	}
	if c.IPv6.IsValid() && c.MTU != 0 && c.MTU < MinIPv6MTU {
		return cfgErr(ErrMTU, "MTU", fmt.Sprint(c.MTU), "IPv6 needs an MTU of at least %d; raise the MTU or drop IPv6", MinIPv6MTU)
	}
	if err := c.validateIPv4(); err != nil {
		return err
	}
	if err := c.validateIPv6(); err != nil {
		return err
	}
	if len(c.DNS) > MaxNameservers {
		return cfgErr(ErrDNS, "DNS", fmt.Sprint(c.DNS), "%d nameservers, resolv.conf honours at most %d", len(c.DNS), MaxNameservers)
	}
	for i, a := range c.DNS {
		f := fmt.Sprintf("DNS[%d]", i)
		if err := checkAddr(ErrDNS, f, a); err != nil {
			return err
		}
	}
	if err := c.validateSearch(); err != nil {
		return err
	}
	if len(c.Hosts) > MaxHosts {
		return cfgErr(ErrHostName, "Hosts", fmt.Sprint(len(c.Hosts)), "at most %d entries", MaxHosts)
	}
	for i, h := range c.Hosts {
		f := fmt.Sprintf("Hosts[%d]", i)
		if err := ValidHostName(h.Name); err != nil {
			return cfgErr(ErrHostName, f+".Name", h.Name, "%s", err)
		}
		if lower(h.Name) == "localhost" {
			return cfgErr(ErrHostName, f+".Name", h.Name, "localhost is reserved (always 127.0.0.1 and ::1)")
		}
		if err := checkAddr(ErrAddress, f+".Addr", h.Addr); err != nil {
			return err
		}
		for j := range i {
			if lower(c.Hosts[j].Name) == lower(h.Name) {
				return cfgErr(ErrHostName, f+".Name", h.Name, "listed twice (also Hosts[%d])", j)
			}
		}
	}
	for _, p := range []struct{ field, path string }{{"ResolvConfPath", c.ResolvConfPath}, {"HostsPath", c.HostsPath}} {
		if strings.ContainsRune(p.path, 0) || strings.HasSuffix(p.path, "/") {
			return cfgErr(ErrInvalidConfig, p.field, p.path, "want a file path (or empty for the default)")
		}
	}
	if c.LinkWait < 0 {
		return cfgErr(ErrInvalidConfig, "LinkWait", c.LinkWait.String(), "want 0 (the default, %v) or a positive duration", DefaultLinkWait)
	}
	return nil
}

func (c *Config) validateIPv4() error {
	if c.IPv4 != (netip.Prefix{}) {
		a := c.IPv4.Addr()
		if !c.IPv4.IsValid() || !a.Is4() {
			return cfgErr(ErrAddress, "IPv4", c.IPv4.String(), "want an IPv4 address with a prefix length, such as 100.96.0.2/30")
		}
		if a.IsUnspecified() || a.IsMulticast() || a.IsLoopback() || a == netip.AddrFrom4([4]byte{255, 255, 255, 255}) {
			return cfgErr(ErrAddress, "IPv4", c.IPv4.String(), "not a unicast host address")
		}
		if c.IPv4.Bits() < 31 && (a == c.IPv4.Masked().Addr() || a == broadcast4(c.IPv4)) {
			return cfgErr(ErrAddress, "IPv4", c.IPv4.String(), "is the network or broadcast address of its prefix; pick a host address")
		}
	}
	if !c.GatewayIPv4.IsValid() {
		return nil
	}
	g := c.GatewayIPv4
	switch {
	case !g.Is4():
		return cfgErr(ErrGateway, "GatewayIPv4", g.String(), "not an IPv4 address")
	case !c.IPv4.IsValid():
		return cfgErr(ErrGateway, "GatewayIPv4", g.String(), "an IPv4 gateway needs an IPv4 address (set IPv4)")
	case !c.IPv4.Contains(g):
		return cfgErr(ErrGateway, "GatewayIPv4", g.String(), "outside the interface's prefix %s; it must be reachable on the link", c.IPv4.Masked())
	case g == c.IPv4.Addr():
		return cfgErr(ErrGateway, "GatewayIPv4", g.String(), "is the interface's own address")
	case c.IPv4.Bits() < 31 && (g == c.IPv4.Masked().Addr() || g == broadcast4(c.IPv4)):
		return cfgErr(ErrGateway, "GatewayIPv4", g.String(), "is the network or broadcast address of %s", c.IPv4.Masked())
	}
	return nil
}

func (c *Config) validateIPv6() error {
	if c.IPv6 != (netip.Prefix{}) {
		a := c.IPv6.Addr()
		if !c.IPv6.IsValid() || !a.Is6() || a.Is4In6() {
			return cfgErr(ErrAddress, "IPv6", c.IPv6.String(), "want an IPv6 address with a prefix length, such as fd00::2/64")
		}
		if a.IsUnspecified() || a.IsMulticast() || a.IsLoopback() {
			return cfgErr(ErrAddress, "IPv6", c.IPv6.String(), "not a unicast host address")
		}
	}
	if !c.GatewayIPv6.IsValid() {
		return nil
	}
	g := c.GatewayIPv6
	switch {
	case !g.Is6() || g.Is4In6():
		return cfgErr(ErrGateway, "GatewayIPv6", g.String(), "not an IPv6 address")
	case g.Zone() != "":
		return cfgErr(ErrGateway, "GatewayIPv6", g.String(), "drop the %%zone: the route names the interface")
	case !c.IPv6.IsValid():
		return cfgErr(ErrGateway, "GatewayIPv6", g.String(), "an IPv6 gateway needs an IPv6 address (set IPv6)")
	case g.IsUnspecified() || g.IsMulticast() || g.IsLoopback():
		return cfgErr(ErrGateway, "GatewayIPv6", g.String(), "not a unicast address")
	case g == c.IPv6.Addr():
		return cfgErr(ErrGateway, "GatewayIPv6", g.String(), "is the interface's own address")
	}
	return nil
}

func (c *Config) validateSearch() error {
	if len(c.Search) > MaxSearch {
		return cfgErr(ErrHostName, "Search", strings.Join(c.Search, " "), "%d domains, at most %d", len(c.Search), MaxSearch)
	}
	n := 0
	for i, d := range c.Search {
		if err := ValidHostName(d); err != nil {
			return cfgErr(ErrHostName, fmt.Sprintf("Search[%d]", i), d, "%s", err)
		}
		n += len(d) + 1
	}
	if n > MaxSearchLen {
		return cfgErr(ErrHostName, "Search", strings.Join(c.Search, " "), "%d bytes, resolvers read at most %d", n, MaxSearchLen)
	}
	return nil
}

func checkAddr(sentinel error, field string, a netip.Addr) error {
	switch {
	case !a.IsValid():
		return cfgErr(sentinel, field, "", "missing address")
	case a.Is4In6():
		return cfgErr(sentinel, field, a.String(), "an IPv4-mapped IPv6 address; write the IPv4 address")
	case a.Zone() != "":
		return cfgErr(sentinel, field, a.String(), "drop the %%zone")
	case a.IsUnspecified():
		return cfgErr(sentinel, field, a.String(), "the unspecified address")
	}
	return nil
}

// ValidHostName checks a host or domain name as Validate checks Hosts
// names and Search domains: dot-separated labels of ASCII letters, digits,
// '-' and '_' (used by SRV-style names), each 1..63 bytes and not starting
// or ending with '-', at most 253 bytes in all. A caller that adds the
// guest's hostname to Hosts can check it first and leave it out instead
// of failing the whole Apply.
func ValidHostName(s string) error {
	if s == "" {
		return errors.New("empty name")
	}
	if len(s) > 253 {
		return fmt.Errorf("%d bytes, at most 253", len(s))
	}
	for label := range strings.SplitSeq(s, ".") {
		if label == "" {
			return errors.New("empty label (two dots, or a leading or trailing dot)")
		}
		if len(label) > 63 {
			return fmt.Errorf("label %.20q... is %d bytes, at most 63", label, len(label))
		}
		if label[0] == '-' || label[len(label)-1] == '-' {
			return fmt.Errorf("label %q starts or ends with '-'", label)
		}
		for i := 0; i < len(label); i++ {
			b := label[i]
			if !('a' <= b && b <= 'z' || 'A' <= b && b <= 'Z' || '0' <= b && b <= '9' || b == '-' || b == '_') {
				return fmt.Errorf("byte %q is not a letter, digit, '-' or '_'", b)
			}
		}
	}
	return nil
}

func broadcast4(p netip.Prefix) netip.Addr {
	b := p.Addr().As4()
	for i := p.Bits(); i < 32; i++ {
		b[i/8] |= 0x80 >> (i % 8)
	}
	return netip.AddrFrom4(b)
}

func allZero(b []byte) bool {
	for _, x := range b {
		if x != 0 {
			return false
		}
	}
	return true
}

// lower folds ASCII letters only, as resolvers compare host names.
func lower(s string) string {
	for i := 0; i < len(s); i++ {
		if 'A' <= s[i] && s[i] <= 'Z' {
			b := []byte(s)
			for j := i; j < len(b); j++ {
				if 'A' <= b[j] && b[j] <= 'Z' {
					b[j] += 'a' - 'A'
				}
			}
			return string(b)
		}
	}
	return s
}
