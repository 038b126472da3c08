package control

import (
	"context"
	"fmt"
	"net"

	"github.com/warden-fw/warden/backend"
)

// Listen on Windows: the named-pipe endpoint (restricted to SYSTEM and Administrators) is not built yet.
func Listen(path string) (net.Listener, error) {
	return nil, fmt.Errorf("control endpoint %s: named pipes: %w", path, backend.ErrUnsupported)
}

func dial(ctx context.Context, path string) (net.Conn, error) {
	return nil, fmt.Errorf("control endpoint %s: named pipes: %w", path, backend.ErrUnsupported)
}
