package marks

import (
	"fmt"
	"syscall"

	"golang.org/x/sys/unix"
)

// ControlOwnSocket is a net.Dialer/net.ListenConfig Control function that gives a socket SO_MARK 1709, so
// Warden's rules accept its traffic as final and never queue it. It needs CAP_NET_ADMIN.
func ControlOwnSocket(network, address string, c syscall.RawConn) error {
	var serr error
	if err := c.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, int(OwnTrafficMark))
	}); err != nil {
		return err
	}
	if serr != nil {
		return fmt.Errorf("setting SO_MARK %d on own socket: %w", OwnTrafficMark, serr)
	}
	return nil
}
