//go:build !linux

package process

import (
	"fmt"
	"log/slog"

	"github.com/warden-fw/warden/backend"
)

var _ backend.ProcessResolver = (*Resolver)(nil)

// Resolver finds the process behind a connection. This OS has none: New always fails.
type Resolver struct{}

// New returns an error wrapping backend.ErrUnsupported: process attribution by sock_diag is Linux-only.
func New(*slog.Logger) (*Resolver, error) {
	return nil, fmt.Errorf("process attribution by sock_diag: %w", backend.ErrUnsupported)
}

// NewWithOptions is New: it always fails here.
func NewWithOptions(logger *slog.Logger, _ Options) (*Resolver, error) {
	return New(logger)
}

// Stats returns zero counts.
func (*Resolver) Stats() Stats { return Stats{} }

// ResolveProcess reports that the owner is unknown.
func (*Resolver) ResolveProcess(*backend.Info) (backend.Process, bool) {
	return backend.Process{}, false
}

// Close does nothing.
func (*Resolver) Close() error { return nil }
