package netcfg

import (
	"encoding/binary"
	"errors"
	"fmt"
	"time"

	"golang.org/x/sys/unix"
)

// Sizes of the fixed netlink structures (linux/netlink.h, rtnetlink.h).
const (
	nlmsgHdrLen   = 16 // struct nlmsghdr
	ifInfoMsgLen  = 16 // struct ifinfomsg
	ifAddrMsgLen  = 8  // struct ifaddrmsg
	rtMsgLen      = 12 // struct rtmsg
	rtAttrHdrLen  = 4  // struct rtattr
	nlRecvBufSize = 64 << 10
	// nlTimeout bounds every wait for the kernel's answer, so a socket
	// that never answers cannot hang the guest's boot.
	nlTimeout = 5 * time.Second
)

// errNetlink marks malformed netlink data (from the kernel, in practice
// never; the parser still checks every length).
var errNetlink = errors.New("netcfg: malformed netlink message")

var ne = binary.NativeEndian

func align4(n int) int { return (n + 3) &^ 3 }

// nlMsg is one parsed netlink message; data is its payload.
type nlMsg struct {
	typ   uint16
	flags uint16
	seq   uint32
	data  []byte
}

// parseNetlink splits a datagram into messages. Every length is checked
// against what is left of b.
func parseNetlink(b []byte) ([]nlMsg, error) {
	var msgs []nlMsg
	for len(b) > 0 {
		if len(b) < nlmsgHdrLen {
			return nil, fmt.Errorf("%w: %d trailing bytes, shorter than a header", errNetlink, len(b))
		}
		n := int(ne.Uint32(b[0:4]))
		if n < nlmsgHdrLen || n > len(b) {
			return nil, fmt.Errorf("%w: message length %d with %d bytes left", errNetlink, n, len(b))
		}
		msgs = append(msgs, nlMsg{
			typ:   ne.Uint16(b[4:6]),
			flags: ne.Uint16(b[6:8]),
			seq:   ne.Uint32(b[8:12]),
			data:  b[nlmsgHdrLen:n],
		})
		b = b[min(align4(n), len(b)):]
	}
	return msgs, nil
}

// nlAttr is one route attribute; typ has the nested and byte-order flags
// cleared.
type nlAttr struct {
	typ  uint16
	data []byte
}

// parseAttrs splits a run of route attributes.
func parseAttrs(b []byte) ([]nlAttr, error) {
	var attrs []nlAttr
	for len(b) > 0 {
		if len(b) < rtAttrHdrLen {
			return nil, fmt.Errorf("%w: %d trailing attribute bytes", errNetlink, len(b))
		}
		n := int(ne.Uint16(b[0:2]))
		if n < rtAttrHdrLen || n > len(b) {
			return nil, fmt.Errorf("%w: attribute length %d with %d bytes left", errNetlink, n, len(b))
		}
		attrs = append(attrs, nlAttr{typ: ne.Uint16(b[2:4]) &^ (unix.NLA_F_NESTED | unix.NLA_F_NET_BYTEORDER), data: b[rtAttrHdrLen:n]})
		b = b[min(align4(n), len(b)):]
	}
	return attrs, nil
}

// linkInfo is what Apply needs to know of one interface.
type linkInfo struct {
	index int32
	flags uint32
	name  string
	mac   []byte
	mtu   uint32
}

// parseLink decodes an RTM_NEWLINK payload.
func parseLink(data []byte) (linkInfo, error) {
	if len(data) < ifInfoMsgLen {
		return linkInfo{}, fmt.Errorf("%w: link message of %d bytes", errNetlink, len(data))
	}
	l := linkInfo{index: int32(ne.Uint32(data[4:8])), flags: ne.Uint32(data[8:12])}
	attrs, err := parseAttrs(data[ifInfoMsgLen:])
	if err != nil {
		return linkInfo{}, err
	}
	for _, a := range attrs {
		switch a.typ {
		case unix.IFLA_IFNAME:
			name := a.data
			for i, c := range name {
				if c == 0 {
					name = name[:i]
					break
				}
			}
			l.name = string(name)
		case unix.IFLA_ADDRESS:
			l.mac = a.data
		case unix.IFLA_MTU:
			if len(a.data) >= 4 {
				l.mtu = ne.Uint32(a.data)
			}
		}
	}
	return l, nil
}

