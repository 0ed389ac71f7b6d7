package netstack

import (
	"errors"
	"net/netip"
	"testing"
	"time"
)

func TestParseRule(t *testing.T) {
	good := []struct {
		in   string
		want string // canonical String(); "" means same as in
	}{
		{"allow@public", ""},
		{"deny@private", ""},
		{"allow:egress@host:tcp:8080", "allow@host:tcp:8080"},
		{"allow:ingress@loopback:tcp:8000-8100", ""},
		{"deny:any@any", ""},
		{"allow@meta", "allow@metadata"},
		{"allow@link-local:udp", ""},
		{"allow@10.0.0.0/8:tcp:443", ""},
		{"allow@10.1.2.3/8", "allow@10.0.0.0/8"},
		{"allow@192.0.2.1", ""},
		{"allow@[2001:db8::1]:tcp:443", ""},
		{"allow@[2001:db8::/32]", ""},
		{"allow@2001:db8::1", "allow@[2001:db8::1]"},
		{"allow@Example.COM.", "allow@example.com"},
		{"deny@*.evil.example:tcp", ""},
		{"allow@api.example.com:any:443", ""},
		{"allow@multicast:icmp", ""},
		{"ALLOW:EGRESS@PUBLIC:TCP", "allow@public:tcp"},
	}
	for _, tc := range good {
		r, err := ParseRule(tc.in)
		if err != nil {
			t.Errorf("ParseRule(%q) = %v", tc.in, err)
			continue
		}
		want := tc.want
		if want == "" {
			want = tc.in
		}
		if got := r.String(); got != want {
			t.Errorf("ParseRule(%q).String() = %q, want %q", tc.in, got, want)
		}
	}
	bad := []string{
		"", "allow", "allow@", "permit@public", "allow:sideways@public", "allow@public:sctp",
		"allow@public:tcp:0", "allow@public:tcp:65536", "allow@public:tcp:9-1", "allow@public:icmp:1",
		"allow@*.com", "allow@*.", "allow@-bad.example", "allow@[10.0.0.1]", "allow@[2001:db8::1",
		"allow@[2001:db8::1]x", "allow@public:tcp:1-", "allow@bad..name", "allow@1.2.3.4/33",
		"allow@public:", "allow@fe80::1%eth0", "allow@ex ample.com", "allow@123.456",
	}
	for _, s := range bad {
		_, err := ParseRule(s)
		var re *RuleError
		if !errors.As(err, &re) || !errors.Is(err, ErrInvalidRule) {
			t.Errorf("ParseRule(%q) = %v, want a *RuleError wrapping ErrInvalidRule", s, err)
		}
	}
}

func TestClassify(t *testing.T) {
	gw := netip.MustParseAddr("100.96.0.1")
	for addr, want := range map[string]Group{
		"8.8.8.8":                GroupPublic,
		"2606:4700::1111":        GroupPublic,
		"10.0.0.1":               GroupPrivate,
		"172.16.5.4":             GroupPrivate,
		"192.168.1.1":            GroupPrivate,
		"100.64.0.1":             GroupPrivate,
		"fd00::1":                GroupPrivate,
		"127.0.0.1":              GroupLoopback,
		"127.8.8.8":              GroupLoopback,
		"::1":                    GroupLoopback,
		"0.0.0.0":                GroupLoopback,
		"::":                     GroupLoopback,
		"::ffff:127.0.0.1":       GroupLoopback,
		"64:ff9b::a00:1":         GroupPrivate, // NAT64 of 10.0.0.1
		"169.254.169.254":        GroupMetadata,
		"fd00:ec2::254":          GroupMetadata,
		"169.254.1.1":            GroupLinkLocal,
		"fe80::1":                GroupLinkLocal,
		"224.0.0.1":              GroupMulticast,
		"255.255.255.255":        GroupMulticast,
		"ff02::1":                GroupMulticast,
		"100.96.0.1":             GroupHost,
		"::ffff:100.96.0.1":      GroupHost,
		"240.0.0.1":              GroupPrivate,
		"::ffff:169.254.169.254": GroupMetadata,
	} {
		if got := classify(netip.MustParseAddr(addr), []netip.Addr{gw}); got != want {
			t.Errorf("classify(%s) = %v, want %v", addr, got, want)
		}
	}
}

