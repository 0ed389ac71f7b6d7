package netstack

import (
	"net/netip"
	"strconv"
	"strings"
)

// Action is what a rule does with a flow it matches.
type Action uint8

// Actions. The zero value means "not set" in Config defaults.
const (
	actionUnset Action = iota
	// Allow lets the flow through.
	Allow
	// Deny refuses (TCP reset, ICMP port unreachable) or drops the flow.
	Deny
)

// String returns "allow" or "deny".
func (a Action) String() string {
	switch a {
	case Allow:
		return "allow"
	case Deny:
		return "deny"
	}
	return "unset"
}

// Direction says which flows a rule applies to.
type Direction uint8

// Directions. Egress flows are opened by the guest; ingress flows come in
// through published ports.
const (
	Egress Direction = 1 << iota
	Ingress
	AnyDirection = Egress | Ingress
)

// String returns "egress", "ingress" or "any".
func (d Direction) String() string {
	switch d {
	case Egress:
		return "egress"
	case Ingress:
		return "ingress"
	case AnyDirection:
		return "any"
	}
	return "none"
}

// Proto is the transport protocol a rule applies to.
type Proto uint8

// Protocols. ProtoAny matches all.
const (
	ProtoAny Proto = iota
	TCP
	UDP
	ICMP
)

// String returns "any", "tcp", "udp" or "icmp".
func (p Proto) String() string {
	switch p {
	case TCP:
		return "tcp"
	case UDP:
		return "udp"
	case ICMP:
		return "icmp"
	}
	return "any"
}

type targetKind uint8

const (
	targetGroup targetKind = iota + 1
	targetPrefix
	targetDomain
	targetSuffix
)

// Target is what a rule matches: an address group, an IP or CIDR, an exact
// domain, or every name under a suffix ("*.example.com").
type Target struct {
	kind   targetKind
	group  Group
	prefix netip.Prefix
	name   string // lower case, no trailing dot; for suffixes without "*."
}

// String returns the target as written in rules.
func (t Target) String() string {
	switch t.kind {
	case targetGroup:
		return t.group.String()
	case targetPrefix:
		s := t.prefix.Addr().String()
		if t.prefix.Bits() != t.prefix.Addr().BitLen() {
			s = t.prefix.String()
		}
		if t.prefix.Addr().Is6() {
			return "[" + s + "]"
		}
		return s
	case targetDomain:
		return t.name
	case targetSuffix:
		return "*." + t.name
	}
	return ""
}

func (t Target) isDomain() bool { return t.kind == targetDomain || t.kind == targetSuffix }

// matchName reports whether a DNS name (lower case, no trailing dot) is
// covered by a domain target.
func (t Target) matchName(name string) bool {
	switch t.kind {
	case targetDomain:
		return name == t.name
	case targetSuffix:
		return len(name) > len(t.name)+1 && strings.HasSuffix(name, t.name) && name[len(name)-len(t.name)-1] == '.'
	}
	return false
}

// matchAddr reports whether an address target covers a, whose group is g.
func (t Target) matchAddr(a netip.Addr, g Group) bool {
	switch t.kind {
	case targetGroup:
		return t.group == GroupAny || t.group == g
	case targetPrefix:
		return t.prefix.Contains(a.Unmap())
	}
	return false
}

// Rule is one parsed network rule.
type Rule struct {
	// Action is Allow or Deny.
	Action Action
	// Direction is Egress (the default), Ingress or AnyDirection.
	Direction Direction
	// Target is the address, group or name the rule matches.
	Target Target
	// Proto is the transport protocol; ProtoAny matches all.
	Proto Proto
	// PortLo and PortHi bound the destination port (the guest port for
	// ingress); both zero means any port.
	PortLo, PortHi uint16
}

// String returns the rule in the syntax ParseRule reads.
func (r Rule) String() string {
	var b strings.Builder
	b.WriteString(r.Action.String())
	if r.Direction != Egress {
		b.WriteString(":" + r.Direction.String())
	}
	b.WriteString("@" + r.Target.String())
	if r.Proto != ProtoAny || r.PortLo != 0 {
		b.WriteString(":" + r.Proto.String())
	}
	if r.PortLo != 0 {
		b.WriteString(":" + strconv.Itoa(int(r.PortLo)))
		if r.PortHi != r.PortLo {
			b.WriteString("-" + strconv.Itoa(int(r.PortHi)))
		}
	}
	return b.String()
}

const maxRuleLen = 1024

