//go:build !linux

package nfqverdict

import "errors"

// NFQUEUE is Linux-only; elsewhere there is no queue socket to write to.
func write(int, []byte) (int, error) { return 0, errors.ErrUnsupported }
