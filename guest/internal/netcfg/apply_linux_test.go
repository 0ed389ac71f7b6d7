package netcfg

import (
	"errors"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// The tests below run Apply for real, as root, each in a fresh network
// namespace of its own with a veth pair (the guest's virtio-net stands in
// as one end), and read the result back through code that is not this
// package's: the standard library's interface list and netlink dumps.

const vethInfoPeer = 1 // VETH_INFO_PEER, linux/veth.h

var testMAC = net.HardwareAddr{0x02, 0x47, 0x53, 0x00, 0x00, 0x02}

// enterNetns moves the test goroutine's thread into a new network
// namespace. The goroutine stays locked to the thread and never unlocks,
// so when the test ends the thread exits with it and no other goroutine
// ever runs in the namespace. It skips only when not root, and never
// under CI=true.
func enterNetns(tb testing.TB) {
	tb.Helper()
	if os.Geteuid() != 0 {
		if os.Getenv("CI") == "true" {
			tb.Fatal("netcfg tests need root (network namespaces); CI runs as root")
		}
		tb.Skip("needs root for a network namespace")
	}
	runtime.LockOSThread()
	if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
		tb.Fatalf("unshare(CLONE_NEWNET) as root: %v", err)
	}
}

// addVeth creates name (with mac) and its peer, and sets the peer up so
// the link has carrier, as a virtio-net device with a host behind it has.
func addVeth(c *rtnl, name, peer string, mac net.HardwareAddr) error {
	if err := addVethDown(c, name, peer, mac); err != nil {
		return err
	}
	return c.setLink(0, peer, unix.IFF_UP, unix.IFF_UP, 0)
}

// addVethDown creates the pair and leaves both ends down: no carrier.
func addVethDown(c *rtnl, name, peer string, mac net.HardwareAddr) error {
	peerMsg := appendAttr(ifInfoMsg(unix.AF_UNSPEC, 0, 0, 0), unix.IFLA_IFNAME, cstring(peer))
	info := appendAttr(nil, unix.IFLA_INFO_KIND, []byte("veth"))
	info = appendAttr(info, unix.IFLA_INFO_DATA, appendAttr(nil, vethInfoPeer, peerMsg))
	r := newRequest(unix.RTM_NEWLINK, unix.NLM_F_CREATE|unix.NLM_F_EXCL, ifInfoMsg(unix.AF_UNSPEC, 0, 0, 0))
	r.attr(unix.IFLA_IFNAME, cstring(name)).attr(unix.IFLA_ADDRESS, mac).attr(unix.IFLA_LINKINFO, info)
	return c.do(r)
}

// setupLink enters a namespace and creates the veth pair gs0/gs1.
func setupLink(tb testing.TB) {
	tb.Helper()
	enterNetns(tb)
	c, err := dialRoute()
	if err != nil {
		tb.Fatal(err)
	}
	defer c.close()
	if err := addVeth(c, "gs0", "gs1", testMAC); err != nil {
		tb.Fatalf("create a veth pair (CONFIG_VETH): %v", err)
	}
}

func fullConfig(dir string) Config {
	return Config{
		MAC:            testMAC,
		MTU:            1400,
		IPv4:           netip.MustParsePrefix("100.96.0.2/30"),
		GatewayIPv4:    netip.MustParseAddr("100.96.0.1"),
		IPv6:           netip.MustParsePrefix("fd00:6773::2/64"),
		GatewayIPv6:    netip.MustParseAddr("fe80::1"),
		DNS:            []netip.Addr{netip.MustParseAddr("100.96.0.1"), netip.MustParseAddr("fd00:6773::1")},
		Search:         []string{"sandbox.internal"},
		Hosts:          []HostEntry{{"host.gosandbox.internal", netip.MustParseAddr("100.96.0.1")}},
		ResolvConfPath: filepath.Join(dir, "etc", "resolv.conf"),
		HostsPath:      filepath.Join(dir, "etc", "hosts"),
	}
}

