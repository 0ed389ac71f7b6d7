package netcfg

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Apply configures the network as cfg says; see the package doc for the
// steps. It validates cfg first (a *ConfigError, before any change). A
// missing interface is a *NoInterfaceError; a failed step is a *StepError.
// Apply runs on the calling goroutine and starts none.
func Apply(cfg Config) error {
	if err := cfg.Validate(); err != nil {
		return err
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	c, err := dialRoute()
	if err != nil {
		return &StepError{Step: "open rtnetlink", Err: err}
	}
	defer c.close()

	if err := c.setLink(0, "lo", unix.IFF_UP, unix.IFF_UP, 0); err != nil {
		return &StepError{Step: "set up", Link: "lo", Err: err}
	}
	link, err := waitLink(c, cfg.MAC, orDefault(cfg.LinkWait, DefaultLinkWait), log)
	if err != nil {
		return err
	}
	log.Debug("netcfg: interface found", "name", link.name, "index", link.index, "mac", cfg.MAC.String(), "mtu", link.mtu)
	disableIPv6Autoconf(link.name, log)

	if cfg.MTU != 0 && int(link.mtu) != cfg.MTU {
		if err := c.setLink(link.index, "", 0, 0, cfg.MTU); err != nil {
			return &StepError{Step: fmt.Sprintf("set MTU %d", cfg.MTU), Link: link.name, Err: err}
		}
	}
	if cfg.IPv4.IsValid() {
		if err := c.addAddr(link.index, cfg.IPv4); err != nil {
			return &StepError{Step: "add address " + cfg.IPv4.String(), Link: link.name, Err: err}
		}
	}
	if cfg.IPv6.IsValid() {
		if err := c.addAddr(link.index, cfg.IPv6); err != nil {
			return &StepError{Step: "add address " + cfg.IPv6.String(), Link: link.name, Err: err}
		}
	}
	if err := c.setLink(link.index, "", unix.IFF_UP, unix.IFF_UP, 0); err != nil {
		return &StepError{Step: "set up", Link: link.name, Err: err}
	}
	if cfg.GatewayIPv4.IsValid() {
		if err := c.addDefaultRoute(link.index, cfg.GatewayIPv4, false); err != nil {
			return &StepError{Step: "add default route via " + cfg.GatewayIPv4.String(), Link: link.name, Err: err}
		}
	}
	if cfg.GatewayIPv6.IsValid() {
		if err := c.addDefaultRoute(link.index, cfg.GatewayIPv6, true); err != nil {
			return &StepError{Step: "add default route via " + cfg.GatewayIPv6.String(), Link: link.name, Err: err}
		}
	}
	log.Debug("netcfg: interface configured", "name", link.name, "ipv4", cfg.IPv4, "ipv6", cfg.IPv6)
	return writeFiles(cfg, log)
}

// orDefault returns v, or def when v is zero.
func orDefault[T comparable](v, def T) T {
	var zero T
	if v == zero {
		return def
	}
	return v
}

// waitLink polls the interface list until one has the MAC, for up to wait.
func waitLink(c *rtnl, mac net.HardwareAddr, wait time.Duration, log *slog.Logger) (linkInfo, error) {
	deadline := time.Now().Add(wait)
	pause := 5 * time.Millisecond
	for {
		ls, err := c.links()
		if err != nil {
			return linkInfo{}, &StepError{Step: "list interfaces", Err: err}
		}
		for _, l := range ls {
			if bytes.Equal(l.mac, mac) {
				return l, nil
			}
		}
		if !time.Now().Before(deadline) {
			e := &NoInterfaceError{MAC: mac, Waited: wait}
			for _, l := range ls {
				e.Seen = append(e.Seen, l.name+"="+net.HardwareAddr(l.mac).String())
			}
			return linkInfo{}, e
		}
		log.Debug("netcfg: waiting for the interface", "mac", mac.String(), "interfaces", len(ls))
		time.Sleep(min(pause, time.Until(deadline)))
		pause = min(2*pause, 100*time.Millisecond)
	}
}

// disableIPv6Autoconf turns off router advertisements, SLAAC and DAD on
// the interface, best effort: a kernel without IPv6 (or without /proc
// mounted) has no such files, and the interface works without it.
func disableIPv6Autoconf(name string, log *slog.Logger) {
	if name == "" || name == "." || name == ".." || strings.ContainsRune(name, '/') {
		return
	}
	for _, key := range []string{"accept_ra", "autoconf", "accept_dad"} {
		p := "/proc/sys/net/ipv6/conf/" + name + "/" + key
		f, err := os.OpenFile(p, os.O_WRONLY|os.O_TRUNC, 0)
		if err == nil {
			_, err = f.WriteString("0\n")
			if cerr := f.Close(); err == nil {
				err = cerr
			}
		}
		if err != nil {
			lvl := slog.LevelWarn
			if errors.Is(err, fs.ErrNotExist) {
				lvl = slog.LevelDebug
			}
			log.Log(context.Background(), lvl, "netcfg: set IPv6 sysctl", "path", p, "err", err)
		}
	}
}

// addAddr adds (or replaces) an address; IPv6 goes without DAD.
func (c *rtnl) addAddr(index int32, p netip.Prefix) error {
	a := p.Addr()
	fixed := make([]byte, ifAddrMsgLen)
	fixed[0] = unix.AF_INET
	if a.Is6() {
		fixed[0] = unix.AF_INET6
		fixed[2] = unix.IFA_F_NODAD
	}
	fixed[1] = uint8(p.Bits())
	ne.PutUint32(fixed[4:8], uint32(index))
	r := newRequest(unix.RTM_NEWADDR, unix.NLM_F_CREATE|unix.NLM_F_REPLACE, fixed)
	r.attr(unix.IFA_LOCAL, a.AsSlice()).attr(unix.IFA_ADDRESS, a.AsSlice())
	if a.Is4() && p.Bits() < 31 {
		r.attr(unix.IFA_BROADCAST, broadcast4(p).AsSlice())
	}
	if a.Is6() {
		r.attr(unix.IFA_FLAGS, u32(unix.IFA_F_NODAD))
	}
	return c.do(r)
}

// addDefaultRoute adds (or replaces) the main table's default route of
// gw's family via gw on the interface; onlink skips the kernel's check
// that gw is reachable through a prefix on the interface.
func (c *rtnl) addDefaultRoute(index int32, gw netip.Addr, onlink bool) error {
	fixed := make([]byte, rtMsgLen)
	fixed[0] = unix.AF_INET
	if gw.Is6() {
		fixed[0] = unix.AF_INET6
	}
	fixed[4] = unix.RT_TABLE_MAIN
	fixed[5] = unix.RTPROT_BOOT
	fixed[6] = unix.RT_SCOPE_UNIVERSE
	fixed[7] = unix.RTN_UNICAST
	if onlink {
		ne.PutUint32(fixed[8:12], unix.RTNH_F_ONLINK)
	}
	r := newRequest(unix.RTM_NEWROUTE, unix.NLM_F_CREATE|unix.NLM_F_REPLACE, fixed)
	r.attr(unix.RTA_GATEWAY, gw.AsSlice()).attr(unix.RTA_OIF, u32(uint32(index)))
	return c.do(r)
}

// writeFiles writes resolv.conf (if there is anything to say) and merges
// the hosts file.
func writeFiles(cfg Config, log *slog.Logger) error {
	if len(cfg.DNS) > 0 || len(cfg.Search) > 0 {
		p := orDefault(cfg.ResolvConfPath, DefaultResolvConfPath)
		if err := writeFileAtomic(p, RenderResolvConf(cfg.DNS, cfg.Search)); err != nil {
			return &StepError{Step: "write " + p, Err: err}
		}
		log.Debug("netcfg: wrote resolv.conf", "path", p, "nameservers", len(cfg.DNS))
	}
	p := orDefault(cfg.HostsPath, DefaultHostsPath)
	old, err := readHosts(p)
	if err != nil {
		return &StepError{Step: "read " + p, Err: err}
	}
	if err := writeFileAtomic(p, MergeHosts(old, cfg.Hosts)); err != nil {
		return &StepError{Step: "write " + p, Err: err}
	}
	log.Debug("netcfg: merged hosts", "path", p, "entries", len(cfg.Hosts))
	return nil
}
