package netcfg

import (
	"bytes"
	"errors"
	"testing"

	"golang.org/x/sys/unix"
)

// linkMessage builds an RTM_NEWLINK message as the kernel sends one.
func linkMessage(seq uint32, index int32, name string, mac []byte, mtu uint32) []byte {
	r := newRequest(unix.RTM_NEWLINK, unix.NLM_F_MULTI, ifInfoMsg(unix.AF_UNSPEC, index, unix.IFF_UP, 0))
	r.attr(unix.IFLA_IFNAME, cstring(name)).attr(unix.IFLA_ADDRESS, mac).attr(unix.IFLA_MTU, u32(mtu))
	ne.PutUint32(r.b[0:4], uint32(len(r.b)))
	ne.PutUint32(r.b[8:12], seq)
	return r.b
}

func errorMessage(seq uint32, errno unix.Errno, extack string) []byte {
	flags := uint16(0)
	data := ne.AppendUint32(nil, uint32(-int32(errno)))
	echo := newRequest(unix.RTM_NEWADDR, 0, make([]byte, ifAddrMsgLen)).attr(unix.IFA_LOCAL, []byte{10, 0, 0, 1})
	ne.PutUint32(echo.b[0:4], uint32(len(echo.b)))
	data = append(data, echo.b...)
	if extack != "" {
		flags |= unix.NLM_F_ACK_TLVS
		data = appendAttr(data, unix.NLMSGERR_ATTR_MSG, cstring(extack))
	}
	r := newRequest(unix.NLMSG_ERROR, flags, data)
	ne.PutUint16(r.b[6:8], flags) // newRequest adds NLM_F_REQUEST
	ne.PutUint32(r.b[0:4], uint32(len(r.b)))
	ne.PutUint32(r.b[8:12], seq)
	return r.b
}

func TestParseNetlink(t *testing.T) {
	mac := []byte{2, 0, 0, 0, 0, 7}
	b := append(linkMessage(7, 3, "eth0", mac, 1500), linkMessage(7, 4, "eth1", []byte{2, 0, 0, 0, 0, 8}, 9000)...)
	b = append(b, errorMessage(8, unix.EACCES, "IPv6 is disabled on this device")...)
	msgs, err := parseNetlink(b)
	if err != nil || len(msgs) != 3 {
		t.Fatalf("parseNetlink = %d messages, %v; want 3", len(msgs), err)
	}
	l, err := parseLink(msgs[0].data)
	if err != nil || l.index != 3 || l.name != "eth0" || !bytes.Equal(l.mac, mac) || l.mtu != 1500 || l.flags&unix.IFF_UP == 0 || msgs[0].seq != 7 {
		t.Errorf("first link = %+v, %v", l, err)
	}
	if l, _ := parseLink(msgs[1].data); l.name != "eth1" || l.mtu != 9000 {
		t.Errorf("second link = %+v", l)
	}
	err = ackError(msgs[2])
	var ke *kernelError
	if !errors.Is(err, unix.EACCES) || !errors.As(err, &ke) || ke.Msg != "IPv6 is disabled on this device" {
		t.Errorf("ackError = %v, want EACCES with the kernel's message", err)
	}
	if err := ackError(nlMsg{typ: unix.NLMSG_ERROR, data: make([]byte, 20)}); err != nil {
		t.Errorf("an ack decoded as %v", err)
	}

	for name, bad := range map[string][]byte{
		"short header":     make([]byte, 15),
		"length too small": append(ne.AppendUint32(nil, 8), make([]byte, 12)...),
		"length too large": append(ne.AppendUint32(nil, 17), make([]byte, 12)...),
		"trailing bytes":   append(linkMessage(1, 1, "lo", nil, 0), 1, 2, 3),
	} {
		if _, err := parseNetlink(bad); !errors.Is(err, errNetlink) {
			t.Errorf("%s: parseNetlink = %v, want errNetlink", name, err)
		}
	}
	if _, err := parseLink(make([]byte, 15)); !errors.Is(err, errNetlink) {
		t.Errorf("short link message: %v", err)
	}
	if _, err := parseAttrs([]byte{3, 0, 1, 0}); !errors.Is(err, errNetlink) {
		t.Errorf("attribute length 3: %v", err)
	}
	if _, err := parseAttrs([]byte{9, 0, 1, 0, 0, 0, 0, 0}); !errors.Is(err, errNetlink) {
		t.Errorf("attribute past the end: %v", err)
	}
	if err := ackError(nlMsg{data: []byte{1, 2}}); !errors.Is(err, errNetlink) {
		t.Errorf("short error message: %v", err)
	}
}

// FuzzParseNetlink feeds arbitrary datagrams to the parser: it must return
// messages that lie inside the input, or errNetlink, and never panic.
func FuzzParseNetlink(f *testing.F) {
	f.Add(linkMessage(1, 2, "eth0", []byte{2, 0, 0, 0, 0, 1}, 1500))
	f.Add(errorMessage(3, unix.EINVAL, "bad"))
	f.Add(errorMessage(3, 0, ""))
	f.Add(append(linkMessage(1, 1, "lo", nil, 65536), errorMessage(2, unix.EEXIST, "")...))
	f.Fuzz(func(t *testing.T, b []byte) {
		msgs, err := parseNetlink(b)
		if err != nil {
			if !errors.Is(err, errNetlink) {
				t.Fatalf("error %v does not wrap errNetlink", err)
			}
			return
		}
		total := 0
		for _, m := range msgs {
			total += nlmsgHdrLen + len(m.data)
			switch m.typ {
			case unix.NLMSG_ERROR:
				_ = ackError(m)
			default:
				if l, err := parseLink(m.data); err == nil && len(l.mac) > len(m.data) {
					t.Fatalf("MAC of %d bytes from a %d-byte message", len(l.mac), len(m.data))
				} else if err != nil && !errors.Is(err, errNetlink) {
					t.Fatalf("parseLink error %v does not wrap errNetlink", err)
				}
			}
		}
		if total > len(b) {
			t.Fatalf("messages cover %d bytes of a %d-byte datagram", total, len(b))
		}
	})
}