func TestApply(t *testing.T) {
	setupLink(t)
	dir := t.TempDir()
	cfg := fullConfig(dir)
	if err := os.MkdirAll(filepath.Join(dir, "etc"), 0o755); err != nil {
		t.Fatal(err)
	}
	// The image ships resolv.conf as a link to systemd-resolved's stub
	// file, and a hosts file with its own lines.
	stub := filepath.Join(dir, "stub-resolv.conf")
	if err := os.WriteFile(stub, []byte("nameserver 127.0.0.53\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(stub, cfg.ResolvConfPath); err != nil {
		t.Fatal(err)
	}
	oldHosts := "127.0.0.1\tlocalhost\n10.1.2.3 db # the database\n10.9.9.9 host.gosandbox.internal stale\n"
	if err := os.WriteFile(cfg.HostsPath, []byte(oldHosts), 0o600); err != nil {
		t.Fatal(err)
	}

	if err := Apply(cfg); err != nil {
		t.Fatalf("Apply: %v", err)
	}
	checkApplied(t, cfg)

	wantResolv := "# written by gosandbox at boot\nnameserver 100.96.0.1\nnameserver fd00:6773::1\nsearch sandbox.internal\n"
	if fi, err := os.Lstat(cfg.ResolvConfPath); err != nil || !fi.Mode().IsRegular() || fi.Mode().Perm() != 0o644 {
		t.Errorf("resolv.conf is %v (%v), want a regular file with mode 0644 in place of the symlink", fi.Mode(), err)
	}
	if b, _ := os.ReadFile(cfg.ResolvConfPath); string(b) != wantResolv {
		t.Errorf("resolv.conf = %q, want %q", b, wantResolv)
	}
	if b, _ := os.ReadFile(stub); string(b) != "nameserver 127.0.0.53\n" {
		t.Errorf("the symlink's target was written through: %q", b)
	}
	wantHosts := "::1\tlocalhost\n127.0.0.1\tlocalhost\n10.1.2.3 db # the database\n10.9.9.9\tstale\n" +
		hostsMarker + "\n100.96.0.1\thost.gosandbox.internal\n"
	hosts, _ := os.ReadFile(cfg.HostsPath)
	if string(hosts) != wantHosts {
		t.Errorf("hosts =\n%s\nwant\n%s", hosts, wantHosts)
	}
	if fi, err := os.Stat(cfg.HostsPath); err != nil || fi.Mode().Perm() != 0o644 {
		t.Errorf("hosts mode %v (%v), want 0644", fi.Mode(), err)
	}

	// A second Apply with the same Config succeeds and changes nothing.
	if err := Apply(cfg); err != nil {
		t.Fatalf("second Apply: %v", err)
	}
	checkApplied(t, cfg)
	if b, _ := os.ReadFile(cfg.HostsPath); string(b) != string(hosts) {
		t.Errorf("second Apply changed hosts to\n%s", b)
	}
	if n := countDefaultRoutes4(t); n != 1 {
		t.Errorf("%d IPv4 default routes after two Applies, want 1", n)
	}
	entries, _ := os.ReadDir(filepath.Join(dir, "etc"))
	for _, e := range entries {
		if strings.Contains(e.Name(), "gosandbox-") {
			t.Errorf("temporary file %s left behind", e.Name())
		}
	}
}

// checkApplied reads the namespace's state back and compares it with cfg.
func checkApplied(t *testing.T, cfg Config) {
	t.Helper()
	lo, err := net.InterfaceByName("lo")
	if err != nil {
		t.Fatal(err)
	}
	if lo.Flags&net.FlagUp == 0 {
		t.Errorf("lo flags %v, want up", lo.Flags)
	}
	if a := addrStrings(t, lo); !slices.Contains(a, "127.0.0.1/8") || !slices.Contains(a, "::1/128") {
		t.Errorf("lo addresses %v, want 127.0.0.1/8 and ::1/128", a)
	}

	ifc, err := net.InterfaceByName("gs0")
	if err != nil {
		t.Fatal(err)
	}
	if ifc.Flags&net.FlagUp == 0 {
		t.Errorf("gs0 flags %v, want up", ifc.Flags)
	}
	if cfg.MTU != 0 && ifc.MTU != cfg.MTU {
		t.Errorf("gs0 MTU %d, want %d", ifc.MTU, cfg.MTU)
	}
	addrs := addrStrings(t, ifc)
	for _, p := range []netip.Prefix{cfg.IPv4, cfg.IPv6} {
		if p.IsValid() && !slices.Contains(addrs, p.String()) {
			t.Errorf("gs0 addresses %v, want %v among them", addrs, p)
		}
	}

	if cfg.GatewayIPv4.IsValid() {
		gw, dev, ok := defaultRoute4(t)
		if !ok || gw != cfg.GatewayIPv4 || dev != "gs0" {
			t.Errorf("IPv4 default route via %v dev %q (found %v), want via %v dev gs0", gw, dev, ok, cfg.GatewayIPv4)
		}
	}
	if cfg.GatewayIPv6.IsValid() {
		gw, dev, ok := defaultRoute6(t)
		if !ok || gw != cfg.GatewayIPv6 || dev != "gs0" {
			t.Errorf("IPv6 default route via %v dev %q (found %v), want via %v dev gs0", gw, dev, ok, cfg.GatewayIPv6)
		}
	}
	if cfg.IPv6.IsValid() {
		flags, ok := inet6Flags(t, cfg.IPv6.Addr(), "gs0")
		if !ok {
			t.Errorf("%v not among the addresses of gs0", cfg.IPv6.Addr())
		} else if flags&unix.IFA_F_NODAD == 0 || flags&(unix.IFA_F_TENTATIVE|unix.IFA_F_DADFAILED) != 0 {
			t.Errorf("%v has flags %#x, want nodad and neither tentative nor dadfailed", cfg.IPv6.Addr(), flags)
		}
	}
	for _, key := range []string{"accept_ra", "autoconf", "accept_dad"} {
		b, err := os.ReadFile("/proc/sys/net/ipv6/conf/gs0/" + key)
		if err != nil || strings.TrimSpace(string(b)) != "0" {
			t.Errorf("sysctl net.ipv6.conf.gs0.%s = %q (%v), want 0", key, b, err)
		}
	}
}

func addrStrings(t *testing.T, ifc *net.Interface) []string {
	t.Helper()
	as, err := ifc.Addrs()
	if err != nil {
		t.Fatal(err)
	}
	var s []string
	for _, a := range as {
		s = append(s, a.String())
	}
	return s
}

// dump reads a routing table or address list through the standard
// library's netlink code (syscall.NetlinkRIB), not this package's. A dump
// the kernel marks as interrupted by a concurrent change (the carrier
// coming up adds link-local routes asynchronously) is read again.
func dump(t *testing.T, proto, family int) []syscall.NetlinkMessage {
	t.Helper()
	for attempt := 0; ; attempt++ {
		rib, err := syscall.NetlinkRIB(proto, family)
		if err != nil {
			t.Fatalf("netlink dump: %v", err)
		}
		msgs, err := syscall.ParseNetlinkMessage(rib)
		if err != nil {
			t.Fatalf("netlink dump: %v", err)
		}
		intr := false
		for _, m := range msgs {
			intr = intr || m.Header.Flags&unix.NLM_F_DUMP_INTR != 0
		}
		if !intr || attempt == 10 {
			return msgs
		}
	}
}

type route struct {
	gw  netip.Addr
	dev string
}

// defaultRoutes lists the main table's default routes of a family.
func defaultRoutes(t *testing.T, family int) []route {
	t.Helper()
	var rs []route
	for _, m := range dump(t, syscall.RTM_GETROUTE, family) {
		if m.Header.Type != syscall.RTM_NEWROUTE || len(m.Data) < syscall.SizeofRtMsg {
			continue
		}
		// struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags
		if m.Data[1] != 0 || m.Data[4] != unix.RT_TABLE_MAIN || m.Data[7] != unix.RTN_UNICAST {
			continue
		}
		attrs, err := syscall.ParseNetlinkRouteAttr(&m)
		if err != nil {
			t.Fatal(err)
		}
		var r route
		for _, a := range attrs {
			switch a.Attr.Type {
			case syscall.RTA_GATEWAY:
				r.gw, _ = netip.AddrFromSlice(a.Value)
			case syscall.RTA_OIF:
				if ifc, err := net.InterfaceByIndex(int(ne.Uint32(a.Value))); err == nil {
					r.dev = ifc.Name
				}
			}
		}
		rs = append(rs, r)
	}
	return rs
}

func defaultRoute4(t *testing.T) (gw netip.Addr, dev string, ok bool) {
	for _, r := range defaultRoutes(t, syscall.AF_INET) {
		return r.gw, r.dev, true
	}
	return netip.Addr{}, "", false
}

func countDefaultRoutes4(t *testing.T) int { return len(defaultRoutes(t, syscall.AF_INET)) }

func defaultRoute6(t *testing.T) (gw netip.Addr, dev string, ok bool) {
	for _, r := range defaultRoutes(t, syscall.AF_INET6) {
		return r.gw, r.dev, true
	}
	return netip.Addr{}, "", false
}

// inet6Flags returns the flags (IFA_FLAGS) of an IPv6 address on dev.
func inet6Flags(t *testing.T, a netip.Addr, dev string) (uint32, bool) {
	ifc, err := net.InterfaceByName(dev)
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range dump(t, syscall.RTM_GETADDR, syscall.AF_INET6) {
		if m.Header.Type != syscall.RTM_NEWADDR || len(m.Data) < syscall.SizeofIfAddrmsg {
			continue
		}
		// struct ifaddrmsg: family, prefixlen, flags, scope, index
		if int(ne.Uint32(m.Data[4:8])) != ifc.Index {
			continue
		}
		attrs, err := syscall.ParseNetlinkRouteAttr(&m)
		if err != nil {
			t.Fatal(err)
		}
		var addr netip.Addr
		flags := uint32(m.Data[2])
		for _, at := range attrs {
			switch at.Attr.Type {
			case syscall.IFA_ADDRESS:
				addr, _ = netip.AddrFromSlice(at.Value)
			case unix.IFA_FLAGS:
				flags = ne.Uint32(at.Value)
			}
		}
		if addr == a {
			return flags, true
		}
	}
	return 0, false
}

func TestApplyOnlyMAC(t *testing.T) {
	setupLink(t)
	dir := t.TempDir()
	cfg := Config{
		MAC:            testMAC,
		ResolvConfPath: filepath.Join(dir, "resolv.conf"),
		HostsPath:      filepath.Join(dir, "etc", "hosts"), // etc does not exist yet
	}
	if err := Apply(cfg); err != nil {
		t.Fatalf("Apply: %v", err)
	}
	checkApplied(t, cfg)
	ifc, _ := net.InterfaceByName("gs0")
	if ifc.MTU != 1500 {
		t.Errorf("MTU changed to %d, want the driver's 1500", ifc.MTU)
	}
	if _, _, ok := defaultRoute4(t); ok {
		t.Error("an IPv4 default route appeared without a gateway")
	}
	if _, err := os.Lstat(cfg.ResolvConfPath); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("resolv.conf written without DNS or Search (%v)", err)
	}
	if b, _ := os.ReadFile(cfg.HostsPath); string(b) != "127.0.0.1\tlocalhost\n::1\tlocalhost\n" {
		t.Errorf("hosts = %q, want the two localhost lines", b)
	}
}