// ParseRule parses one rule:
//
//	allow|deny[:egress|ingress|any]@target[:tcp|udp|icmp|any[:port|lo-hi]]
//
// The direction defaults to egress. target is an IP ("10.0.0.1",
// "[2001:db8::1]"), a CIDR ("10.0.0.0/8", "[fd00::/8]"), an exact domain
// ("example.com"), a suffix ("*.example.com", at least two labels after the
// star) or a group: public, private, loopback, link-local, metadata (or meta),
// multicast, host, any. Ports are not allowed with icmp.
func ParseRule(s string) (Rule, error) {
	fail := func(reason string) (Rule, error) { return Rule{}, &RuleError{Rule: s, Reason: reason} }
	if len(s) > maxRuleLen {
		return fail("longer than 1024 bytes")
	}
	head, rest, ok := strings.Cut(strings.TrimSpace(s), "@")
	if !ok {
		return fail("missing '@' between action and target")
	}
	var r Rule
	action, dir, hasDir := strings.Cut(head, ":")
	switch strings.ToLower(action) {
	case "allow":
		r.Action = Allow
	case "deny":
		r.Action = Deny
	default:
		return fail("action must be allow or deny")
	}
	r.Direction = Egress
	if hasDir {
		switch strings.ToLower(dir) {
		case "egress", "out":
			r.Direction = Egress
		case "ingress", "in":
			r.Direction = Ingress
		case "any":
			r.Direction = AnyDirection
		default:
			return fail("direction must be egress, ingress or any")
		}
	}

	// Split the target from the protocol part.
	var target, tail string
	if strings.HasPrefix(rest, "[") {
		end := strings.IndexByte(rest, ']')
		if end < 0 {
			return fail("unclosed '[' in IPv6 target")
		}
		target, tail = rest[1:end], rest[end+1:]
		if tail != "" && tail[0] != ':' {
			return fail("expected ':' after ']'")
		}
		p, err := parsePrefix(target)
		if err != nil || !p.Addr().Is6() {
			return fail("bracketed target must be an IPv6 address or CIDR")
		}
		r.Target = Target{kind: targetPrefix, prefix: p}
	} else {
		if p, err := parsePrefix(rest); err == nil && p.Addr().Is6() {
			// An unbracketed IPv6 target with nothing after it.
			r.Target = Target{kind: targetPrefix, prefix: p}
			return r, nil
		}
		target, tail, _ = strings.Cut(rest, ":")
		if tail != "" || strings.HasSuffix(rest, ":") {
			tail = rest[len(target):]
		}
		t, reason := parseTarget(target)
		if reason != "" {
			return fail(reason)
		}
		r.Target = t
	}
	if tail == "" {
		return r, nil
	}
	tail = tail[1:] // the ':'
	proto, ports, hasPorts := strings.Cut(tail, ":")
	switch strings.ToLower(proto) {
	case "tcp":
		r.Proto = TCP
	case "udp":
		r.Proto = UDP
	case "icmp", "icmpv4", "icmpv6":
		r.Proto = ICMP
	case "any":
		r.Proto = ProtoAny
	default:
		return fail("protocol must be tcp, udp, icmp or any")
	}
	if !hasPorts {
		return r, nil
	}
	if r.Proto == ICMP {
		return fail("icmp rules take no port")
	}
	lo, hi, isRange := strings.Cut(ports, "-")
	plo, err := parsePort(lo)
	if err != nil {
		return fail("port must be a number from 1 to 65535")
	}
	phi := plo
	if isRange {
		if phi, err = parsePort(hi); err != nil {
			return fail("port range end must be a number from 1 to 65535")
		}
		if phi < plo {
			return fail("port range end is below its start")
		}
	}
	r.PortLo, r.PortHi = plo, phi
	return r, nil
}

func parsePort(s string) (uint16, error) {
	if s == "" || len(s) > 5 {
		return 0, strconv.ErrSyntax
	}
	n, err := strconv.ParseUint(s, 10, 16)
	if err != nil || n == 0 {
		return 0, strconv.ErrSyntax
	}
	return uint16(n), nil
}

func parsePrefix(s string) (netip.Prefix, error) {
	if strings.Contains(s, "/") {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return netip.Prefix{}, err
		}
		if p.Addr().Zone() != "" {
			return netip.Prefix{}, strconv.ErrSyntax
		}
		return netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-unmapBits(p.Addr())).Masked(), nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Prefix{}, err
	}
	if a.Zone() != "" {
		return netip.Prefix{}, strconv.ErrSyntax
	}
	a = a.Unmap()
	return netip.PrefixFrom(a, a.BitLen()), nil
}

// unmapBits is the prefix-length adjustment when an IPv4-mapped IPv6 CIDR is
// turned into an IPv4 one.
func unmapBits(a netip.Addr) int {
	if a.Is4In6() {
		return 96
	}
	return 0
}

