package process

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/warden-fw/warden/backend"
	"github.com/warden-fw/warden/backend/netnstest"
)

// The test binary re-executes itself as a child process that opens sockets, reports their addresses on stdout
// and holds them until its stdin closes.
const (
	childEnv       = "WARDEN_PROCESS_TEST_CHILD" // "4" or "6": the address family to use
	childPeerTCP   = "WARDEN_PROCESS_TEST_PEER_TCP"
	childPeerUDP   = "WARDEN_PROCESS_TEST_PEER_UDP"
	nobodyUID      = 65534
	childStartWait = 20 * time.Second
)

// readReport decodes the one JSON report a child test process writes to its stdout, failing the test if the
// child exits without it or takes longer than childStartWait.
func readReport[T any](t *testing.T, stdout io.Reader, who string) T {
	t.Helper()
	reports := make(chan T, 1)
	go func() {
		var rep T
		if json.NewDecoder(stdout).Decode(&rep) == nil {
			reports <- rep
		}
		close(reports)
	}()
	select {
	case rep, ok := <-reports:
		if !ok {
			t.Fatalf("%s exited without reporting", who)
		}
		return rep
	case <-time.After(childStartWait):
		t.Fatalf("%s did not report in time", who)
	}
	var none T // not reached: Fatalf ends the test
	return none
}