// nlBuilder builds one request: a header, a fixed structure, attributes.
type nlBuilder struct{ b []byte }

func newRequest(typ, flags uint16, fixed []byte) *nlBuilder {
	b := make([]byte, nlmsgHdrLen, 256)
	ne.PutUint16(b[4:6], typ)
	ne.PutUint16(b[6:8], flags|unix.NLM_F_REQUEST)
	b = append(b, fixed...)
	return &nlBuilder{b: b}
}

// attr appends one attribute, padded to four bytes.
func (r *nlBuilder) attr(typ uint16, data []byte) *nlBuilder {
	r.b = appendAttr(r.b, typ, data)
	return r
}

func appendAttr(b []byte, typ uint16, data []byte) []byte {
	var h [rtAttrHdrLen]byte
	ne.PutUint16(h[0:2], uint16(rtAttrHdrLen+len(data)))
	ne.PutUint16(h[2:4], typ)
	b = append(b, h[:]...)
	b = append(b, data...)
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}

func u32(v uint32) []byte { return ne.AppendUint32(nil, v) }

func cstring(s string) []byte { return append([]byte(s), 0) }

func ifInfoMsg(family uint8, index int32, flags, change uint32) []byte {
	b := make([]byte, ifInfoMsgLen)
	b[0] = family
	ne.PutUint32(b[4:8], uint32(index))
	ne.PutUint32(b[8:12], flags)
	ne.PutUint32(b[12:16], change)
	return b
}

// rtnl is one NETLINK_ROUTE socket. It lives in the network namespace of
// the thread that opened it.
type rtnl struct {
	fd  int
	seq uint32
	buf []byte
}

func dialRoute() (*rtnl, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("open a netlink socket: %w", err)
	}
	tv := unix.NsecToTimeval(nlTimeout.Nanoseconds())
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("netlink socket timeout: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("bind a netlink socket: %w", err)
	}
	// Ask for extended acks (error strings); older kernels refuse it, which is fine.
	_ = unix.SetsockoptInt(fd, unix.SOL_NETLINK, unix.NETLINK_EXT_ACK, 1)
	return &rtnl{fd: fd, buf: make([]byte, nlRecvBufSize)}, nil
}

func (c *rtnl) close() {
	if c.fd >= 0 {
		unix.Close(c.fd)
		c.fd = -1
	}
}

func (c *rtnl) send(r *nlBuilder) (uint32, error) {
	c.seq++
	ne.PutUint32(r.b[0:4], uint32(len(r.b)))
	ne.PutUint32(r.b[8:12], c.seq)
	if err := unix.Sendto(c.fd, r.b, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return 0, fmt.Errorf("netlink send: %w", err)
	}
	return c.seq, nil
}

// recv reads one datagram from the kernel and parses it.
func (c *rtnl) recv() ([]nlMsg, error) {
	for {
		n, _, rflags, from, err := unix.Recvmsg(c.fd, c.buf, nil, 0)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if errors.Is(err, unix.EAGAIN) {
			return nil, fmt.Errorf("netlink: no answer from the kernel in %v: %w", nlTimeout, err)
		}
		if err != nil {
			return nil, fmt.Errorf("netlink receive: %w", err)
		}
		if sa, ok := from.(*unix.SockaddrNetlink); !ok || sa.Pid != 0 {
			continue // not from the kernel
		}
		if rflags&unix.MSG_TRUNC != 0 {
			return nil, fmt.Errorf("%w: datagram larger than %d bytes", errNetlink, len(c.buf))
		}
		return parseNetlink(c.buf[:n])
	}
}

