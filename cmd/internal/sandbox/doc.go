// Package sandbox builds the network-namespace world that `warden demo` and the end-to-end tests run Warden in,
// and the small agent process that serves and probes inside it.
//
// The topology (every namespace fresh, with a random suffix; every address a documentation address that exists
// only inside these namespaces):
//
//	client ns ──ua (198.51.100.2, 2001:db8:a::2; default route, metric 100)── eth0 of ns A, answers "A"
//	          └─ub (203.0.113.2,  2001:db8:b::2; default route, metric 200)── eth0 of ns B, answers "B"
//
// A and B both own the same service addresses (ServiceV4, ServiceV4Alt, ServiceV6, ServiceV6Alt), so which
// server answers tells which uplink a connection used. Warden runs in the client namespace; the host's own
// namespace and firewall are never touched.
//
// An agent (RunAgent) is a process inside one namespace that takes JSON requests on stdin and answers on
// stdout: serve on ports, make TCP/UDP connections, hold connections open, fetch a URL. Processes must live
// inside the namespace (setns moves one OS thread only), so agents and the daemon are started with
// `ip netns exec`.
package sandbox

import "net/netip"

// Interface names inside the client namespace.
const (
	UplinkA = "ua"
	UplinkB = "ub"
)

// The addresses of the topology.
var (
	ServiceV4    = netip.MustParseAddr("192.0.2.10")
	ServiceV4Alt = netip.MustParseAddr("192.0.2.11")
	ServiceV6    = netip.MustParseAddr("2001:db8:5::10")
	ServiceV6Alt = netip.MustParseAddr("2001:db8:5::11")

	ClientAV4 = netip.MustParseAddr("198.51.100.2")
	ClientAV6 = netip.MustParseAddr("2001:db8:a::2")
	GatewayA4 = netip.MustParseAddr("198.51.100.1")
	GatewayA6 = netip.MustParseAddr("2001:db8:a::1")
	ClientBV4 = netip.MustParseAddr("203.0.113.2")
	ClientBV6 = netip.MustParseAddr("2001:db8:b::2")
	GatewayB4 = netip.MustParseAddr("203.0.113.1")
	GatewayB6 = netip.MustParseAddr("2001:db8:b::1")
)

// ServiceAddrs lists the service addresses both servers own.
func ServiceAddrs() []netip.Addr {
	return []netip.Addr{ServiceV4, ServiceV4Alt, ServiceV6, ServiceV6Alt}
}
