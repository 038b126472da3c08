//go:build !linux && !windows

package splittun

import (
	"fmt"
	"log/slog"
	"runtime"

	"github.com/warden-fw/warden/backend"
)

// NewPlatform reports that this OS has no split-tunnel platform.
func NewPlatform(log *slog.Logger) (Platform, error) {
	return nil, fmt.Errorf("split tunnel on %s: %w", runtime.GOOS, backend.ErrUnsupported)
}
