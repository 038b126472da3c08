//go:build !linux

package nfqread

import "errors"

// NFQUEUE is Linux-only; elsewhere there is no queue socket to read.
func read(int, []byte) (int, error) { return 0, errors.ErrUnsupported }