func TestApplyNoInterface(t *testing.T) {
	setupLink(t)
	dir := t.TempDir()
	mac := net.HardwareAddr{0x02, 0, 0, 0, 0xde, 0xad}
	err := Apply(Config{MAC: mac, LinkWait: 50 * time.Millisecond, HostsPath: filepath.Join(dir, "hosts")})
	if !errors.Is(err, ErrNoInterface) {
		t.Fatalf("Apply = %v, want ErrNoInterface", err)
	}
	var ne *NoInterfaceError
	if !errors.As(err, &ne) || ne.MAC.String() != mac.String() {
		t.Fatalf("Apply = %#v, want a *NoInterfaceError for %v", err, mac)
	}
	if !strings.Contains(err.Error(), "02:00:00:00:de:ad") || !slices.Contains(ne.Seen, "gs0="+testMAC.String()) {
		t.Errorf("error %q (seen %v) does not name the MAC and the interfaces it saw", err, ne.Seen)
	}
	if _, err := os.Lstat(filepath.Join(dir, "hosts")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("hosts written although the interface was missing (%v)", err)
	}
}

// TestApplyLinkAppearsLate creates the interface while Apply waits for it,
// as a virtio-net driver probing asynchronously would.
func TestApplyLinkAppearsLate(t *testing.T) {
	enterNetns(t)
	// A netlink socket acts in the namespace it was opened in, whatever
	// thread uses it later: the creating goroutine needs no namespace.
	c, err := dialRoute()
	if err != nil {
		t.Fatal(err)
	}
	defer c.close()
	created := make(chan error, 1)
	go func() {
		time.Sleep(200 * time.Millisecond)
		created <- addVeth(c, "gs0", "gs1", testMAC)
	}()
	dir := t.TempDir()
	cfg := fullConfig(dir)
	cfg.LinkWait = time.Minute // a bound, not an expectation
	err = Apply(cfg)
	if cerr := <-created; cerr != nil {
		t.Fatalf("create the veth pair: %v", cerr)
	}
	if err != nil {
		t.Fatalf("Apply: %v", err)
	}
	checkApplied(t, cfg)
}

