package netif

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"unsafe"

	"golang.org/x/sys/windows"
)

// SystemSource returns the Windows source: adapters from GetAdaptersAddresses, default routes from
// GetIpForwardTable2. The resolver polls it (no change notifications).
func SystemSource() Source { return winSource{} }

type winSource struct{}

// ipDadStatePreferred is IpDadStatePreferred: an address that may be used as a source.
const ipDadStatePreferred = 4

func (winSource) Links() ([]Link, error) {
	adapters, err := adapterAddresses()
	if err != nil {
		return nil, err
	}
	var out []Link
	for a := adapters; a != nil; a = a.Next {
		wa := winAdapter{
			Index:       int(a.IfIndex),
			Name:        windows.UTF16PtrToString(a.FriendlyName),
			Description: windows.UTF16PtrToString(a.Description),
			IfType:      a.IfType,
			Up:          a.OperStatus == windows.IfOperStatusUp,
			TunnelType:  a.TunnelType,
		}
		if wa.Index == 0 {
			wa.Index = int(a.Ipv6IfIndex) // an IPv6-only adapter
		}
		if n := a.PhysicalAddressLength; n > 0 && int(n) <= len(a.PhysicalAddress) {
			wa.MAC = net.HardwareAddr(append([]byte(nil), a.PhysicalAddress[:n]...))
		}
		for u := a.FirstUnicastAddress; u != nil; u = u.Next {
			ip, ok := netip.AddrFromSlice(u.Address.IP())
			if !ok {
				continue
			}
			ip = ip.Unmap()
			wa.Addrs = append(wa.Addrs, Addr{Prefix: netip.PrefixFrom(ip, int(u.OnLinkPrefixLength)),
				Unusable: u.DadState != ipDadStatePreferred})
		}
		out = append(out, wa.link())
	}
	return out, nil
}

// adapterAddresses returns the linked list of adapters, growing the buffer as Windows asks.
func adapterAddresses() (*windows.IpAdapterAddresses, error) {
	size := uint32(15 << 10)
	for range 4 {
		buf := make([]byte, size)
		a := (*windows.IpAdapterAddresses)(unsafe.Pointer(&buf[0]))
		err := windows.GetAdaptersAddresses(windows.AF_UNSPEC, windows.GAA_FLAG_SKIP_ANYCAST|
			windows.GAA_FLAG_SKIP_MULTICAST|windows.GAA_FLAG_SKIP_DNS_SERVER, 0, a, &size)
		if err == nil {
			return a, nil
		}
		if !errors.Is(err, windows.ERROR_BUFFER_OVERFLOW) {
			return nil, fmt.Errorf("GetAdaptersAddresses: %w", err)
		}
	}
	return nil, errors.New("GetAdaptersAddresses: the adapter list keeps growing")
}

func (winSource) DefaultRoutes() ([]Route, error) {
	adapters, err := adapterAddresses()
	if err != nil {
		return nil, err
	}
	type metrics struct{ v4, v6 uint32 }
	ifMetric := map[uint32]metrics{}
	for a := adapters; a != nil; a = a.Next {
		m := metrics{a.Ipv4Metric, a.Ipv6Metric}
		ifMetric[a.IfIndex] = m
		ifMetric[a.Ipv6IfIndex] = m
	}
	var table *windows.MibIpForwardTable2
	if err := windows.GetIpForwardTable2(windows.AF_UNSPEC, &table); err != nil {
		return nil, fmt.Errorf("GetIpForwardTable2: %w", err)
	}
	defer windows.FreeMibTable(unsafe.Pointer(table))
	var rows []winRoute
	for _, r := range table.Rows() {
		if r.DestinationPrefix.PrefixLength != 0 {
			continue
		}
		var addr netip.Addr
		switch r.DestinationPrefix.Prefix.Family {
		case windows.AF_INET:
			addr = netip.IPv4Unspecified()
		case windows.AF_INET6:
			addr = netip.IPv6Unspecified()
		default:
			continue
		}
		m := ifMetric[r.InterfaceIndex]
		im := m.v4
		if addr.Is6() {
			im = m.v6
		}
		rows = append(rows, winRoute{Index: int(r.InterfaceIndex), Prefix: netip.PrefixFrom(addr, 0),
			RouteMetric: r.Metric, IfaceMetric: im})
	}
	return winDefaultRoutes(rows), nil
}
