package netif

import (
	"net"
	"net/netip"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestWindowsAdapterLinks(t *testing.T) {
	mac, _ := net.ParseMAC("00:11:22:33:44:55")
	addrs := []Addr{{Prefix: netip.MustParsePrefix("192.168.1.20/24")}}
	for _, c := range []struct {
		a      winAdapter
		tunnel bool
	}{
		{winAdapter{Index: 4, Name: "Ethernet", Description: "Intel(R) Ethernet Connection", MAC: mac, IfType: 6, Up: true, Addrs: addrs}, false},
		{winAdapter{Index: 5, Name: "Wi-Fi", Description: "Intel(R) Wi-Fi 6 AX201", IfType: 71, Up: true}, false},
		{winAdapter{Index: 9, Name: "Office VPN", Description: "WireGuard Tunnel", IfType: 53, Up: true}, true},
		{winAdapter{Index: 10, Name: "Ethernet 2", Description: "TAP-Windows Adapter V9", IfType: 6, Up: true}, true},
		{winAdapter{Index: 11, Name: "Teredo", Description: "Teredo Tunneling Pseudo-Interface", IfType: 131, TunnelType: 14}, true},
		{winAdapter{Index: 12, Name: "Dial-up", Description: "WAN Miniport (PPPOE)", IfType: 23, Up: true}, true},
	} {
		l := c.a.link()
		if got := IsTunnel(&l); got != c.tunnel {
			t.Errorf("%s (%s): tunnel %v, want %v (link %+v)", c.a.Name, c.a.Description, got, c.tunnel, l)
		}
		if l.Index != c.a.Index || l.Name != c.a.Name || l.Up != c.a.Up || len(l.Addrs) != len(c.a.Addrs) {
			t.Errorf("%s: link %+v lost adapter fields", c.a.Name, l)
		}
	}
	lo := (&winAdapter{Index: 1, Name: "Loopback Pseudo-Interface 1", IfType: 24, Up: true}).link()
	if !lo.Loopback {
		t.Error("the loopback pseudo-interface is not a loopback link")
	}
}

// With a VPN holding a better default route, auto picks the physical adapter; the effective metric is the
// route's plus the interface's.
func TestWindowsAutoSkipsVPN(t *testing.T) {
	links := []Link{
		(&winAdapter{Index: 4, Name: "Ethernet", Description: "Realtek PCIe GbE", IfType: 6, Up: true,
			Addrs: []Addr{{Prefix: netip.MustParsePrefix("192.168.1.20/24")}}}).link(),
		(&winAdapter{Index: 5, Name: "Wi-Fi", Description: "Intel Wi-Fi", IfType: 71, Up: true,
			Addrs: []Addr{{Prefix: netip.MustParsePrefix("10.0.0.7/24")}}}).link(),
		(&winAdapter{Index: 9, Name: "Office VPN", Description: "WireGuard Tunnel", IfType: 53, Up: true,
			Addrs: []Addr{{Prefix: netip.MustParsePrefix("10.66.0.2/32")}}}).link(),
	}
	rows := []winRoute{
		{Index: 9, Prefix: netip.MustParsePrefix("0.0.0.0/0"), RouteMetric: 0, IfaceMetric: 5},
		{Index: 4, Prefix: netip.MustParsePrefix("0.0.0.0/0"), RouteMetric: 0, IfaceMetric: 25},
		{Index: 5, Prefix: netip.MustParsePrefix("0.0.0.0/0"), RouteMetric: 10, IfaceMetric: 20},
		{Index: 4, Prefix: netip.MustParsePrefix("192.168.1.0/24"), RouteMetric: 256, IfaceMetric: 25},
		{Index: 4, Prefix: netip.MustParsePrefix("::/0"), RouteMetric: 0, IfaceMetric: 25},
	}
	routes := winDefaultRoutes(rows)
	want := []Route{{LinkIndex: 9, Metric: 5}, {LinkIndex: 4, Metric: 25}, {LinkIndex: 5, Metric: 30}, {LinkIndex: 4, Metric: 25, V6: true}}
	if diff := cmp.Diff(want, routes); diff != "" {
		t.Errorf("default routes (-want +got):\n%s", diff)
	}
	l, err := Select(Auto, links, routes)
	if err != nil {
		t.Fatal(err)
	}
	if l.Name != "Ethernet" {
		t.Errorf("auto picked %s, want Ethernet (the VPN's route is better but it is a tunnel; Wi-Fi's is worse)", l.Name)
	}
}
