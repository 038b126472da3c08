//go:build !windows

package windowskext

import (
	"fmt"
	"syscall"

	"github.com/warden-fw/warden/backend"
)

// BindToInterfaceControl is the Windows interface binding for the split-tunnel proxy's upstream sockets
// (IP_UNICAST_IF / IPV6_UNICAST_IF). Elsewhere the returned function fails with backend.ErrUnsupported.
func BindToInterfaceControl(ifIndex int, v6 bool) func(network, address string, c syscall.RawConn) error {
	return func(string, string, syscall.RawConn) error {
		return fmt.Errorf("binding a socket to interface %d with IP_UNICAST_IF: %w", ifIndex, backend.ErrUnsupported)
	}
}
