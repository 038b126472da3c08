package windowskext

import (
	"encoding/binary"
	"fmt"
	"strings"
	"syscall"

	"golang.org/x/sys/windows"
)

// Socket options missing from x/sys/windows (ws2ipdef.h).
const (
	ipUnicastIf   = 31 // IP_UNICAST_IF
	ipv6UnicastIf = 31 // IPV6_UNICAST_IF
)

// BindToInterfaceControl returns a net.Dialer / net.ListenConfig Control function that makes a socket send
// through the interface with index ifIndex (IP_UNICAST_IF / IPV6_UNICAST_IF), whatever the routing table says.
// The split-tunnel proxy uses it for its upstream connections; set the dialer's LocalAddr to the interface's
// address as well, so the source address matches the interface. The socket's family comes from network
// ("tcp4", "udp6", ...) when it says, otherwise from v6.
func BindToInterfaceControl(ifIndex int, v6 bool) func(network, address string, c syscall.RawConn) error {
	return func(network, address string, c syscall.RawConn) error {
		useV6 := v6 // the returned function may run for many dials at once
		switch {
		case strings.HasSuffix(network, "4"):
			useV6 = false
		case strings.HasSuffix(network, "6"):
			useV6 = true
		}
		var serr error
		err := c.Control(func(fd uintptr) {
			if useV6 {
				serr = windows.SetsockoptInt(windows.Handle(fd), windows.IPPROTO_IPV6, ipv6UnicastIf, ifIndex)
				return
			}
			// IPv4 wants the index in network byte order; IPv6 in host order.
			var be [4]byte
			binary.BigEndian.PutUint32(be[:], uint32(ifIndex))
			serr = windows.SetsockoptInt(windows.Handle(fd), windows.IPPROTO_IP, ipUnicastIf, int(binary.NativeEndian.Uint32(be[:])))
		})
		if err != nil {
			return err
		}
		if serr != nil {
			return fmt.Errorf("binding the socket to interface %d: %w", ifIndex, serr)
		}
		return nil
	}
}
