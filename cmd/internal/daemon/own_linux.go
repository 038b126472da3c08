package daemon

import (
	"syscall"

	"github.com/warden-fw/warden/backend/nfqueue/marks"
)

// ownSocketControl marks the daemon's own upstream sockets (SO_MARK 1709) so they are never intercepted.
func ownSocketControl() func(network, address string, c syscall.RawConn) error {
	return marks.ControlOwnSocket
}
