package splittun

import (
	"net"
	"os"

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

// tcpReceiveMax is the largest receive buffer TCP autotuning gives a socket in this network namespace
// (tcp_rmem's third field), 0 if unknown.
func tcpReceiveMax() int {
	b, err := os.ReadFile("/proc/sys/net/ipv4/tcp_rmem")
	if err != nil {
		return 0
	}
	return parseRmemMax(b)
}
