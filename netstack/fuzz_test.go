package netstack

import (
	"context"
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"testing"

	"golang.org/x/net/dns/dnsmessage"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// refuseDialer never opens a socket: fuzzed flows must not leave the process.
type refuseDialer struct{}

func (refuseDialer) DialContext(context.Context, string, string) (net.Conn, error) {
	return nil, errors.New("refuseDialer: no dialing while fuzzing")
}

func fuzzNetwork(f *testing.F) *Network {
	n, err := New(Config{
		Name:   "fuzz",
		Rules:  mustRules(f, "allow@10.0.0.0/8", "deny@blocked.test"),
		DNS:    DNSConfig{ResolvConf: "/nonexistent"},
		Dialer: refuseDialer{},
		Output: FrameWriterFunc(func([]byte) error { return nil }),
	})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { n.Close() })
	return n
}

func FuzzDNSQuery(f *testing.F) {
	for _, name := range []string{"svc.test.", "blocked.test.", HostAlias + "."} {
		for _, typ := range []dnsmessage.Type{dnsmessage.TypeA, dnsmessage.TypeAAAA, dnsmessage.TypeTXT} {
			f.Add(buildQuery(f, name, typ), false)
		}
	}
	f.Add([]byte{0, 1, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0}, true)
	f.Add([]byte{0, 1, 0x28, 0, 0, 1, 0, 0, 0, 0, 0, 0}, false)
	n := fuzzNetwork(f)
	f.Fuzz(func(t *testing.T, q []byte, viaTCP bool) {
		resp := n.dns.answer(q, viaTCP)
		if resp == nil {
			return
		}
		var m dnsmessage.Message
		if err := m.Unpack(resp); err != nil {
			t.Fatalf("answer(%x) produced an unparsable response: %v", q, err)
		}
		if !m.Header.Response || len(q) < 2 || m.Header.ID != binary.BigEndian.Uint16(q) {
			t.Fatalf("answer(%x): response bit %v, ID %d", q, m.Header.Response, m.Header.ID)
		}
		if !viaTCP && len(resp) > 4096 {
			t.Fatalf("UDP response of %d bytes", len(resp))
		}
	})
}

func FuzzDNSResponse(f *testing.F) {
	r := &testResolver{zone: testZone}
	for _, name := range []string{"svc.test.", "rebind.test.", "mixed.test.", "meta.test.", "nope.test."} {
		f.Add(r.respond(buildQuery(f, name, dnsmessage.TypeA)))
		f.Add(r.respond(buildQuery(f, name, dnsmessage.TypeAAAA)))
	}
	n := fuzzNetwork(f)
	f.Fuzz(func(t *testing.T, b []byte) {
		if len(b) < 12 {
			return
		}
		var p dnsmessage.Parser
		if _, err := p.Start(b); err != nil {
			return
		}
		q, err := p.Question()
		if err != nil {
			return
		}
		m := validResponse(b, binary.BigEndian.Uint16(b), q)
		if m == nil {
			return
		}
		name, ok := normalizeName(q.Name.String())
		if !ok {
			return
		}
		h := dnsmessage.Header{ID: 77, RecursionDesired: true}
		out := finish(n.dns.filter(h, q, name, m), 512)
		var got dnsmessage.Message
		if err := got.Unpack(out); err != nil {
			t.Fatalf("filtered response does not parse: %v", err)
		}
		if got.Header.ID != 77 || len(out) > 512 {
			t.Fatalf("filtered response: ID %d, %d bytes", got.Header.ID, len(out))
		}
		// Rebind protection: no private address unless a rule allows it.
		for _, rr := range got.Answers {
			var a netip.Addr
			switch body := rr.Body.(type) {
			case *dnsmessage.AResource:
				a = netip.AddrFrom4(body.A)
			case *dnsmessage.AAAAResource:
				a = netip.AddrFrom16(body.AAAA).Unmap()
			default:
				continue
			}
			if classify(a, n.pol.gateways) != GroupPublic && !n.pol.addressExplicitlyAllowed(a) {
				t.Fatalf("rebind protection let %v through", a)
			}
		}
	})
}

func FuzzDeliverFrame(f *testing.F) {
	n := fuzzNetwork(f)
	g := n.Guest()
	eth := header.EthernetMinimumSize
	f.Add(uint16(header.ARPProtocolNumber), arpRequest(n, n.g4, n.gw4)[eth:], false, uint16(0), uint16(0), false)
	f.Add(uint16(header.IPv6ProtocolNumber), neighborSolicit(n, n.g6, n.gw6, false)[eth:], false, uint16(0), uint16(0), false)
	f.Add(uint16(header.IPv4ProtocolNumber), echoRequestV4(n, netip.MustParseAddr("10.1.1.1"), 1, 1, []byte("x"))[eth:], false, uint16(0), uint16(0), false)
	f.Add(uint16(header.IPv4ProtocolNumber), echoRequestV4(n, n.gw4, 1, 1, []byte("x"))[eth:], true, uint16(34), uint16(2), false)
	f.Add(uint16(header.IPv4ProtocolNumber), echoRequestV4(n, n.gw4, 1, 1, make([]byte, 3000))[eth:], false, uint16(0), uint16(0), true)
	f.Add(uint16(0x8100), []byte{1, 2, 3}, true, uint16(65535), uint16(65535), true)
	f.Fuzz(func(t *testing.T, typ uint16, payload []byte, needsCsum bool, start, off uint16, segmented bool) {
		frame := ethFrame(tcpip.LinkAddress(g.MAC), n.gwMAC, tcpip.NetworkProtocolNumber(typ), payload)
		var err error
		if needsCsum || segmented {
			err = n.DeliverFrameOffload(frame, Offload{NeedsChecksum: needsCsum, ChecksumStart: start, ChecksumOffset: off, Segmented: segmented})
		} else {
			err = n.DeliverFrame(frame)
		}
		if err != nil && !errors.Is(err, ErrFrameInvalid) {
			t.Fatalf("DeliverFrame = %v", err)
		}
	})
}
