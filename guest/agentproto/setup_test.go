package agentproto

import (
	"strings"
	"testing"
)

func TestRootConfigValidate(t *testing.T) {
	good := []RootConfig{
		{Layers: []string{"L0"}},
		{Layers: []string{"L0", "L1"}, Upper: "upper", UpperSize: 1 << 30},
		{Shares: []string{"image"}},
	}
	for _, r := range good {
		if err := r.Validate(); err != nil {
			t.Errorf("%+v: %v", r, err)
		}
	}
	bad := []RootConfig{
		{},
		{Layers: []string{""}},
		{Layers: []string{"L0", "L0"}},
		{Layers: []string{"L0"}, Upper: "L0"},
		{Layers: []string{"a/b"}},
		{Layers: []string{"with space"}},
		{Layers: []string{strings.Repeat("x", 21)}},
		{Layers: make([]string, MaxLayers+1)},
		{Shares: []string{"t\x00"}},
	}
	for _, r := range bad {
		if err := r.Validate(); err == nil {
			t.Errorf("%+v validated", r)
		}
	}
}

func TestNetConfigValidate(t *testing.T) {
	good := NetConfig{MAC: "02:00:5e:aa:bb:cc", MTU: 65520, IPv4: "100.96.0.2/30", GatewayIPv4: "100.96.0.1",
		IPv6: "fd00::2/64", GatewayIPv6: "fd00::1", DNS: []string{"100.96.0.1"}, Hosts: map[string]string{"host.gosandbox.internal": "100.96.0.1"}}
	if err := good.Validate(); err != nil {
		t.Fatal(err)
	}
	for name, mut := range map[string]func(*NetConfig){
		"mac":        func(n *NetConfig) { n.MAC = "02:00:5e:aa:bb" },
		"mac hex":    func(n *NetConfig) { n.MAC = "02:00:5e:aa:bb:zz" },
		"mtu":        func(n *NetConfig) { n.MTU = 70000 },
		"v4":         func(n *NetConfig) { n.IPv4 = "fd00::2/64" },
		"gw4":        func(n *NetConfig) { n.GatewayIPv4 = "x" },
		"v6":         func(n *NetConfig) { n.IPv6 = "::ffff:1.2.3.4/64" },
		"gw6 no v6":  func(n *NetConfig) { n.IPv6 = "" },
		"dns count":  func(n *NetConfig) { n.DNS = []string{"1.1.1.1", "1.1.1.2", "1.1.1.3", "1.1.1.4"} },
		"dns":        func(n *NetConfig) { n.DNS = []string{"one"} },
		"hosts name": func(n *NetConfig) { n.Hosts = map[string]string{"a b": "1.2.3.4"} },
		"hosts addr": func(n *NetConfig) { n.Hosts = map[string]string{"a": "1.2.3"} },
	} {
		n := good
		mut(&n)
		if err := n.Validate(); err == nil {
			t.Errorf("%s: %+v validated", name, n)
		}
	}
}
