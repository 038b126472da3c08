//go:build !windows

package sandbox

import "syscall"

// stopSignal asks the daemon for a clean stop.
var stopSignal = syscall.SIGTERM
