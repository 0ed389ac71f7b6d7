// Package netcfg configures the guest's network at boot: the loopback
// interface, the one virtio-net interface the VMM gives the guest, its
// default routes, /etc/resolv.conf and /etc/hosts. The guest's PID 1
// (guest/cmd/init) calls Apply from its setup hook with the values the host
// sent in agentproto.Config.Net (see FromProto).
//
// # What Apply does
//
//  1. Validates the whole Config first and returns a *ConfigError (which
//     matches ErrInvalidConfig and a finer sentinel such as ErrGateway)
//     before it touches anything.
//  2. Sets lo up (idempotent; the kernel then gives it 127.0.0.1/8 and ::1).
//  3. Finds the interface by its MAC address, not by name: names depend on
//     probe order and on the kernel's naming. The virtio-net driver may
//     probe asynchronously, so Apply polls for up to Config.LinkWait
//     (default 2 s) and then returns a *NoInterfaceError (ErrNoInterface)
//     naming the MAC and the interfaces it did see.
//  4. Turns off IPv6 router advertisements, SLAAC and duplicate address
//     detection on that interface (the sysctls accept_ra, autoconf and
//     accept_dad; best effort: a kernel without IPv6 has none of them):
//     the host's network stack is the only router and hands out the one
//     address, so waiting for DAD would only delay the first connection.
//  5. Sets the MTU, adds the IPv4 and IPv6 addresses (IPv6 with
//     IFA_F_NODAD), sets the link up, and adds the default routes: IPv4 via
//     the gateway (which must lie in the IPv4 prefix), IPv6 via the gateway
//     marked on-link (RTNH_F_ONLINK), so a link-local or out-of-prefix
//     gateway works too. Addresses and routes are added with NLM_F_REPLACE,
//     so applying the same Config twice succeeds.
//  6. Writes resolv.conf (only when DNS or Search is set) and merges hosts:
//     the image's own lines are kept, lines naming one of our host names
//     lose that name (and go if none is left), our entries are appended,
//     and "127.0.0.1 localhost" and "::1 localhost" are added when missing.
//     Both files are replaced atomically (a temporary file in the same
//     directory, then rename), which also replaces a symlinked
//     /etc/resolv.conf (images that ship a link to systemd-resolved's stub
//     file) with a regular file instead of writing through the link.
//
// Errors from the kernel come back as *StepError naming the step and the
// interface; they wrap the errno, so errors.Is(err, unix.EPERM) works.
//
// # Why rtnetlink by hand
//
// The kernel interfaces are few (RTM_GETLINK, RTM_NEWLINK, RTM_NEWADDR,
// RTM_NEWROUTE) and the package speaks them over a plain netlink socket
// from golang.org/x/sys/unix, in about 400 lines with bounds-checked
// parsing (fuzzed by FuzzParseNetlink) that compile to about 18 KB of
// machine code. github.com/vishvananda/netlink would do the same, but
// linked next to the rest of this package it made a stripped static test
// binary 270 KiB larger (2.38 MB to 2.65 MB), and this code ends up in the
// guest's PID 1, which is loaded on every boot. The ioctl interface
// (SIOCSIFADDR and friends) cannot set IFA_F_NODAD or on-link IPv6
// routes.
//
// The package starts no goroutines and keeps no state: Apply opens one
// netlink socket, closes it before it returns, and does all its work on the
// calling goroutine (which matters to callers that run it inside a network
// namespace entered by a locked OS thread, as the tests do). It logs only
// through Config.Logger, which is silent when nil.
package netcfg
