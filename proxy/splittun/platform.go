package splittun

import (
	"net"
	"net/netip"
	"syscall"

	"github.com/warden-fw/warden/backend"
	"github.com/warden-fw/warden/proxy/netif"
)

// Platform is what an OS (or a backend) supplies to the proxy: where to listen, how to learn a redirected
// flow's original destination, and how to bind and mark an upstream socket. NewPlatform returns this OS's
// default; a backend with its own redirect mechanism (the Windows driver) may pass another in Options.
type Platform interface {
	// ListenAddrs returns the addresses the proxy listens on (TCP and UDP) for port.
	ListenAddrs(port uint16) []netip.AddrPort
	// OriginalTCP returns the original destination of an accepted redirected connection. An error wrapping
	// backend.ErrUnsupported means the OS cannot tell; the proxy then trusts the redirect table alone.
	OriginalTCP(c *net.TCPConn) (netip.AddrPort, error)
	// OriginalFlow maps a flow as the proxy sees it (from → to) to the original client address and
	// destination. The client can differ from what the proxy sees: when the redirected flow would clash with
	// another one to the proxy (a second UDP flow of one client socket, or a TCP source port the kernel reused
	// for another destination), NAT gives it another source port. An error wrapping backend.ErrUnsupported
	// means the OS cannot tell.
	OriginalFlow(proto backend.Protocol, from, to netip.AddrPort) (client, original netip.AddrPort, err error)
	// ForgetUDP drops the kernel's state of a redirected UDP flow when its session ends, so the flow's next
	// packet is decided afresh by the pipeline instead of reaching the proxy with no table entry.
	ForgetUDP(client, original netip.AddrPort) error
	// UpstreamControl returns the Control function of an upstream socket leaving through ifc, or through
	// whatever the routing table says when ifc is nil. Either way the socket is marked as Warden's own.
	UpstreamControl(ifc *netif.Interface) func(network, address string, c syscall.RawConn) error
	// Close releases the platform's resources.
	Close() error
}
