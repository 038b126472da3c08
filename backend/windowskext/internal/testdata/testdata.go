// Package testdata locates Warden's shared golden test vectors for the windowskext tests.
package testdata

import (
	"os"
	"path/filepath"
	"testing"
)

// Read returns the named file from the shared test data directory (../shared/testdata relative to the
// repository root, found by walking up to go.mod). A missing file fails the test: a golden test that silently
// skips proves nothing.
func Read(t testing.TB, name string) []byte {
	t.Helper()
	dir, err := os.Getwd()
	if err != nil {
		t.Fatalf("getwd: %v", err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			break
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatalf("no go.mod above the test directory; cannot find shared test data %s", name)
		}
		dir = parent
	}
	path := filepath.Join(dir, "..", "shared", "testdata", name)
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("reading golden file: %v", err)
	}
	return b
}