func parseTarget(s string) (Target, string) {
	if s == "" {
		return Target{}, "empty target"
	}
	ls := strings.ToLower(s)
	if g := parseGroup(ls); g != groupNone {
		return Target{kind: targetGroup, group: g}, ""
	}
	if p, err := parsePrefix(s); err == nil {
		if p.Bits() < 0 {
			return Target{}, "invalid CIDR"
		}
		return Target{kind: targetPrefix, prefix: p}, ""
	}
	if strings.HasPrefix(ls, "*.") {
		name, ok := normalizeName(ls[2:])
		if !ok {
			return Target{}, "invalid domain suffix"
		}
		if !strings.Contains(name, ".") {
			return Target{}, "a *.suffix target needs at least two labels (e.g. *.example.com)"
		}
		return Target{kind: targetSuffix, name: name}, ""
	}
	name, ok := normalizeName(ls)
	if !ok {
		return Target{}, "target is not an IP, CIDR, domain, *.suffix or group"
	}
	return Target{kind: targetDomain, name: name}, ""
}

// normalizeName lower-cases a DNS name, strips one trailing dot and checks it
// is made of valid hostname labels.
func normalizeName(s string) (string, bool) {
	s = strings.TrimSuffix(strings.ToLower(s), ".")
	if s == "" || len(s) > 253 {
		return "", false
	}
	for label := range strings.SplitSeq(s, ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return "", false
		}
		for i := 0; i < len(label); i++ {
			c := label[i]
			if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
				return "", false
			}
		}
	}
	// All-numeric final label would be an IP-looking name.
	last := s[strings.LastIndexByte(s, '.')+1:]
	if strings.Trim(last, "0123456789") == "" {
		return "", false
	}
	return s, true
}

// ParseRules parses each rule; the error names the first bad one.
func ParseRules(rules ...string) ([]Rule, error) {
	out := make([]Rule, 0, len(rules))
	for _, s := range rules {
		r, err := ParseRule(s)
		if err != nil {
			return nil, err
		}
		out = append(out, r)
	}
	return out, nil
}

// flow is what a policy decides on.
type flow struct {
	dir   Direction
	proto Proto
	addr  netip.Addr // destination for egress, peer for ingress
	port  uint16     // destination port (guest port for ingress); 0 for ICMP
}

// policy is a compiled rule list with defaults.
type policy struct {
	rules          []Rule
	defaultEgress  Action // actionUnset: public only
	defaultIngress Action
	gateways       []netip.Addr
	pins           *pinTable
}

func (p *policy) matchesFlow(r *Rule, f flow, g Group) bool {
	if r.Direction&f.dir == 0 {
		return false
	}
	if r.Proto != ProtoAny && r.Proto != f.proto {
		return false
	}
	if r.PortLo != 0 && (f.port < r.PortLo || f.port > r.PortHi) {
		return false
	}
	if r.Target.isDomain() {
		return f.dir == Egress && p.pins != nil && p.pins.matches(r.Target, f.addr)
	}
	return r.Target.matchAddr(f.addr, g)
}

// decide returns the action for a flow: the first matching rule, or the
// default of its direction. Anything unexpected denies.
func (p *policy) decide(f flow) Action {
	if !f.addr.IsValid() {
		return Deny
	}
	g := classify(f.addr, p.gateways)
	for i := range p.rules {
		if p.matchesFlow(&p.rules[i], f, g) {
			return p.rules[i].Action
		}
	}
	switch f.dir {
	case Egress:
		if p.defaultEgress == actionUnset {
			if g == GroupPublic {
				return Allow
			}
			return Deny
		}
		return p.defaultEgress
	case Ingress:
		if p.defaultIngress == actionUnset {
			return Allow
		}
		return p.defaultIngress
	}
	return Deny
}

// nameBlocked reports whether DNS lookups of name are answered with NXDOMAIN:
// the first egress domain rule that covers the name for every protocol and
// port is a deny rule.
func (p *policy) nameBlocked(name string) bool {
	for i := range p.rules {
		r := &p.rules[i]
		if r.Direction&Egress == 0 || !r.Target.isDomain() || r.Proto != ProtoAny || r.PortLo != 0 {
			continue
		}
		if r.Target.matchName(name) {
			return r.Action == Deny
		}
	}
	return false
}

// addressExplicitlyAllowed reports whether the first egress address rule
// (IP, CIDR or group; any protocol or port) covering a allows it. Defaults do
// not count. Rebind protection keeps private answers only when this holds.
func (p *policy) addressExplicitlyAllowed(a netip.Addr) bool {
	g := classify(a, p.gateways)
	for i := range p.rules {
		r := &p.rules[i]
		if r.Direction&Egress == 0 || r.Target.isDomain() {
			continue
		}
		if r.Target.matchAddr(a, g) {
			return r.Action == Allow
		}
	}
	return false
}
