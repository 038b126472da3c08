package process

import (
	"syscall"

	"golang.org/x/sys/unix"
)

// bindToDevice returns a net.ListenConfig Control function setting SO_BINDTODEVICE.
func bindToDevice(dev string) func(network, address string, c syscall.RawConn) error {
	return func(network, address string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) { serr = unix.SetsockoptString(int(fd), unix.SOL_SOCKET, unix.SO_BINDTODEVICE, dev) })
		if err != nil {
			return err
		}
		return serr
	}
}
