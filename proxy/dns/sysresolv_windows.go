package dns

import (
	"fmt"
	"net/netip"
	"unsafe"

	"golang.org/x/sys/windows"
)

// systemResolvers lists the DNS servers of every interface that is up.
func systemResolvers() (primary, fallback []netip.Addr, err error) {
	size := uint32(15 << 10)
	var buf []byte
	for range 4 {
		buf = make([]byte, size)
		err = windows.GetAdaptersAddresses(windows.AF_UNSPEC,
			windows.GAA_FLAG_SKIP_UNICAST|windows.GAA_FLAG_SKIP_ANYCAST|windows.GAA_FLAG_SKIP_MULTICAST|
				windows.GAA_FLAG_SKIP_FRIENDLY_NAME, 0, (*windows.IpAdapterAddresses)(unsafe.Pointer(&buf[0])), &size)
		if err != windows.ERROR_BUFFER_OVERFLOW {
			break
		}
	}
	if err != nil {
		return nil, nil, fmt.Errorf("listing adapters' DNS servers: %w", err)
	}
	for a := (*windows.IpAdapterAddresses)(unsafe.Pointer(&buf[0])); a != nil; a = a.Next {
		if a.OperStatus != windows.IfOperStatusUp {
			continue
		}
		for d := a.FirstDnsServerAddress; d != nil; d = d.Next {
			if ip, ok := netip.AddrFromSlice(d.Address.IP()); ok {
				primary = append(primary, ip.Unmap())
			}
		}
	}
	return primary, nil, nil
}
