//go:build !linux && !windows

package control

import "net"

// peerCheckListener relies on the socket's 0600 mode where peer credentials are not available.
type peerCheckListener struct{ net.Listener }
