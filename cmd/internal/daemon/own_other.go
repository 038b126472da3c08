//go:build !linux

package daemon

import "syscall"

// ownSocketControl: off Linux own traffic is recognised by process (the Windows driver's owner-PID bypass).
func ownSocketControl() func(network, address string, c syscall.RawConn) error { return nil }
