//go:build !linux

package marks

import (
	"fmt"
	"runtime"
	"syscall"
)

// ControlOwnSocket is not available off Linux: socket marks are a Linux concept.
func ControlOwnSocket(network, address string, c syscall.RawConn) error {
	return fmt.Errorf("socket marks on %s: not supported", runtime.GOOS)
}
