package splittun

import (
	"net"

	"golang.org/x/sys/unix"
)

// newGatherer gathers on c through SO_RCVLOWAT, which epoll and the socket's wake-ups honour for TCP, sized
// by SO_RCVBUF (the buffer in force, autotuned).
func newGatherer(c *net.TCPConn) gatherer {
	rc, err := c.SyscallConn()
	if err != nil {
		return gatherer{}
	}
	return gatherer{set: func(mark int) error {
		var serr error
		if err := rc.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVLOWAT, mark)
		}); err != nil {
			return err
		}
		return serr
	}, rcvbuf: func() int {
		v := 0
		_ = rc.Control(func(fd uintptr) { v, _ = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUF) })
		return v
	}}
}
