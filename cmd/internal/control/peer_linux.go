package control

import (
	"net"

	"golang.org/x/sys/unix"
)

// peerCheckListener drops connections whose peer is not root. The socket's 0600 mode already keeps others
// out; this holds even if the mode is loosened by mistake.
type peerCheckListener struct{ net.Listener }

func (l *peerCheckListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		if peerIsRoot(c) {
			return c, nil
		}
		_, _ = c.Write([]byte("HTTP/1.1 403 Forbidden\r\nContent-Length: 28\r\nConnection: close\r\n\r\ncontrol API is for root only"))
		c.Close()
	}
}

func peerIsRoot(c net.Conn) bool {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return false
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return false
	}
	var cred *unix.Ucred
	var cerr error
	if err := raw.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil || cerr != nil {
		return false
	}
	return cred.Uid == 0
}
