//go:build !linux

package splitroute

import (
	"context"
	"fmt"
	"runtime"

	"github.com/warden-fw/warden/backend"
)

var errUnsupported = fmt.Errorf("kernel-routed split tunnel on %s: %w", runtime.GOOS, backend.ErrUnsupported)

// Install reports that kernel routing of split connections is Linux-only.
func Install(uint8, int, bool) error { return errUnsupported }

// Remove reports that kernel routing of split connections is Linux-only.
func Remove(uint8) error { return errUnsupported }

// WatchPolicy fails: there are no routes to watch here.
func WatchPolicy(context.Context, func()) error { return errUnsupported }

// Intact fails: there are no routes here.
func Intact(uint8, bool) (bool, error) { return false, errUnsupported }

// Cleanup has nothing to remove here.
func Cleanup() error { return nil }

// LoosenRPFilter reports that reverse-path filtering is a Linux setting.
func LoosenRPFilter(string) (func() error, error) { return nil, errUnsupported }
