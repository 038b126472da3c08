//go:build !linux

package handoff

import (
	"context"
	"net"
	"net/netip"
)

// Handoff is never loaded off Linux.
type Handoff struct{}

// Load reports ErrUnsupported.
func Load() (*Handoff, error) { return nil, ErrUnsupported }

// Drain has nothing to wait for.
func (*Handoff) Drain(context.Context) int { return 0 }

// Close does nothing.
func (*Handoff) Close() error { return nil }

// Expect reports ErrUnsupported.
func (*Handoff) Expect(client, original netip.AddrPort) error { return ErrUnsupported }

// Client is never made off Linux.
type Client struct{}

// Attach reports ErrUnsupported.
func (*Handoff) Attach(relay *net.TCPConn, client, original netip.AddrPort) (*Client, error) {
	return nil, ErrUnsupported
}

// Queued reports ErrUnsupported.
func (*Client) Queued() (int, error) { return 0, ErrUnsupported }

// Detach does nothing.
func (*Client) Detach() {}
