//go:build !linux

package nlwire

import "errors"

// Read: netlink is Linux-only; elsewhere there is no socket to read.
func Read(int, []byte) (int, error) { return 0, errors.ErrUnsupported }

// Write: see Read.
func Write(int, []byte) (int, error) { return 0, errors.ErrUnsupported }
