package netcfg

import (
	"errors"
	"net"
	"net/netip"
	"strings"
	"testing"

	"github.com/gosandbox/sandbox/guest/agentproto"
)

func validConfig() Config {
	return Config{
		MAC:         net.HardwareAddr{2, 0, 0, 0, 0, 1},
		MTU:         1500,
		IPv4:        netip.MustParsePrefix("100.96.0.2/30"),
		GatewayIPv4: netip.MustParseAddr("100.96.0.1"),
		IPv6:        netip.MustParsePrefix("fd00::2/64"),
		GatewayIPv6: netip.MustParseAddr("fd00::1"),
		DNS:         []netip.Addr{netip.MustParseAddr("100.96.0.1")},
		Search:      []string{"example.internal"},
		Hosts:       []HostEntry{{"host.gosandbox.internal", netip.MustParseAddr("100.96.0.1")}},
	}
}

func TestValidate(t *testing.T) {
	if err := (&Config{MAC: net.HardwareAddr{2, 0, 0, 0, 0, 1}}).Validate(); err != nil {
		t.Errorf("only a MAC: %v", err)
	}
	c := validConfig()
	if err := c.Validate(); err != nil {
		t.Fatalf("valid config: %v", err)
	}
	p31 := validConfig()
	p31.IPv4, p31.GatewayIPv4 = netip.MustParsePrefix("10.0.0.0/31"), netip.MustParseAddr("10.0.0.1")
	if err := p31.Validate(); err != nil {
		t.Errorf("a /31 with both addresses usable: %v", err)
	}
	ll := validConfig()
	ll.GatewayIPv6 = netip.MustParseAddr("fe80::1")
	if err := ll.Validate(); err != nil {
		t.Errorf("a link-local IPv6 gateway: %v", err)
	}

	bad := []struct {
		name   string
		field  string
		target error
		change func(*Config)
	}{
		{"no MAC", "MAC", ErrMAC, func(c *Config) { c.MAC = nil }},
		{"long MAC", "MAC", ErrMAC, func(c *Config) { c.MAC = make(net.HardwareAddr, 8) }},
		{"zero MAC", "MAC", ErrMAC, func(c *Config) { c.MAC = make(net.HardwareAddr, 6) }},
		{"MTU small", "MTU", ErrMTU, func(c *Config) { c.MTU = 67 }},
		{"MTU large", "MTU", ErrMTU, func(c *Config) { c.MTU = 65536 }},
		{"MTU negative", "MTU", ErrMTU, func(c *Config) { c.MTU = -1 }},
		{"MTU too small for IPv6", "MTU", ErrMTU, func(c *Config) { c.MTU = 1279 }},
		{"IPv4 is v6", "IPv4", ErrAddress, func(c *Config) { c.IPv4 = netip.MustParsePrefix("fd00::2/64") }},
		{"IPv4 mapped", "IPv4", ErrAddress, func(c *Config) { c.IPv4 = netip.MustParsePrefix("::ffff:10.0.0.2/120") }},
		{"IPv4 bad bits", "IPv4", ErrAddress, func(c *Config) { c.IPv4 = netip.PrefixFrom(netip.MustParseAddr("10.0.0.2"), 33) }},
		{"IPv4 network", "IPv4", ErrAddress, func(c *Config) { c.IPv4 = netip.MustParsePrefix("100.96.0.0/30") }},
		{"IPv4 broadcast", "IPv4", ErrAddress, func(c *Config) { c.IPv4 = netip.MustParsePrefix("100.96.0.3/30") }},
		{"IPv4 loopback", "IPv4", ErrAddress, func(c *Config) { c.IPv4 = netip.MustParsePrefix("127.0.0.2/8") }},
		{"IPv4 multicast", "IPv4", ErrAddress, func(c *Config) { c.IPv4 = netip.MustParsePrefix("224.0.0.2/24") }},
		{"gw4 outside", "GatewayIPv4", ErrGateway, func(c *Config) { c.GatewayIPv4 = netip.MustParseAddr("100.96.0.5") }},
		{"gw4 is v6", "GatewayIPv4", ErrGateway, func(c *Config) { c.GatewayIPv4 = netip.MustParseAddr("fd00::1") }},
		{"gw4 self", "GatewayIPv4", ErrGateway, func(c *Config) { c.GatewayIPv4 = netip.MustParseAddr("100.96.0.2") }},
		{"gw4 broadcast", "GatewayIPv4", ErrGateway, func(c *Config) { c.GatewayIPv4 = netip.MustParseAddr("100.96.0.3") }},
		{"gw4 without IPv4", "GatewayIPv4", ErrGateway, func(c *Config) { c.IPv4 = netip.Prefix{} }},
		{"IPv6 is v4", "IPv6", ErrAddress, func(c *Config) { c.IPv6 = netip.MustParsePrefix("10.0.0.2/24") }},
		{"IPv6 mapped", "IPv6", ErrAddress, func(c *Config) { c.IPv6 = netip.MustParsePrefix("::ffff:10.0.0.2/120") }},
		{"IPv6 multicast", "IPv6", ErrAddress, func(c *Config) { c.IPv6 = netip.MustParsePrefix("ff02::2/64") }},
		{"gw6 is v4", "GatewayIPv6", ErrGateway, func(c *Config) { c.GatewayIPv6 = netip.MustParseAddr("10.0.0.1") }},
		{"gw6 without IPv6", "GatewayIPv6", ErrGateway, func(c *Config) { c.IPv6 = netip.Prefix{}; c.MTU = 0 }},
		{"gw6 zone", "GatewayIPv6", ErrGateway, func(c *Config) { c.GatewayIPv6 = netip.MustParseAddr("fe80::1%eth0") }},
		{"gw6 self", "GatewayIPv6", ErrGateway, func(c *Config) { c.GatewayIPv6 = netip.MustParseAddr("fd00::2") }},
		{"gw6 multicast", "GatewayIPv6", ErrGateway, func(c *Config) { c.GatewayIPv6 = netip.MustParseAddr("ff02::1") }},
		{"4 nameservers", "DNS", ErrDNS, func(c *Config) {
			c.DNS = []netip.Addr{netip.MustParseAddr("1.1.1.1"), netip.MustParseAddr("1.1.1.2"), netip.MustParseAddr("1.1.1.3"), netip.MustParseAddr("1.1.1.4")}
		}},
		{"zero nameserver", "DNS[0]", ErrDNS, func(c *Config) { c.DNS = []netip.Addr{{}} }},
		{"nameserver zone", "DNS[0]", ErrDNS, func(c *Config) {
			c.DNS = []netip.Addr{netip.MustParseAddr("fe80::1").WithZone("x\nnameserver 6.6.6.6")}
		}},
		{"unspecified nameserver", "DNS[0]", ErrDNS, func(c *Config) { c.DNS = []netip.Addr{netip.IPv4Unspecified()} }},
		{"search space", "Search[0]", ErrHostName, func(c *Config) { c.Search = []string{"a b"} }},
		{"search newline", "Search[0]", ErrHostName, func(c *Config) { c.Search = []string{"a\nnameserver"} }},
		{"search empty", "Search[0]", ErrHostName, func(c *Config) { c.Search = []string{""} }},
		{"search 7", "Search", ErrHostName, func(c *Config) { c.Search = strings.Fields("a b c d e f g") }},
		{"search long", "Search", ErrHostName, func(c *Config) {
			c.Search = []string{strings.Repeat("a", 60) + "." + strings.Repeat("b", 60), strings.Repeat("c", 63) + ".d", strings.Repeat("e", 63) + ".f", "g.h"}
		}},
		{"host dash", "Hosts[0].Name", ErrHostName, func(c *Config) { c.Hosts[0].Name = "-x.internal" }},
		{"host dots", "Hosts[0].Name", ErrHostName, func(c *Config) { c.Hosts[0].Name = "a..b" }},
		{"host trailing dot", "Hosts[0].Name", ErrHostName, func(c *Config) { c.Hosts[0].Name = "a.b." }},
		{"host hash", "Hosts[0].Name", ErrHostName, func(c *Config) { c.Hosts[0].Name = "a#b" }},
		{"host utf8", "Hosts[0].Name", ErrHostName, func(c *Config) { c.Hosts[0].Name = "bücher" }},
		{"host label 64", "Hosts[0].Name", ErrHostName, func(c *Config) { c.Hosts[0].Name = strings.Repeat("a", 64) }},
		{"host 254", "Hosts[0].Name", ErrHostName, func(c *Config) { c.Hosts[0].Name = strings.Repeat("abc.", 63) + "ab" }},
		{"host localhost", "Hosts[0].Name", ErrHostName, func(c *Config) { c.Hosts[0].Name = "LocalHost" }},
		{"host twice", "Hosts[1].Name", ErrHostName, func(c *Config) {
			c.Hosts = append(c.Hosts, HostEntry{"HOST.gosandbox.internal", netip.MustParseAddr("10.0.0.1")})
		}},
		{"host no addr", "Hosts[0].Addr", ErrAddress, func(c *Config) { c.Hosts[0].Addr = netip.Addr{} }},
		{"host mapped", "Hosts[0].Addr", ErrAddress, func(c *Config) { c.Hosts[0].Addr = netip.MustParseAddr("::ffff:1.2.3.4") }},
		{"too many hosts", "Hosts", ErrHostName, func(c *Config) { c.Hosts = make([]HostEntry, MaxHosts+1) }},
		{"hosts path dir", "HostsPath", ErrInvalidConfig, func(c *Config) { c.HostsPath = "/etc/" }},
		{"resolv path NUL", "ResolvConfPath", ErrInvalidConfig, func(c *Config) { c.ResolvConfPath = "/etc/a\x00" }},
		{"negative wait", "LinkWait", ErrInvalidConfig, func(c *Config) { c.LinkWait = -1 }},
	}
	for _, tc := range bad {
		t.Run(tc.name, func(t *testing.T) {
			c := validConfig()
			tc.change(&c)
			err := c.Validate()
			var ce *ConfigError
			if !errors.As(err, &ce) {
				t.Fatalf("Validate = %v, want a *ConfigError", err)
			}
			if ce.Field != tc.field {
				t.Errorf("Field = %q, want %q (%v)", ce.Field, tc.field, err)
			}
			if !errors.Is(err, ErrInvalidConfig) || !errors.Is(err, tc.target) {
				t.Errorf("%v: want it to match ErrInvalidConfig and %v", err, tc.target)
			}
			if msg := err.Error(); !strings.HasPrefix(msg, "netcfg: "+tc.field) || strings.ContainsRune(msg, '\n') {
				t.Errorf("message %q should start with the field and be one line", msg)
			}
		})
	}
}