func TestPolicyNames(t *testing.T) {
	p := &policy{rules: mustRules(t, "allow@ok.evil.test", "deny@*.evil.test", "deny@port.test:tcp:443", "deny:ingress@in.test", "allow@10.0.0.0/8:tcp:5432", "deny@192.168.0.0/16", "allow@private")}
	for name, want := range map[string]bool{
		"ok.evil.test": false, "x.evil.test": true, "a.b.evil.test": true, "evil.test": false,
		"port.test": false, "in.test": false, "fine.test": false,
	} {
		if got := p.nameBlocked(name); got != want {
			t.Errorf("nameBlocked(%q) = %v, want %v", name, got, want)
		}
	}
	for addr, want := range map[string]bool{"10.1.1.1": true, "192.168.1.1": false, "172.16.0.1": true, "8.8.8.8": false} {
		if got := p.addressExplicitlyAllowed(netip.MustParseAddr(addr)); got != want {
			t.Errorf("addressExplicitlyAllowed(%s) = %v, want %v", addr, got, want)
		}
	}
}

func TestPins(t *testing.T) {
	clk := newFakeClock()
	pt := newPinTable(clk.Now)
	a := netip.MustParseAddr("198.51.100.1")
	exact, _ := parseTarget("a.svc.test")
	suffix, _ := parseTarget("*.svc.test")
	apex, _ := parseTarget("svc.test")
	pt.record("a.svc.test", a, 10*time.Second)
	if pt.matches(apex, a) {
		t.Error("pin for a.svc.test matched the rule for svc.test")
	}
	if !pt.matches(exact, a) || !pt.matches(suffix, a) {
		t.Error("fresh pin does not match")
	}
	if pt.matches(exact, netip.MustParseAddr("198.51.100.2")) {
		t.Error("pin matched an address never resolved")
	}
	clk.Sleep(t.Context(), minPinTTL+time.Second)
	if pt.matches(exact, a) {
		t.Error("expired pin still matches")
	}
	for i := range maxPinnedAddrs + 10 {
		pt.record("n"+string(rune('a'+i%26))+".test", netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}), time.Minute)
	}
	if pt.len() > maxPinnedAddrs {
		t.Errorf("pin table holds %d entries, bound is %d", pt.len(), maxPinnedAddrs)
	}
}

func FuzzParseRule(f *testing.F) {
	for _, s := range []string{
		"allow@public", "deny:ingress@10.0.0.0/8:tcp:1-1024", "allow@[2001:db8::/32]:udp:53",
		"allow@*.example.com", "deny@example.com:icmp", "allow:any@any:any:80", "allow@::1", "allow@[::ffff:1.2.3.4]",
		"allow@1.2.3.4:tcp:", "deny@[", "allow@host:tcp:65535",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		r, err := ParseRule(s)
		if err != nil {
			if !errors.Is(err, ErrInvalidRule) {
				t.Fatalf("ParseRule(%q) error %v does not wrap ErrInvalidRule", s, err)
			}
			return
		}
		// The canonical form parses back to the same rule.
		r2, err := ParseRule(r.String())
		if err != nil {
			t.Fatalf("ParseRule(%q).String() = %q does not parse: %v", s, r.String(), err)
		}
		if r2 != r {
			t.Fatalf("round trip of %q: %+v != %+v", s, r2, r)
		}
		if r.PortLo > r.PortHi || (r.PortLo == 0) != (r.PortHi == 0) {
			t.Fatalf("bad port range in %+v", r)
		}
	})
}
