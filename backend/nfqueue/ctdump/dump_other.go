//go:build !linux

package ctdump

import "errors"

// ErrUnsupported is returned where there is no conntrack.
var ErrUnsupported = errors.New("ctdump: conntrack is Linux-only")

// Dump is not available on this OS.
func Dump(func(*Flow)) error { return ErrUnsupported }