func TestFromProto(t *testing.T) {
	n := &agentproto.NetConfig{
		MAC:         "02:47:53:00:00:02",
		MTU:         1400,
		IPv4:        "100.96.0.2/30",
		GatewayIPv4: "100.96.0.1",
		IPv6:        "fd00::2/64",
		GatewayIPv6: "fe80::1",
		DNS:         []string{"100.96.0.1"},
		Hosts:       map[string]string{"z.internal": "10.0.0.9", "host.gosandbox.internal": "100.96.0.1", "a.internal": "fd00::9"},
	}
	if err := n.Validate(); err != nil {
		t.Fatalf("the fixture does not pass agentproto's own check: %v", err)
	}
	c, err := FromProto(n)
	if err != nil {
		t.Fatal(err)
	}
	if c.MAC.String() != n.MAC || c.MTU != 1400 || c.IPv4.String() != n.IPv4 || c.GatewayIPv4.String() != n.GatewayIPv4 ||
		c.IPv6.String() != n.IPv6 || c.GatewayIPv6.String() != n.GatewayIPv6 || len(c.DNS) != 1 || c.DNS[0].String() != "100.96.0.1" {
		t.Errorf("FromProto = %+v", c)
	}
	var names []string
	for _, h := range c.Hosts {
		names = append(names, h.Name+"="+h.Addr.String())
	}
	if got, want := strings.Join(names, " "), "a.internal=fd00::9 host.gosandbox.internal=100.96.0.1 z.internal=10.0.0.9"; got != want {
		t.Errorf("hosts %q, want %q (sorted by name)", got, want)
	}
	if c.ResolvConfPath != "" || c.HostsPath != "" || c.LinkWait != 0 {
		t.Errorf("FromProto set paths or a wait: %+v", c)
	}

	for _, tc := range []struct {
		field  string
		target error
		change func(*agentproto.NetConfig)
	}{
		{"MAC", ErrMAC, func(n *agentproto.NetConfig) { n.MAC = "02:00" }},
		{"IPv4", ErrAddress, func(n *agentproto.NetConfig) { n.IPv4 = "100.96.0.2" }},
		{"GatewayIPv4", ErrGateway, func(n *agentproto.NetConfig) { n.GatewayIPv4 = "100.96.0.9" }},
		{"GatewayIPv6", ErrGateway, func(n *agentproto.NetConfig) { n.GatewayIPv6 = "x" }},
		{"DNS", ErrDNS, func(n *agentproto.NetConfig) { n.DNS = []string{"dns.google"} }},
		{"Hosts[x.internal]", ErrAddress, func(n *agentproto.NetConfig) { n.Hosts = map[string]string{"x.internal": "nowhere"} }},
		{"Hosts[0].Name", ErrHostName, func(n *agentproto.NetConfig) { n.Hosts = map[string]string{"a b": "10.0.0.1"} }},
	} {
		m := *n
		tc.change(&m)
		_, err := FromProto(&m)
		var ce *ConfigError
		if !errors.As(err, &ce) || ce.Field != tc.field || !errors.Is(err, tc.target) {
			t.Errorf("FromProto with a bad %s = %v, want a *ConfigError for that field matching %v", tc.field, err, tc.target)
		}
	}
	if _, err := FromProto(nil); !errors.Is(err, ErrInvalidConfig) {
		t.Errorf("FromProto(nil) = %v, want ErrInvalidConfig", err)
	}
}