// TestApplyBeforeCarrier configures an interface whose carrier comes up
// only afterwards (a virtio-net device may report link status late): the
// addresses and routes are there before and stay there after.
func TestApplyBeforeCarrier(t *testing.T) {
	enterNetns(t)
	c, err := dialRoute()
	if err != nil {
		t.Fatal(err)
	}
	defer c.close()
	if err := addVethDown(c, "gs0", "gs1", testMAC); err != nil {
		t.Fatalf("create a veth pair: %v", err)
	}
	cfg := fullConfig(t.TempDir())
	if err := Apply(cfg); err != nil {
		t.Fatalf("Apply: %v", err)
	}
	checkApplied(t, cfg)
	if err := c.setLink(0, "gs1", unix.IFF_UP, unix.IFF_UP, 0); err != nil {
		t.Fatal(err)
	}
	checkApplied(t, cfg)
}

// TestApplyInvalidTouchesNothing checks that validation comes first: a bad
// Config leaves even lo down.
func TestApplyInvalidTouchesNothing(t *testing.T) {
	setupLink(t)
	cfg := fullConfig(t.TempDir())
	cfg.GatewayIPv4 = netip.MustParseAddr("100.96.1.1")
	err := Apply(cfg)
	var ce *ConfigError
	if !errors.Is(err, ErrInvalidConfig) || !errors.Is(err, ErrGateway) || !errors.As(err, &ce) || ce.Field != "GatewayIPv4" {
		t.Fatalf("Apply = %v, want a *ConfigError for GatewayIPv4", err)
	}
	lo, _ := net.InterfaceByName("lo")
	if lo.Flags&net.FlagUp != 0 {
		t.Error("lo was set up by an Apply that should have changed nothing")
	}
}

