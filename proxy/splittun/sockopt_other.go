//go:build !linux

package splittun

import "net"

// newGatherer: elsewhere a TCP socket's receive low-water mark does not gate its readiness (Windows rejects
// SO_RCVLOWAT for TCP), so the relay does not gather.
func newGatherer(*net.TCPConn) gatherer { return gatherer{} }

// tcpReceiveMax: the kernel handoff, the only user, is Linux-only.
func tcpReceiveMax() int { return 0 }
