package splittun

import (
	"encoding/binary"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"syscall"

	"golang.org/x/sys/windows"

	"github.com/warden-fw/warden/backend"
	"github.com/warden-fw/warden/proxy/netif"
)

// IP_UNICAST_IF and IPV6_UNICAST_IF (ws2ipdef.h); both are 31.
const (
	ipUnicastIf   = 31
	ipv6UnicastIf = 31
)

type windowsPlatform struct{}

// NewPlatform returns the Windows platform: listens on every address (the driver redirects a split connection
// to its own local address, port 719, so the proxy must answer on whichever interface address that is) and
// binds upstreams with IP_UNICAST_IF / IPV6_UNICAST_IF. The driver's redirect keeps no kernel state the proxy
// could query, so original destinations come from the redirect table alone; the driver's owner-PID bypass,
// not a socket mark, keeps the proxy's own traffic from being intercepted again.
func NewPlatform(log *slog.Logger) (Platform, error) { return windowsPlatform{}, nil }

func (windowsPlatform) ListenAddrs(port uint16) []netip.AddrPort {
	return []netip.AddrPort{netip.AddrPortFrom(netip.IPv4Unspecified(), port), netip.AddrPortFrom(netip.IPv6Unspecified(), port)}
}

func (windowsPlatform) OriginalTCP(*net.TCPConn) (netip.AddrPort, error) {
	return netip.AddrPort{}, fmt.Errorf("original destination on windows: %w", backend.ErrUnsupported)
}

func (windowsPlatform) OriginalFlow(_ backend.Protocol, from, to netip.AddrPort) (netip.AddrPort, netip.AddrPort, error) {
	return netip.AddrPort{}, netip.AddrPort{}, fmt.Errorf("original destination on windows: %w", backend.ErrUnsupported)
}

func (windowsPlatform) ForgetUDP(client, original netip.AddrPort) error { return nil }

func (windowsPlatform) UpstreamControl(ifc *netif.Interface) func(network, address string, c syscall.RawConn) error {
	if ifc == nil {
		return nil
	}
	index := uint32(ifc.Index)
	return func(network, address string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			h := windows.Handle(fd)
			switch network {
			case "tcp4", "udp4":
				// IP_UNICAST_IF takes the index in network byte order; IPV6_UNICAST_IF in host order.
				var be [4]byte
				binary.BigEndian.PutUint32(be[:], index)
				serr = windows.SetsockoptInt(h, windows.IPPROTO_IP, ipUnicastIf, int(binary.NativeEndian.Uint32(be[:])))
			default:
				serr = windows.SetsockoptInt(h, windows.IPPROTO_IPV6, ipv6UnicastIf, int(index))
			}
		})
		if err != nil {
			return err
		}
		if serr != nil {
			return fmt.Errorf("binding upstream socket to interface %d: %w", index, serr)
		}
		return nil
	}
}

func (windowsPlatform) Close() error { return nil }
