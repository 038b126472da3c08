//go:build !linux

package daemon

import (
	"fmt"
	"log/slog"
	"runtime"

	"github.com/warden-fw/warden/backend"
)

// newProcessResolver: off Linux the backend itself resolves processes (or nothing does).
func newProcessResolver(*slog.Logger) (backend.ProcessResolver, func() error, error) {
	return nil, nil, fmt.Errorf("process attribution on %s: %w", runtime.GOOS, backend.ErrUnsupported)
}