// FuzzFromProto checks that whatever strings the host sends, FromProto
// either refuses them with a *ConfigError or returns a Config whose files
// have exactly the lines it asked for (no newline smuggled in).
func FuzzFromProto(f *testing.F) {
	f.Add("02:47:53:00:00:02", 1500, "100.96.0.2/30", "100.96.0.1", "fd00::2/64", "fe80::1", "100.96.0.1", "host.gosandbox.internal", "100.96.0.1")
	f.Add("02:47:53:00:00:02", 0, "10.0.0.2/8", "", "", "", "fe80::1%eth0\nnameserver 1.1.1.1", "a\nb", "::ffff:1.2.3.4")
	f.Fuzz(func(t *testing.T, mac string, mtu int, ip4, gw4, ip6, gw6, dns, host, hostAddr string) {
		n := &agentproto.NetConfig{MAC: mac, MTU: mtu, IPv4: ip4, GatewayIPv4: gw4, IPv6: ip6, GatewayIPv6: gw6,
			DNS: []string{dns}, Hosts: map[string]string{host: hostAddr}}
		c, err := FromProto(n)
		if err != nil {
			var ce *ConfigError
			if !errors.As(err, &ce) || !errors.Is(err, ErrInvalidConfig) {
				t.Fatalf("FromProto error %v is not a *ConfigError", err)
			}
			return
		}
		if got := strings.Count(string(RenderResolvConf(c.DNS, c.Search)), "\n"); got != 2 {
			t.Fatalf("resolv.conf for one nameserver has %d lines", got)
		}
		if got := strings.Count(string(MergeHosts(nil, c.Hosts)), "\n"); got != 4 {
			t.Fatalf("hosts with one entry has %d lines", got)
		}
	})
}

func TestValidHostName(t *testing.T) {
	for _, ok := range []string{"a", "host.gosandbox.internal", "_srv._tcp.example", "x-1.y2", strings.Repeat("a", 63)} {
		if err := ValidHostName(ok); err != nil {
			t.Errorf("ValidHostName(%q) = %v", ok, err)
		}
	}
	for _, bad := range []string{"", ".", "a.", ".a", "a b", "a-", "-a", "é", "a/b", "a\x00", strings.Repeat("a", 64)} {
		if ValidHostName(bad) == nil {
			t.Errorf("ValidHostName(%q) = nil, want an error", bad)
		}
	}
}
