//go:build !linux

package nfqueue

import (
	"context"
	"fmt"
	"runtime"

	"github.com/warden-fw/warden/backend"
)

// Backend is the NFQUEUE backend; off Linux it cannot be created.
type Backend struct{}

// New fails off Linux: NFQUEUE is a Linux facility. Nothing is registered with the backend registry here.
func New(o backend.Options, c Config) (*Backend, error) {
	return nil, fmt.Errorf("nfqueue backend on %s: %w", runtime.GOOS, backend.ErrUnsupported)
}

// Name returns "nfqueue".
func (b *Backend) Name() string { return "nfqueue" }

// Capabilities reports nothing: the backend does not exist here.
func (b *Backend) Capabilities() backend.Capabilities { return backend.Capabilities{} }

// Start fails with a wrapped backend.ErrUnsupported.
func (b *Backend) Start(ctx context.Context, h backend.Handler) error {
	return fmt.Errorf("nfqueue backend on %s: %w", runtime.GOOS, backend.ErrUnsupported)
}

// Stop does nothing.
func (b *Backend) Stop() error { return nil }
