package netif

import (
	"net"
	"net/netip"
	"strings"
)

// What Windows tells about an adapter (GetAdaptersAddresses) and a route (GetIpForwardTable2), reduced to
// what Select needs. The conversion is plain Go so that it is tested on every platform; source_windows.go only
// fills these from the system calls.

// Windows interface types (IF_TYPE_*) that mark a tunnel or dial-up link.
const (
	winIfTypePPP         = 23
	winIfTypePropVirtual = 53
	winIfTypeLoopback    = 24
	winIfTypeTunnel      = 131
)

// winVPNDrivers are adapter descriptions (driver names) of common VPN clients' virtual adapters, which often
// present themselves as Ethernet.
var winVPNDrivers = []string{"wireguard", "wintun", "tap-windows", "openvpn", "tailscale", "zerotier",
	"nordlynx", "mullvad", "protonvpn", "cisco anyconnect", "fortinet", "juniper", "pangp", "sonicwall"}

type winAdapter struct {
	Index       int
	Name        string // the friendly name users see ("Ethernet", "Wi-Fi", "wg0")
	Description string // the driver's description ("Intel(R) Ethernet ...", "WireGuard Tunnel")
	MAC         net.HardwareAddr
	IfType      uint32
	Up          bool // IfOperStatusUp
	TunnelType  uint32
	Addrs       []Addr
}

func (a *winAdapter) link() Link {
	l := Link{Index: a.Index, Name: a.Name, MAC: a.MAC, Up: a.Up, Addrs: a.Addrs,
		Loopback: a.IfType == winIfTypeLoopback, PointToPoint: a.IfType == winIfTypePPP}
	desc := strings.ToLower(a.Description)
	switch {
	case a.IfType == winIfTypePPP:
		l.Encap = "ppp"
	case a.IfType == winIfTypeTunnel || a.TunnelType != 0:
		l.Kind = "tun"
	default:
		for _, d := range winVPNDrivers {
			if strings.Contains(desc, d) {
				l.Kind = "tun"
				break
			}
		}
		if l.Kind == "" && a.IfType == winIfTypePropVirtual {
			l.Kind = "tun"
		}
	}
	return l
}

type winRoute struct {
	Index       int
	Prefix      netip.Prefix
	RouteMetric uint32
	IfaceMetric uint32 // the interface's metric for the route's family; Windows adds it to the route's
}

// winDefaultRoutes keeps the default routes (0.0.0.0/0, ::/0). Their metric is what Windows compares: the
// route's metric plus its interface's.
func winDefaultRoutes(rows []winRoute) []Route {
	var out []Route
	for _, r := range rows {
		if !r.Prefix.IsValid() || r.Prefix.Bits() != 0 {
			continue
		}
		out = append(out, Route{LinkIndex: r.Index, Metric: int(r.RouteMetric + r.IfaceMetric), V6: r.Prefix.Addr().Is6()})
	}
	return out
}
