package process

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/warden-fw/warden/backend"
	"github.com/warden-fw/warden/backend/netnstest"
)

// netnsChildEnv makes the test binary run runNetnsChild instead of the tests; its value is a socket address in
// the parent's namespace the child must not find.
const netnsChildEnv = "WARDEN_PROCESS_TEST_NETNS_CHILD"

// runNetnsChild runs inside a fresh network namespace: a resolver created there finds the child's own sockets
// and not the parent's, though /proc shows both processes.
func runNetnsChild(outside string) error {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		return err
	}
	defer ln.Close()
	r, err := New(nil)
	if err != nil {
		return err
	}
	defer r.Close()
	self, err := os.Executable()
	if err != nil {
		return err
	}
	want := backend.Process{PID: int32(os.Getpid()), Path: self, UID: int32(os.Getuid())}
	own := backend.Info{Protocol: backend.TCP, Direction: backend.Inbound, Local: ln.Addr().(*net.TCPAddr).AddrPort(), Remote: netip.MustParseAddrPort("127.0.0.1:9")}
	if got, ok := r.ResolveProcess(&own); !ok || got != want {
		return fmt.Errorf("own listener: %+v, %v; want %+v", got, ok, want)
	}
	other := backend.Info{Protocol: backend.UDP, Local: netip.MustParseAddrPort(outside), Remote: netip.MustParseAddrPort("127.0.0.1:9")}
	if got, ok := r.ResolveProcess(&other); ok {
		return fmt.Errorf("socket of another namespace resolved to %+v", got)
	}
	fmt.Println("netns child ok")
	return nil
}

func TestResolveInNetns(t *testing.T) {
	netnstest.RequireRoot(t)
	ns := "warden-proc-" + netnstest.Suffix()
	netnstest.NewNS(t, ns)
	// A socket here, in the test's namespace, on an address the child's loopback also has.
	u, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	cmd := netnstest.Child(context.Background(), t, ns, netnsChildEnv+"="+u.LocalAddr().String())
	done := make(chan struct{})
	var out []byte
	go func() { out, err = cmd.CombinedOutput(); close(done) }()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		cmd.Process.Kill()
		<-done
		t.Fatal("netns child timed out")
	}
	if err != nil || !strings.Contains(string(out), "netns child ok") {
		t.Fatalf("netns child: %v\n%s", err, out)
	}
}

// TestCloseStopsWatcher checks Close ends the exit watcher's goroutine and that a closed resolver answers
// unknown.
func TestCloseStopsWatcher(t *testing.T) {
	netnstest.RequireRoot(t)
	before := runtime.NumGoroutine()
	r, err := New(nil)
	if err != nil {
		t.Fatal(err)
	}
	u, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	info := backend.Info{Protocol: backend.UDP, Local: u.LocalAddr().(*net.UDPAddr).AddrPort(), Remote: netip.MustParseAddrPort("127.0.0.1:9")}
	if _, ok := r.ResolveProcess(&info); !ok {
		t.Fatal("own socket not found")
	}
	r.Close()
	r.Close()
	if _, ok := r.ResolveProcess(&info); ok {
		t.Error("closed resolver answered")
	}
	// The goroutine has left run() when Close returns; give the runtime a bounded moment to retire it.
	deadline := time.Now().Add(2 * time.Second)
	for runtime.NumGoroutine() > before && time.Now().Before(deadline) {
		runtime.Gosched()
	}
	if n := runtime.NumGoroutine(); n > before {
		t.Errorf("%d goroutines after Close, %d before New", n, before)
	}
}