func TestMain(m *testing.M) {
	if ran, err := runEBPFHelper(); ran {
		if err != nil {
			fmt.Fprintln(os.Stderr, "helper:", err)
			os.Exit(2)
		}
		os.Exit(0)
	}
	if outside := os.Getenv(netnsChildEnv); outside != "" {
		if err := runNetnsChild(outside); err != nil {
			fmt.Fprintln(os.Stderr, "netns child:", err)
			os.Exit(2)
		}
		os.Exit(0)
	}
	if fam := os.Getenv(childEnv); fam != "" {
		if err := runChild(fam); err != nil {
			fmt.Fprintln(os.Stderr, "child:", err)
			os.Exit(2)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// childAddrs are the child's sockets.
type childAddrs struct {
	TCPListen     netip.AddrPort // listener on the loopback address
	TCPDualListen netip.AddrPort // listener on the wildcard (dual-stack for family 4: reached over IPv4)
	TCPClient     netip.AddrPort // local end of a connection to the parent's listener
	UDPUnconn     netip.AddrPort // unconnected, bound to the loopback address
	UDPWildcard   netip.AddrPort // unconnected, bound to the wildcard (reported with the loopback address)
	UDPConn       netip.AddrPort // connected to the parent's UDP socket
}

func runChild(fam string) error {
	lo, network4 := "127.0.0.1", true
	if fam == "6" {
		lo, network4 = "::1", false
	}
	tcpNet, udpNet := "tcp6", "udp6"
	if network4 {
		tcpNet, udpNet = "tcp4", "udp4"
	}
	var a childAddrs
	// The loopback listener is plain TCP; the wildcard one below is whatever Go makes by default (MPTCP since
	// Go 1.24 where the kernel has it).
	var plain net.ListenConfig
	plain.SetMultipathTCP(false)
	ln, err := plain.Listen(context.Background(), tcpNet, net.JoinHostPort(lo, "0"))
	if err != nil {
		return err
	}
	// Accept whatever the parent dials so those sockets get a file (and an inode) in this process; they stay
	// open until the process exits.
	accepted := make(chan net.Conn, 16)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted <- c
		}
	}()
	a.TCPListen = ln.Addr().(*net.TCPAddr).AddrPort()
	dual, err := net.Listen("tcp", ":0") // [::]:port, dual-stack
	if err != nil {
		return err
	}
	a.TCPDualListen = netip.AddrPortFrom(netip.MustParseAddr(lo), uint16(dual.Addr().(*net.TCPAddr).Port))
	c, err := net.Dial(tcpNet, os.Getenv(childPeerTCP))
	if err != nil {
		return err
	}
	a.TCPClient = c.LocalAddr().(*net.TCPAddr).AddrPort()
	u, err := net.ListenUDP(udpNet, &net.UDPAddr{IP: net.ParseIP(lo)})
	if err != nil {
		return err
	}
	a.UDPUnconn = u.LocalAddr().(*net.UDPAddr).AddrPort()
	uw, err := net.ListenUDP("udp", &net.UDPAddr{})
	if err != nil {
		return err
	}
	a.UDPWildcard = netip.AddrPortFrom(netip.MustParseAddr(lo), uint16(uw.LocalAddr().(*net.UDPAddr).Port))
	uc, err := net.Dial(udpNet, os.Getenv(childPeerUDP))
	if err != nil {
		return err
	}
	a.UDPConn = uc.LocalAddr().(*net.UDPAddr).AddrPort()
	if err := json.NewEncoder(os.Stdout).Encode(a); err != nil {
		return err
	}
	_, _ = io.Copy(io.Discard, os.Stdin) // hold everything until the parent closes stdin
	// Unreferenced sockets may be closed by their finalizers; keep them all until here.
	runtime.KeepAlive([]any{ln, dual, c, u, uw, uc, accepted})
	return nil
}

// testOptions are the options newTestResolver uses; tests that run against the hash map programs set them (see
// TestHashMapPrograms).
var testOptions Options

func newTestResolver(t testing.TB) *Resolver {
	t.Helper()
	r, err := NewWithOptions(nil, testOptions)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

// childBinary copies the test binary somewhere user nobody may execute it from, so the child runs as another
// user under another path than the parent.
func childBinary(t *testing.T) string {
	t.Helper()
	return copyTestBinary(t, "child.test")
}

// copyTestBinary copies the test binary to a new directory anyone may execute it from, under the given name
// (which the kernel makes the name, comm, of a process running it).
func copyTestBinary(t *testing.T, name string) string {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir, err := os.MkdirTemp("", "warden-process-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	src, err := os.Open(self)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	path := filepath.Join(dir, name)
	dst, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_EXCL, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(dst, src); err != nil {
		t.Fatal(err)
	}
	if err := dst.Close(); err != nil {
		t.Fatal(err)
	}
	return path
}

// startSocketChild starts runChild as user nobody from bin, with the parent's TCP listener and UDP socket to
// connect to, and returns it with its socket addresses and a function that closes its stdin (it then exits)
// and waits for it.
func startSocketChild(t *testing.T, bin, fam string, lnAddr, udpAddr netip.AddrPort) (*exec.Cmd, childAddrs, func() error) {
	t.Helper()
	cmd := exec.Command(bin, "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"="+fam, childPeerTCP+"="+lnAddr.String(), childPeerUDP+"="+udpAddr.String())
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: nobodyUID, Gid: nobodyUID}, Pdeathsig: syscall.SIGKILL}
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var waitOnce sync.Once
	var waitErr error
	wait := func() error {
		waitOnce.Do(func() { stdin.Close(); waitErr = cmd.Wait() })
		return waitErr
	}
	t.Cleanup(func() { cmd.Process.Kill(); wait() })

	return cmd, readReport[childAddrs](t, stdout, "child"), wait
}

type lookupCase struct {
	name string
	info backend.Info
	want backend.Process
}

func TestResolveRealSockets(t *testing.T) {
	netnstest.RequireRoot(t)
	bin := childBinary(t)
	for _, fam := range []string{"4", "6"} {
		t.Run("ipv"+fam, func(t *testing.T) { testRealSockets(t, fam, bin) })
	}
}

func testRealSockets(t *testing.T, fam, bin string) {
	lo := netip.MustParseAddr("127.0.0.1")
	tcpNet, udpNet := "tcp4", "udp4"
	if fam == "6" {
		lo = netip.IPv6Loopback()
		tcpNet, udpNet = "tcp6", "udp6"
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	parent := backend.Process{PID: int32(os.Getpid()), Path: self, UID: int32(os.Getuid())}

	// The parent's own sockets: a listener the child dials, a UDP socket the child connects to.
	ln, err := net.Listen(tcpNet, netip.AddrPortFrom(lo, 0).String())
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	parentUDP, err := net.ListenUDP(udpNet, net.UDPAddrFromAddrPort(netip.AddrPortFrom(lo, 0)))
	if err != nil {
		t.Fatal(err)
	}
	defer parentUDP.Close()
	lnAddr := ln.Addr().(*net.TCPAddr).AddrPort()
	udpAddr := parentUDP.LocalAddr().(*net.UDPAddr).AddrPort()

	cmd, a, wait := startSocketChild(t, bin, fam, lnAddr, udpAddr)
	// The child's connection to our listener, accepted here: its local end is the listener's address.
	accepted, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer accepted.Close()
	// Our connection to the child's listener.
	toChild, err := net.Dial(tcpNet, a.TCPListen.String())
	if err != nil {
		t.Fatal(err)
	}
	defer toChild.Close()
	toChildLocal := toChild.LocalAddr().(*net.TCPAddr).AddrPort()

	child := backend.Process{PID: int32(cmd.Process.Pid), Path: bin, UID: nobodyUID}
	stranger := netip.AddrPortFrom(lo, 9) // a remote end no socket is connected to
	childCases := []lookupCase{
		{"child tcp outbound", backend.Info{Protocol: backend.TCP, Direction: backend.Outbound, Local: a.TCPClient, Remote: lnAddr}, child},
		{"child tcp listener (syn)", backend.Info{Protocol: backend.TCP, Direction: backend.Inbound, Local: a.TCPListen, Remote: stranger}, child},
		{"child tcp accepted", backend.Info{Protocol: backend.TCP, Direction: backend.Inbound, Local: a.TCPListen, Remote: toChildLocal}, child},
		{"child tcp wildcard listener", backend.Info{Protocol: backend.TCP, Direction: backend.Inbound, Local: a.TCPDualListen, Remote: stranger}, child},
		{"child udp unconnected", backend.Info{Protocol: backend.UDP, Direction: backend.Outbound, Local: a.UDPUnconn, Remote: stranger}, child},
		{"child udp wildcard", backend.Info{Protocol: backend.UDP, Direction: backend.Outbound, Local: a.UDPWildcard, Remote: stranger}, child},
		{"child udp connected", backend.Info{Protocol: backend.UDP, Direction: backend.Outbound, Local: a.UDPConn, Remote: udpAddr}, child},
	}
	parentCases := []lookupCase{
		{"parent tcp accepted", backend.Info{Protocol: backend.TCP, Direction: backend.Inbound, Local: lnAddr, Remote: a.TCPClient}, parent},
		{"parent tcp outbound", backend.Info{Protocol: backend.TCP, Direction: backend.Outbound, Local: toChildLocal, Remote: a.TCPListen}, parent},
		{"parent udp inbound", backend.Info{Protocol: backend.UDP, Direction: backend.Inbound, Local: udpAddr, Remote: a.UDPConn}, parent},
	}

	r := newTestResolver(t)
	exited := make(chan int32, 64)
	hook := func(pid int32) { exited <- pid }
	r.exitHook.Store(&hook)
	for _, round := range []string{"cold", "cached"} {
		for _, c := range append(childCases, parentCases...) {
			got, ok := r.ResolveProcess(&c.info)
			if !ok {
				t.Errorf("%s %s (%v): not found", round, c.name, &c.info)
				continue
			}
			if diff := cmp.Diff(c.want, got); diff != "" {
				t.Errorf("%s %s (%v): -want +got\n%s", round, c.name, &c.info, diff)
			}
		}
	}

	// Once the child is gone its sockets are closed (or orphaned, TCP), and every one of its connections is
	// unknown, though the 5-tuple cache still holds them.
	if err := wait(); err != nil {
		t.Fatalf("child: %v", err)
	}
	// The resolver learns of the exit asynchronously (pidfd); wait for that before asking.
	for noticed := false; !noticed; {
		select {
		case pid := <-exited:
			noticed = pid == child.PID
		case <-time.After(10 * time.Second):
			t.Fatal("the resolver did not notice the child's exit")
		}
	}
	for _, c := range childCases {
		if got, ok := r.ResolveProcess(&c.info); ok {
			t.Errorf("after exit, %s (%v) = %+v, want unknown", c.name, &c.info, got)
		}
	}
	for _, c := range parentCases[2:] { // our UDP socket is still ours
		if got, ok := r.ResolveProcess(&c.info); !ok || got != c.want {
			t.Errorf("after child exit, %s = %+v, %v; want %+v", c.name, got, ok, c.want)
		}
	}
}

func TestResolveUnknown(t *testing.T) {
	netnstest.RequireRoot(t)
	r := newTestResolver(t)
	// A port nothing listens on: find a free one by binding and closing.
	l, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	free := l.LocalAddr().(*net.UDPAddr).AddrPort()
	l.Close()
	remote := netip.MustParseAddrPort("127.0.0.1:9")
	for _, info := range []backend.Info{
		{Protocol: backend.UDP, Local: free, Remote: remote},
		{Protocol: backend.TCP, Local: free, Remote: remote},
		{Protocol: backend.TCP, Direction: backend.Inbound, Local: free, Remote: remote},
		{Protocol: backend.ICMP, Local: netip.AddrPortFrom(free.Addr(), 0), Remote: netip.AddrPortFrom(remote.Addr(), 0)},
		{Protocol: backend.UDP, Local: free, Remote: netip.MustParseAddrPort("[::1]:9")}, // mixed families
	} {
		if got, ok := r.ResolveProcess(&info); ok {
			t.Errorf("%v = %+v, want unknown", &info, got)
		}
	}
	if _, ok := r.ResolveProcess(nil); ok {
		t.Error("nil info resolved")
	}
}

// TestConcurrentMissesShareWalks resolves many new sockets at once with an empty inode cache: every lookup must
// be right, and the /proc walks are shared instead of one per lookup.
func TestConcurrentMissesShareWalks(t *testing.T) {
	netnstest.RequireRoot(t)
	const n = 32
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	want := backend.Process{PID: int32(os.Getpid()), Path: self, UID: int32(os.Getuid())}
	infos := make([]backend.Info, n)
	for i := range infos {
		u, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
		defer u.Close()
		infos[i] = backend.Info{Protocol: backend.UDP, Local: u.LocalAddr().(*net.UDPAddr).AddrPort(), Remote: netip.MustParseAddrPort("127.0.0.1:9")}
	}
	r := newTestResolver(t)
	var wg sync.WaitGroup
	errs := make(chan string, n)
	for i := range infos {
		wg.Go(func() {
			got, ok := r.ResolveProcess(&infos[i])
			if !ok || got != want {
				errs <- fmt.Sprintf("%v = %+v, %v", &infos[i], got, ok)
			}
		})
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Error(e)
	}
	// The first lookup walks alone; the others queue behind it and share at most one more walk (two if the
	// first walk started before some of them asked).
	if got := r.scans.Load(); got > 3 {
		t.Errorf("%d concurrent misses took %d /proc walks, want at most 3", n, got)
	}
}

func TestTupleHitDoesNotAllocate(t *testing.T) {
	netnstest.RequireRoot(t)
	u, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	info := backend.Info{Protocol: backend.UDP, Local: u.LocalAddr().(*net.UDPAddr).AddrPort(), Remote: netip.MustParseAddrPort("127.0.0.1:9")}
	r := newTestResolver(t)
	r.tupleTTL = time.Hour
	if _, ok := r.ResolveProcess(&info); !ok {
		t.Fatal("not found")
	}
	if a := testing.AllocsPerRun(1000, func() { r.ResolveProcess(&info) }); a != 0 {
		t.Errorf("cached lookup allocates %v times", a)
	}
}

func benchSocket(b *testing.B) backend.Info {
	netnstest.RequireRoot(b)
	u, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { u.Close() })
	return backend.Info{Protocol: backend.UDP, Local: u.LocalAddr().(*net.UDPAddr).AddrPort(), Remote: netip.MustParseAddrPort("127.0.0.1:9")}
}

// BenchmarkResolveCachedHit is a repeated lookup of one 5-tuple.
func BenchmarkResolveCachedHit(b *testing.B) {
	info := benchSocket(b)
	r := newTestResolver(b)
	r.tupleTTL = time.Hour
	b.ReportAllocs()
	for b.Loop() {
		if _, ok := r.ResolveProcess(&info); !ok {
			b.Fatal("not found")
		}
	}
}

// BenchmarkResolveNewConn is the usual new connection: 5-tuple miss, socket owner known from an earlier walk
// (sock_diag query, fd check, stat read).
func BenchmarkResolveNewConn(b *testing.B) {
	info := benchSocket(b)
	r := newTestResolver(b)
	r.tupleTTL = 0
	b.ReportAllocs()
	for b.Loop() {
		if _, ok := r.ResolveProcess(&info); !ok {
			b.Fatal("not found")
		}
	}
}

// BenchmarkResolveColdWalk forgets every socket owner before each lookup, so each one walks /proc (the walk
// interval is lifted so the benchmark measures the walk, not the rate limit).
func BenchmarkResolveColdWalk(b *testing.B) {
	info := benchSocket(b)
	r := newTestResolver(b)
	r.tupleTTL = 0
	r.scanInterval = 0
	b.ReportAllocs()
	for b.Loop() {
		r.ownerMu.Lock()
		clear(r.owners)
		r.hot = [hotPIDs]int32{}
		r.ownerMu.Unlock()
		r.walk.known = map[int32]struct{}{} // every PID is "new": the walk order cannot help
		if _, ok := r.ResolveProcess(&info); !ok {
			b.Fatal("not found")
		}
	}
}

// BenchmarkFullWalk walks all of /proc looking for an inode no process holds, the cost of a lookup whose
// process is gone (at most once per scanInterval).
func BenchmarkFullWalk(b *testing.B) {
	netnstest.RequireRoot(b)
	r := newTestResolver(b)
	wanted := map[uint32]struct{}{^uint32(0): {}}
	b.ReportAllocs()
	for b.Loop() {
		r.scan(wanted)
	}
}
