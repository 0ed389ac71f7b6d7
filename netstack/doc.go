// Package netstack is the network of one sandbox: a user-space TCP/IP stack
// (gVisor's pkg/tcpip, pinned to a "go" branch pseudo-version) that plays the
// guest's gateway behind its virtio-net device.
//
// The guest sees an Ethernet link with one peer, the gateway. Every TCP and
// UDP flow the guest opens is terminated in that stack and re-originated from
// an ordinary host socket (net.Dialer with a context), so the sandbox needs no
// TAP device, no root and no host NAT. ICMP echo is relayed through
// unprivileged ICMP sockets where the host allows them
// (net.ipv4.ping_group_range). IPv4 and IPv6 both work end to end.
//
// Each flow is checked, fail-closed, against an ordered list of rules ("allow@public", "deny:egress@*.example.com:tcp:443",
// "allow@host:tcp:8080", ...) where the first match wins, with a default per
// direction. The default egress policy allows the public internet only. Domain
// rules match only addresses this sandbox resolved for that name through the
// gateway's DNS (DNS pinning). The gateway's DNS forwards to the host's
// resolvers, answers blocked names with NXDOMAIN and drops private answers
// unless an address rule allows them (rebind protection). Published ports are
// host listeners that connect into the guest through the stack. Token buckets
// limit bandwidth and packet rate per direction; a counter caps concurrent
// flows.
//
// The boundary with the virtio-net device is raw Ethernet frames:
// (*Network).DeliverFrame takes a guest→host frame and a FrameWriter receives
// host→guest frames. GuestConfig is what the guest agent needs to configure
// the interface.
//
// # Wiring a virtio-net device
//
// The device owns the guest side; the Network owns everything else:
//
//	n, err := netstack.New(netstack.Config{Name: id, Rules: rules})
//	cfg := n.Guest()         // MAC and MTU for the device's config space,
//	                         // addresses, routes and resolv.conf for the agent
//	n.SetOutput(dev)         // dev.WriteFrame(frame): copy into the RX queue
//	// TX queue worker, per frame (virtio-net header stripped):
//	err = n.DeliverFrame(frame)                 // no offloads negotiated
//	err = n.DeliverFrameOffload(frame, offload) // NEEDS_CSUM / GSO from the header
//	...
//	n.Close()
//
// Frames given to WriteFrame carry complete checksums and never exceed the
// MTU, so the device writes them with an all-zero virtio-net header. When the
// guest negotiated VIRTIO_NET_F_GUEST_CSUM and GUEST_TSO4/6, the device passes
// a GSOFrameWriter to SetOutput and receives large TCP segments with their
// offload fields through WriteFrameOffload. Either a large MTU (DefaultMTU,
// announced with VIRTIO_NET_F_MTU) or segmentation offload avoids per-1500-byte
// costs; see the benchmarks.
//
// What is hand-written here, and why: the flow proxy, policy, DNS filter and
// rate limits are this project's semantics and no library offers them; the
// link endpoint is small and purpose-built because gVisor's channel endpoint
// clones every packet and drops when its queue is full. DNS messages are
// parsed and built with golang.org/x/net/dns/dnsmessage, never by hand.
package netstack