// TestApplyStepError turns IPv6 off on the interface so the kernel refuses
// the IPv6 address, and checks the error Apply returns.
func TestApplyStepError(t *testing.T) {
	setupLink(t)
	if err := os.WriteFile("/proc/sys/net/ipv6/conf/gs0/disable_ipv6", []byte("1"), 0); err != nil {
		t.Fatal(err)
	}
	cfg := fullConfig(t.TempDir())
	err := Apply(cfg)
	var se *StepError
	if !errors.As(err, &se) || se.Link != "gs0" || !strings.Contains(se.Step, "fd00:6773::2/64") {
		t.Fatalf("Apply = %v, want a *StepError adding the IPv6 address on gs0", err)
	}
	if !errors.Is(err, unix.EACCES) {
		t.Errorf("Apply = %v, want it to wrap EACCES (IPv6 is disabled on this device)", err)
	}
}

// BenchmarkApply measures a full Apply (addresses, routes, both files) on
// an interface that is already configured, as on a second boot step.
func BenchmarkApply(b *testing.B) {
	setupLink(b)
	cfg := fullConfig(b.TempDir())
	if err := os.MkdirAll(filepath.Dir(cfg.HostsPath), 0o755); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if err := Apply(cfg); err != nil {
			b.Fatal(err)
		}
	}
}
