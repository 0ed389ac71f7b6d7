package main

import (
	"net/netip"

	"github.com/gosandbox/sandbox/guest/agentproto"
	"github.com/gosandbox/sandbox/guest/internal/netcfg"
)

// setupNet configures the network interface the host described: the
// address, routes and MTU of the virtio-net interface found by its MAC,
// /etc/resolv.conf and /etc/hosts (in the image's root when there is one,
// since the root switch happens first).
func setupNet(nc *agentproto.NetConfig, hostname string) error {
	cfg, err := netcfg.FromProto(nc)
	if err != nil {
		return err
	}
	if hostname != "" && hostname != "localhost" && netcfg.ValidHostName(hostname) == nil {
		cfg.Hosts = append(cfg.Hosts, netcfg.HostEntry{Name: hostname, Addr: netip.MustParseAddr("127.0.1.1")})
	}
	return netcfg.Apply(cfg)
}