// do sends a request that wants an acknowledgement and waits for it.
func (c *rtnl) do(r *nlBuilder) error {
	ne.PutUint16(r.b[6:8], ne.Uint16(r.b[6:8])|unix.NLM_F_ACK)
	seq, err := c.send(r)
	if err != nil {
		return err
	}
	for {
		msgs, err := c.recv()
		if err != nil {
			return err
		}
		for _, m := range msgs {
			if m.seq != seq || m.typ != unix.NLMSG_ERROR {
				continue
			}
			return ackError(m)
		}
	}
}

// ackError decodes an NLMSG_ERROR message: nil for an ack, else the
// errno (with the kernel's extended-ack message, if any).
func ackError(m nlMsg) error {
	data := m.data
	if len(data) < 4 {
		return fmt.Errorf("%w: error message of %d bytes", errNetlink, len(data))
	}
	code := int32(ne.Uint32(data[0:4]))
	if code == 0 {
		return nil
	}
	errno := unix.Errno(uint32(-int64(code)))
	if msg := extAckMsg(m); msg != "" {
		return &kernelError{Errno: errno, Msg: msg}
	}
	return errno
}

// extAckMsg finds NLMSGERR_ATTR_MSG after the echoed request: the whole
// request, or only its header when the kernel capped the echo.
func extAckMsg(m nlMsg) string {
	if m.flags&unix.NLM_F_ACK_TLVS == 0 || len(m.data) < 4+nlmsgHdrLen {
		return ""
	}
	echoed := nlmsgHdrLen
	if m.flags&unix.NLM_F_CAPPED == 0 {
		echoed = align4(int(ne.Uint32(m.data[4:8])))
	}
	if echoed < nlmsgHdrLen || 4+echoed > len(m.data) {
		return ""
	}
	attrs, err := parseAttrs(m.data[4+echoed:])
	if err != nil {
		return ""
	}
	for _, a := range attrs {
		if a.typ == unix.NLMSGERR_ATTR_MSG {
			s := a.data
			for i, c := range s {
				if c == 0 {
					s = s[:i]
					break
				}
			}
			return string(s)
		}
	}
	return ""
}

// kernelError is an errno with the kernel's explanation.
type kernelError struct {
	Errno unix.Errno
	Msg   string
}

func (e *kernelError) Error() string { return e.Errno.Error() + " (" + e.Msg + ")" }
func (e *kernelError) Unwrap() error { return e.Errno }

// links dumps all interfaces.
func (c *rtnl) links() ([]linkInfo, error) {
	for attempt := 0; ; attempt++ {
		ls, intr, err := c.dumpLinks()
		if err != nil || !intr || attempt == 3 {
			return ls, err
		}
	}
}

func (c *rtnl) dumpLinks() (ls []linkInfo, interrupted bool, err error) {
	seq, err := c.send(newRequest(unix.RTM_GETLINK, unix.NLM_F_DUMP, ifInfoMsg(unix.AF_UNSPEC, 0, 0, 0)))
	if err != nil {
		return nil, false, err
	}
	for {
		msgs, err := c.recv()
		if err != nil {
			return nil, false, err
		}
		for _, m := range msgs {
			if m.seq != seq {
				continue
			}
			interrupted = interrupted || m.flags&unix.NLM_F_DUMP_INTR != 0
			switch m.typ {
			case unix.NLMSG_DONE:
				return ls, interrupted, nil
			case unix.NLMSG_ERROR:
				if err := ackError(m); err != nil {
					return nil, false, err
				}
			case unix.RTM_NEWLINK:
				l, err := parseLink(m.data)
				if err != nil {
					return nil, false, err
				}
				ls = append(ls, l)
			}
		}
	}
}

// setLink changes flags (under mask change) and, if mtu > 0, the MTU of
// the interface with the given index, or of the one called name when
// index is 0.
func (c *rtnl) setLink(index int32, name string, flags, change uint32, mtu int) error {
	r := newRequest(unix.RTM_NEWLINK, 0, ifInfoMsg(unix.AF_UNSPEC, index, flags, change))
	if index == 0 {
		r.attr(unix.IFLA_IFNAME, cstring(name))
	}
	if mtu > 0 {
		r.attr(unix.IFLA_MTU, u32(uint32(mtu)))
	}
	return c.do(r)
}
