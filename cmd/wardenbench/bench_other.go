//go:build !linux

package main

import (
	"fmt"
	"io"
	"runtime"

	"github.com/warden-fw/warden/backend"
)

func runBench(*options, io.Writer, io.Writer) error {
	return fmt.Errorf("wardenbench on %s: %w (it needs Linux network namespaces and NFQUEUE)", runtime.GOOS, backend.ErrUnsupported)
}

func childMain(role string, _ []string) int {
	fmt.Printf("wardenbench %s: %v\n", role, backend.ErrUnsupported)
	return 1
}
