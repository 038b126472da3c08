//go:build !windows

package control

import (
	"net"
	"os"
	"path/filepath"
	"testing"
)

func TestListenSecurity(t *testing.T) {
	dir := t.TempDir()
	open := filepath.Join(dir, "open")
	if err := os.Mkdir(open, 0o777); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(open, 0o777); err != nil { // beat the umask
		t.Fatal(err)
	}
	if _, err := Listen(filepath.Join(open, "w.sock")); err == nil {
		t.Error("listening in a world-writable directory succeeded")
	}
	// A regular file where the socket should be is not replaced.
	file := filepath.Join(dir, "file.sock")
	if err := os.WriteFile(file, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Listen(file); err == nil {
		t.Error("a regular file was replaced by the socket")
	}
	// A live socket is not taken over; a stale one is.
	live := filepath.Join(dir, "live.sock")
	ln, err := Listen(live)
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(live)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("socket mode %v (%v)", fi.Mode().Perm(), err)
	}
	if _, err := Listen(live); err == nil {
		t.Error("took over a live daemon's socket")
	}
	// Leave the file behind, as a crash would.
	ln.(*peerCheckListener).Listener.(*net.UnixListener).SetUnlinkOnClose(false)
	ln.Close()
	ln2, err := Listen(live)
	if err != nil {
		t.Fatalf("stale socket not replaced: %v", err)
	}
	ln2.Close()
}
