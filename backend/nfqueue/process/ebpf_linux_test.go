package process

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/google/go-cmp/cmp"
	"golang.org/x/sys/unix"

	"github.com/warden-fw/warden/backend"
	"github.com/warden-fw/warden/backend/netnstest"
	"github.com/warden-fw/warden/backend/nfqueue/bpfkit"
)

// Helper processes of the eBPF tests, re-executions of the test binary selected by environment variables.
const (
	// inNetnsEnv names the test a re-executed binary runs inside the test's network namespace.
	inNetnsEnv = "WARDEN_PROCESS_TEST_IN_NETNS"
	// forkerEnv runs runForker; its value is "tcp-peer,udp-peer".
	forkerEnv = "WARDEN_PROCESS_TEST_FORKER"
	// holderEnv runs runHolder; its value is the UDP peer to send to.
	holderEnv = "WARDEN_PROCESS_TEST_HOLDER"
	// bpfHolderEnv runs runBPFHolder.
	bpfHolderEnv = "WARDEN_PROCESS_TEST_BPF_HOLDER"
	// execFromEnv runs runExecFrom; its value is the UDP peer to send to.
	execFromEnv = "WARDEN_PROCESS_TEST_EXEC_FROM"
	// execTargetEnv is the program runExecFrom executes.
	execTargetEnv = "WARDEN_PROCESS_TEST_EXEC_TARGET"
	// execedEnv runs runExeced; its value is "fd,udp-peer".
	execedEnv = "WARDEN_PROCESS_TEST_EXECED"
	// idleEnv runs a process that does nothing until its stdin closes.
	idleEnv = "WARDEN_PROCESS_TEST_IDLE"
)

// runEBPFHelper runs the helper the environment asks for, if any, and reports whether it did.
func runEBPFHelper() (bool, error) {
	if ran, err := runTupleHelper(); ran {
		return true, err
	}
	if peer := os.Getenv(holderEnv); peer != "" {
		return true, runHolder(peer)
	}
	if peers := os.Getenv(forkerEnv); peers != "" {
		return true, runForker(peers)
	}
	if os.Getenv(bpfHolderEnv) != "" {
		return true, runBPFHolder()
	}
	if peer := os.Getenv(execFromEnv); peer != "" {
		return true, runExecFrom(peer, os.Getenv(execTargetEnv))
	}
	if v := os.Getenv(execedEnv); v != "" {
		return true, runExeced(v)
	}
	if os.Getenv(idleEnv) != "" {
		_, err := io.Copy(io.Discard, os.Stdin)
		return true, err
	}
	return false, nil
}

// forkerReport is what runForker prints.
type forkerReport struct {
	TCP, UDP netip.AddrPort // local ends of the sockets handed to the holder
	Holder   int
}

// runForker opens a TCP connection and a UDP socket, starts runHolder with both, tells where they are and
// exits, leaving the holder as the sockets' only owner.
func runForker(peers string) error {
	tcpPeer, udpPeer, ok := strings.Cut(peers, ",")
	if !ok {
		return fmt.Errorf("bad peers %q", peers)
	}
	c, err := net.Dial("tcp4", tcpPeer)
	if err != nil {
		return err
	}
	u, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		return err
	}
	cf, err := c.(*net.TCPConn).File()
	if err != nil {
		return err
	}
	uf, err := u.File()
	if err != nil {
		return err
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	cmd := exec.Command(self, "-test.run=^$")
	cmd.Env = append(envWithout(forkerEnv), holderEnv+"="+udpPeer)
	cmd.ExtraFiles = []*os.File{cf, uf} // descriptors 3 and 4
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	if err := cmd.Start(); err != nil {
		return err
	}
	rep := forkerReport{TCP: c.LocalAddr().(*net.TCPAddr).AddrPort(), UDP: u.LocalAddr().(*net.UDPAddr).AddrPort(), Holder: cmd.Process.Pid}
	return json.NewEncoder(os.Stdout).Encode(rep)
}

// runHolder holds the forker's sockets (descriptors 3 and 4) until its stdin closes; it sends one datagram from
// the UDP socket first, so the eBPF map learns it uses that socket.
func runHolder(udpPeer string) error {
	tcp := os.NewFile(3, "tcp")
	u, err := net.FilePacketConn(os.NewFile(4, "udp"))
	if err != nil {
		return err
	}
	peer, err := net.ResolveUDPAddr("udp4", udpPeer)
	if err != nil {
		return err
	}
	if _, err := u.WriteTo([]byte("x"), peer); err != nil {
		return err
	}
	fmt.Println("ready")
	_, _ = io.Copy(io.Discard, os.Stdin)
	runtime.KeepAlive([]any{tcp, u})
	return nil
}

// bpfHolderReport is what runBPFHolder prints.
type bpfHolderReport struct {
	Progs       []ebpf.ProgramID
	Err         string
	Unavailable bool
}

// runBPFHolder creates a resolver, prints its program IDs and waits to be killed.
func runBPFHolder() error {
	r, err := New(nil)
	if err != nil {
		return err
	}
	defer r.Close()
	var rep bpfHolderReport
	if r.bpf == nil {
		rep.Err, rep.Unavailable = r.bpfErr.Error(), errors.Is(r.bpfErr, errBPFUnavailable)
	} else {
		rep.Progs = progIDs(r.bpf)
	}
	if err := json.NewEncoder(os.Stdout).Encode(rep); err != nil {
		return err
	}
	_, _ = io.Copy(io.Discard, os.Stdin)
	return nil
}

func envWithout(name string) []string {
	return slices.DeleteFunc(os.Environ(), func(kv string) bool { return strings.HasPrefix(kv, name+"=") })
}

func progIDs(b *bpfOwners) []ebpf.ProgramID {
	var ids []ebpf.ProgramID
	for _, p := range b.progs {
		info, err := p.Info()
		if err != nil {
			continue
		}
		if id, ok := info.ID(); ok {
			ids = append(ids, id)
		}
	}
	return ids
}

// newEBPFResolver returns a resolver with the eBPF map active. It skips when the system lacks what the map
// needs, and fails when the programs are broken.
func newEBPFResolver(t *testing.T) *Resolver {
	t.Helper()
	netnstest.RequireRoot(t)
	r := newTestResolver(t)
	requireBPF(t, r)
	if !r.Stats().EBPF {
		t.Fatal("Stats().EBPF is false with the map loaded")
	}
	return r
}

// requireBPF skips when r has no eBPF map because the system lacks what it needs, and fails when the programs
// were rejected: a broken program must not pass as a missing feature.
func requireBPF(tb testing.TB, r *Resolver) {
	tb.Helper()
	if r.bpf != nil {
		return
	}
	if errors.Is(r.bpfErr, errBPFUnavailable) {
		tb.Skipf("eBPF socket owner map unavailable here: %v", r.bpfErr)
	}
	tb.Fatalf("eBPF socket owner map failed to load: %v", r.bpfErr)
}

// runInNetns reports true when the test already runs inside its own network namespace; otherwise it runs the
// test there (re-executing the test binary under `ip netns exec`), reports its outcome and returns false.
func runInNetns(t *testing.T) bool {
	if os.Getenv(inNetnsEnv) == t.Name() {
		return true
	}
	netnstest.RequireRoot(t)
	ns := "warden-proc-" + netnstest.Suffix()
	netnstest.NewNS(t, ns)
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	cmd := netnstest.Child(ctx, t, ns, inNetnsEnv+"="+t.Name(), "-test.run=^"+t.Name()+"$", "-test.v", "-test.count=1")
	out, err := cmd.CombinedOutput()
	t.Logf("inside namespace %s:\n%s", ns, out)
	switch {
	case err != nil:
		t.Fatalf("test in namespace: %v", err)
	case strings.Contains(string(out), "--- SKIP: "+t.Name()):
		t.Skip("skipped inside the namespace")
	case !strings.Contains(string(out), "--- PASS: "+t.Name()):
		t.Fatal("test in namespace did not pass")
	}
	return false
}

const tcpEstablished = 1

// statsDelta is how much each answer counter moved.
type statsDelta struct{ Map, Proc, Miss, Stale uint64 }

func delta(before, after Stats) statsDelta {
	return statsDelta{after.MapAnswers - before.MapAnswers, after.ProcAnswers - before.ProcAnswers, after.MapMisses - before.MapMisses, after.MapStale - before.MapStale}
}

var (
	byMap       = statsDelta{Map: 1}
	byProcMiss  = statsDelta{Proc: 1, Miss: 1}
	byProcStale = statsDelta{Proc: 1, Stale: 1}
)

// TestEBPFAttributionInNetns runs a child that opens TCP and UDP sockets in a fresh network namespace, and
// checks every lookup gives the right process and is answered by the path expected: the map for sockets opened
// by a process after the resolver started, /proc for sockets older than it and for sockets the kernel created
// (accepted connections).
func TestEBPFAttributionInNetns(t *testing.T) {
	if !runInNetns(t) {
		return
	}
	// Older than the resolver: the programs never saw it.
	old, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer old.Close()
	r := newEBPFResolver(t)
	if r.Stats() != (Stats{EBPF: true, TupleMap: r.bpf.hasTuples(), SocketStorage: r.bpf.mode == modeStorage, Mirror: r.mirror != nil}) {
		t.Fatalf("fresh resolver stats %+v", r.Stats())
	}

	bin := childBinary(t)
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	lo := netip.MustParseAddr("127.0.0.1")
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	parentUDP, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer parentUDP.Close()
	lnAddr := ln.Addr().(*net.TCPAddr).AddrPort()
	udpAddr := parentUDP.LocalAddr().(*net.UDPAddr).AddrPort()
	cmd, a, _ := startSocketChild(t, bin, "4", lnAddr, udpAddr)
	accepted, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer accepted.Close()
	toChild, err := net.Dial("tcp4", a.TCPListen.String())
	if err != nil {
		t.Fatal(err)
	}
	defer toChild.Close()
	toChildLocal := toChild.LocalAddr().(*net.TCPAddr).AddrPort()
	// Until the child's side has seen our ACK it is a request socket, which the resolver answers for through
	// the listener (in the map); wait, bounded, for the established socket the kernel created at accept.
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(time.Millisecond) {
		s, err := r.find(backend.TCP, backend.Inbound, a.TCPListen, toChildLocal, 0)
		if err == nil && s.state == tcpEstablished {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the child's side of our connection is not established: %+v, %v", s, err)
		}
	}

	// An MPTCP listener appears in sock_diag as its in-kernel TCP subflow. No map program saw it being created:
	// /proc answers for it there. The storage programs report its bind, which the listener's bind makes in the
	// application's context. Go makes one by default where the kernel allows.
	dualPath := byMap
	if defaultListenerIsMPTCP(t) && r.bpf.mode != modeStorage {
		dualPath = byProcMiss
	}

	child := backend.Process{PID: int32(cmd.Process.Pid), Path: bin, UID: nobodyUID}
	parent := backend.Process{PID: int32(os.Getpid()), Path: self, UID: int32(os.Getuid())}
	stranger := netip.AddrPortFrom(lo, 9)
	tests := []struct {
		name string
		info backend.Info
		want backend.Process
		path statsDelta
	}{
		{"child tcp outbound", backend.Info{Protocol: backend.TCP, Direction: backend.Outbound, Local: a.TCPClient, Remote: lnAddr}, child, byMap},
		{"child tcp listener (syn)", backend.Info{Protocol: backend.TCP, Direction: backend.Inbound, Local: a.TCPListen, Remote: stranger}, child, byMap},
		{"child tcp accepted", backend.Info{Protocol: backend.TCP, Direction: backend.Inbound, Local: a.TCPListen, Remote: toChildLocal}, child, byProcMiss},
		{"child tcp wildcard listener", backend.Info{Protocol: backend.TCP, Direction: backend.Inbound, Local: a.TCPDualListen, Remote: stranger}, child, dualPath},
		{"child udp unconnected", backend.Info{Protocol: backend.UDP, Direction: backend.Outbound, Local: a.UDPUnconn, Remote: stranger}, child, byMap},
		{"child udp wildcard", backend.Info{Protocol: backend.UDP, Direction: backend.Outbound, Local: a.UDPWildcard, Remote: stranger}, child, byMap},
		{"child udp connected", backend.Info{Protocol: backend.UDP, Direction: backend.Outbound, Local: a.UDPConn, Remote: udpAddr}, child, byMap},
		{"parent tcp accepted", backend.Info{Protocol: backend.TCP, Direction: backend.Inbound, Local: lnAddr, Remote: a.TCPClient}, parent, byProcMiss},
		{"parent tcp outbound", backend.Info{Protocol: backend.TCP, Direction: backend.Outbound, Local: toChildLocal, Remote: a.TCPListen}, parent, byMap},
		{"parent udp inbound", backend.Info{Protocol: backend.UDP, Direction: backend.Inbound, Local: udpAddr, Remote: a.UDPConn}, parent, byMap},
		{"parent udp older than the resolver", backend.Info{Protocol: backend.UDP, Direction: backend.Outbound, Local: old.LocalAddr().(*net.UDPAddr).AddrPort(), Remote: stranger}, parent, byProcMiss},
	}
	for _, tt := range tests {
		tt.info.UID = tt.want.UID // the socket's UID, as the queue reports it with the packet
		before := r.Stats()
		got, ok := r.ResolveProcess(&tt.info)
		if !ok {
			t.Errorf("%s (%v): not found", tt.name, &tt.info)
			continue
		}
		if diff := cmp.Diff(tt.want, got); diff != "" {
			t.Errorf("%s (%v): -want +got\n%s", tt.name, &tt.info, diff)
		}
		if diff := cmp.Diff(tt.path, delta(before, r.Stats())); diff != "" {
			t.Errorf("%s: answer counters moved -want +got\n%s", tt.name, diff)
		}
	}

	// The programs only observe: a connection to a closed port is still refused by the peer, not denied by
	// the hook (EPERM).
	free, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	closedPort := free.LocalAddr().(*net.UDPAddr).Port
	free.Close()
	if _, err := net.Dial("tcp4", fmt.Sprintf("127.0.0.1:%d", closedPort)); !errors.Is(err, unix.ECONNREFUSED) {
		t.Errorf("dial to a closed port: %v, want connection refused", err)
	}
	if _, err := parentUDP.WriteToUDPAddrPort([]byte("x"), stranger); err != nil {
		t.Errorf("sendmsg with the hooks attached: %v", err)
	}
}

// defaultListenerIsMPTCP reports whether net.Listen makes MPTCP sockets here.
func defaultListenerIsMPTCP(t *testing.T) bool {
	ln, err := net.Listen("tcp", ":0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	raw, err := ln.(*net.TCPListener).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var proto int
	var serr error
	if err := raw.Control(func(fd uintptr) { proto, serr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PROTOCOL) }); err != nil {
		t.Fatal(err)
	}
	if serr != nil {
		t.Fatal(serr)
	}
	return proto == unix.IPPROTO_MPTCP
}

// TestEBPFSocketOutlivesCreator hands a TCP connection and a UDP socket from a process to its child and lets
// the creator exit: the connection, whose map entry still names the dead creator, is found through /proc in
// the child; the UDP socket, which the child sent from, is found in the map under the child.
func TestEBPFSocketOutlivesCreator(t *testing.T) {
	r := newEBPFResolver(t)
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	sink, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer sink.Close()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(self, "-test.run=^$")
	cmd.Env = append(os.Environ(), forkerEnv+"="+ln.Addr().String()+","+sink.LocalAddr().String())
	cmd.Stderr = os.Stderr
	// Not cmd.StdinPipe: Wait would close it when the forker exits, and the holder exits at EOF.
	stdinR, stdinW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer stdinW.Close()
	cmd.Stdin = stdinR
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	err = cmd.Start()
	stdinR.Close()
	if err != nil {
		t.Fatal(err)
	}
	lines := make(chan string, 4)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()
	var rep forkerReport
	ready := false
	deadline := time.After(childStartWait)
	for rep.Holder == 0 || !ready {
		select {
		case l, ok := <-lines:
			if !ok {
				t.Fatal("forker and holder stopped before reporting")
			}
			if l == "ready" {
				ready = true
			} else if err := json.Unmarshal([]byte(l), &rep); err != nil {
				t.Fatalf("forker said %q: %v", l, err)
			}
		case <-deadline:
			t.Fatal("forker or holder did not report in time")
		}
	}
	t.Cleanup(func() { syscall.Kill(rep.Holder, syscall.SIGKILL) })
	if err := cmd.Wait(); err != nil {
		t.Fatalf("forker: %v", err)
	}
	accepted, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer accepted.Close()

	holder := backend.Process{PID: int32(rep.Holder), Path: self, UID: int32(os.Getuid())}
	tests := []struct {
		name string
		info backend.Info
		path statsDelta
	}{
		{"tcp connected by the dead creator", backend.Info{Protocol: backend.TCP, Direction: backend.Outbound, Local: rep.TCP, Remote: ln.Addr().(*net.TCPAddr).AddrPort()}, byProcStale},
		{"udp sent from by the holder", backend.Info{Protocol: backend.UDP, Direction: backend.Outbound, Local: rep.UDP, Remote: sink.LocalAddr().(*net.UDPAddr).AddrPort()}, byMap},
	}
	for _, tt := range tests {
		tt.info.UID = holder.UID // the socket's UID, as the queue reports it with the packet
		before := r.Stats()
		got, ok := r.ResolveProcess(&tt.info)
		if !ok {
			t.Errorf("%s (%v): not found", tt.name, &tt.info)
			continue
		}
		if diff := cmp.Diff(holder, got); diff != "" {
			t.Errorf("%s (%v): -want +got\n%s", tt.name, &tt.info, diff)
		}
		if diff := cmp.Diff(tt.path, delta(before, r.Stats())); diff != "" {
			t.Errorf("%s: answer counters moved -want +got\n%s", tt.name, diff)
		}
	}
}

// attachedPrograms returns the IDs of the programs attached to the cgroup v2 root for each of the hooks.
func attachedPrograms(t *testing.T) []ebpf.ProgramID {
	t.Helper()
	var ids []ebpf.ProgramID
	err := bpfkit.InCgroupRoot(func(dir string) error {
		f, err := os.Open(dir)
		if err != nil {
			return err
		}
		defer f.Close()
		var points []ebpf.AttachType
		for _, h := range slices.Concat(bpfHooks, []bpfHook{tupleHook}, storageHooks) {
			if !slices.Contains(points, h.attach) {
				points = append(points, h.attach)
			}
		}
		for _, at := range points {
			res, err := link.QueryPrograms(link.QueryOptions{Target: int(f.Fd()), Attach: at})
			if err != nil {
				return fmt.Errorf("querying %v: %w", at, err)
			}
			for _, p := range res.Programs {
				ids = append(ids, p.ID)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return ids
}

// checkAttached fails unless every one of ids is attached (want) or none is (!want).
func checkAttached(t *testing.T, ids []ebpf.ProgramID, want bool) {
	t.Helper()
	// The map programs, with the tuple map's on top where the kernel runs it, or the storage programs.
	if counts := []int{len(bpfHooks), len(bpfHooks) + 1, len(storageHooks)}; !slices.Contains(counts, len(ids)) {
		t.Fatalf("%d program IDs, want one of %v", len(ids), counts)
	}
	attached := attachedPrograms(t)
	for _, id := range ids {
		if got := slices.Contains(attached, id); got != want {
			t.Errorf("program %d attached = %v, want %v", id, got, want)
		}
	}
}

// TestEBPFCloseDetaches checks the programs are attached to the cgroup root while the resolver runs and gone
// once it is closed.
func TestEBPFCloseDetaches(t *testing.T) {
	r := newEBPFResolver(t)
	ids := progIDs(r.bpf)
	checkAttached(t, ids, true)
	r.Close()
	checkAttached(t, ids, false)
	if r.bpf.fd != -1 {
		t.Error("map still open after Close")
	}
}

// TestEBPFKillDetaches checks that a daemon killed with SIGKILL leaves no program behind: they are held by its
// file descriptors only.
func TestEBPFKillDetaches(t *testing.T) {
	netnstest.RequireRoot(t)
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(self, "-test.run=^$")
	cmd.Env = append(os.Environ(), bpfHolderEnv+"=1")
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	defer stdin.Close()
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	rep := readReport[bpfHolderReport](t, stdout, "holder")
	switch {
	case rep.Unavailable:
		t.Skipf("eBPF socket owner map unavailable here: %s", rep.Err)
	case rep.Err != "":
		t.Fatalf("eBPF socket owner map failed to load in the holder: %s", rep.Err)
	}
	checkAttached(t, rep.Progs, true)
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	// The kernel closes a dying process's descriptors before its parent can reap it.
	if err := cmd.Wait(); err == nil {
		t.Fatal("holder exited cleanly, want killed")
	}
	checkAttached(t, rep.Progs, false)
}

// TestMapLookupDoesNotAllocate checks the map read on the hot path allocates nothing, and that the kernel's
// entry for our own socket decodes to our PID.
func TestMapLookupDoesNotAllocate(t *testing.T) {
	r := newEBPFResolver(t)
	u, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	s, err := r.find(backend.UDP, backend.Outbound, u.LocalAddr().(*net.UDPAddr).AddrPort(), netip.MustParseAddrPort("127.0.0.1:9"), 0)
	if err != nil {
		t.Fatal(err)
	}
	e, ok := r.bpf.lookup(s.cookie)
	if !ok {
		t.Fatalf("no map entry for cookie %#x", s.cookie)
	}
	if e.tgid != int32(os.Getpid()) {
		t.Errorf("map says tgid %d, want %d", e.tgid, os.Getpid())
	}
	// Go names no thread, so the creating thread's name is the process's.
	stat, err := os.ReadFile("/proc/self/stat")
	if err != nil {
		t.Fatal(err)
	}
	comm, _, ok := parseStat(stat)
	if !ok {
		t.Fatalf("unparsable /proc/self/stat %q", stat)
	}
	if got := string(e.commBytes()); got != string(comm) {
		t.Errorf("map says comm %q, want %q", got, comm)
	}
	var now unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_BOOTTIME, &now); err != nil {
		t.Fatal(err)
	}
	if e.seenNs == 0 || e.seenNs > uint64(now.Nano()) {
		t.Errorf("map entry time %d, want in (0, %d]", e.seenNs, now.Nano())
	}
	if a := testing.AllocsPerRun(1000, func() { r.bpf.lookup(s.cookie) }); a != 0 {
		t.Errorf("map lookup allocates %v times", a)
	}
	// The socket's release deletes its entry.
	u.Close()
	if _, ok := r.bpf.lookup(s.cookie); ok {
		t.Error("map entry survived the socket's close")
	}
}

// BenchmarkResolve measures the lookup of a socket created just before it, as for a new connection's first
// packet, answered by the eBPF map or by /proc. The /proc path looks through the descriptors of the socket's
// process, so it is measured with few and with many other descriptors open.
func BenchmarkResolve(b *testing.B) {
	for _, bc := range []struct {
		name   string
		useMap bool
		extra  int
		send   bool // the socket sends to the remote first: an outbound UDP flow the tuple map knows
	}{
		{"tuple", true, 0, true},
		{"map", true, 0, false},
		{"map/256fds", true, 256, false},
		{"proc", false, 0, false},
		{"proc/256fds", false, 256, false},
	} {
		b.Run(bc.name, func(b *testing.B) {
			netnstest.RequireRoot(b)
			for range bc.extra {
				fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
				if err != nil {
					b.Fatal(err)
				}
				b.Cleanup(func() { unix.Close(fd) })
			}
			r, err := NewWithOptions(nil, Options{DisableEBPF: !bc.useMap})
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { r.Close() })
			if bc.useMap {
				requireBPF(b, r)
			}
			r.tupleTTL = 0
			remote := netip.MustParseAddrPort("127.0.0.1:9")
			b.ReportAllocs()
			for i := 0; i < b.N; i++ {
				b.StopTimer()
				fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
				if err != nil {
					b.Fatal(err)
				}
				if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
					b.Fatal(err)
				}
				sa, err := unix.Getsockname(fd)
				if err != nil {
					b.Fatal(err)
				}
				if bc.send {
					if err := unix.Sendto(fd, []byte("x"), 0, &unix.SockaddrInet4{Addr: remote.Addr().As4(), Port: int(remote.Port())}); err != nil {
						b.Fatal(err)
					}
				}
				info := backend.Info{Protocol: backend.UDP, Direction: backend.Outbound, Local: netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), uint16(sa.(*unix.SockaddrInet4).Port)), Remote: remote, UID: int32(os.Getuid())}
				if !bc.send {
					info.UID = backend.Unknown // the queue did not say: sock_diag is asked, as before the tuple map
				}
				b.StartTimer()
				_, ok := r.ResolveProcess(&info)
				b.StopTimer()
				unix.Close(fd)
				if !ok {
					b.Fatal("not found")
				}
				b.StartTimer()
			}
			st := r.Stats()
			answered := st.ProcAnswers
			if bc.useMap {
				answered = st.MapAnswers
			}
			if bc.send {
				answered = st.TupleAnswers
			}
			if answered != uint64(b.N) {
				b.Fatalf("%d of %d lookups answered by the path measured: %+v", answered, b.N, st)
			}
			// All but the first map answer (which makes the process's record) need no /proc read.
			b.ReportMetric(float64(st.MapFast)/float64(b.N), "fast/op")
		})
	}
}

// BenchmarkSocketLifecycle measures what the attribution programs add to an application's own system calls:
// a UDP flow (socket, bind, sendto, close) and a TCP connection (socket, connect, close, with the loopback
// server accepting and closing), without the programs, with the hash map programs and with the socket storage
// programs attached. The difference is paid by every application on the host, not by Warden.
func BenchmarkSocketLifecycle(b *testing.B) {
	lo := [4]byte{127, 0, 0, 1}
	udpFlow := func(b *testing.B, dst *unix.SockaddrInet4) {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			b.Fatal(err)
		}
		if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: lo}); err != nil {
			b.Fatal(err)
		}
		if err := unix.Sendto(fd, []byte("x"), 0, dst); err != nil {
			b.Fatal(err)
		}
		unix.Close(fd)
	}
	tcpConn := func(b *testing.B, dst *unix.SockaddrInet4) {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			b.Fatal(err)
		}
		if err := unix.Connect(fd, dst); err != nil {
			b.Fatal(err)
		}
		// An RST instead of a FIN: no TIME_WAIT, so a long run never runs out of ports.
		_ = unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1})
		unix.Close(fd)
	}
	for _, proto := range []string{"udp", "tcp"} {
		for _, programs := range []string{"without", "hash-maps", "socket-storage"} {
			b.Run(proto+"/"+programs, func(b *testing.B) {
				netnstest.RequireRoot(b)
				var lifecycleR *Resolver
				if programs != "without" {
					r, err := NewWithOptions(nil, Options{DisableSocketStorage: programs == "hash-maps"})
					if err != nil {
						b.Fatal(err)
					}
					b.Cleanup(func() { r.Close() })
					requireBPF(b, r)
					if got, want := r.Stats().SocketStorage, programs == "socket-storage"; got != want {
						b.Fatalf("socket storage programs: %v, want %v", got, want)
					}
					lifecycleR = r
				}
				var dst unix.SockaddrInet4
				op := udpFlow
				if proto == "udp" {
					// A bound receiver, so that the sends are not answered with ICMP port unreachable.
					rx, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IP(lo[:])})
					if err != nil {
						b.Fatal(err)
					}
					b.Cleanup(func() { rx.Close() })
					dst = unix.SockaddrInet4{Addr: lo, Port: rx.LocalAddr().(*net.UDPAddr).Port}
					go func() {
						buf := make([]byte, 64)
						for {
							if _, _, err := rx.ReadFromUDP(buf); err != nil {
								return
							}
						}
					}()
				} else {
					op = tcpConn
					ln, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IP(lo[:])})
					if err != nil {
						b.Fatal(err)
					}
					b.Cleanup(func() { ln.Close() })
					dst = unix.SockaddrInet4{Addr: lo, Port: ln.Addr().(*net.TCPAddr).Port}
					go func() {
						for {
							c, err := ln.Accept()
							if err != nil {
								return
							}
							c.Close()
						}
					}()
				}
				var r0 time.Duration
				var progs []*ebpf.Program
				if programs != "without" {
					// The kernel's BPF run-time statistics: the programs' own CPU time per operation, which the
					// wall time per operation shows only through the noise of the system calls around them.
					stats, err := ebpf.EnableStats(unix.BPF_STATS_RUN_TIME)
					if err != nil {
						b.Fatalf("BPF run-time statistics: %v", err)
					}
					defer stats.Close()
					progs = lifecycleR.bpf.progs
					r0 = progRuntime(b, progs)
				}
				for b.Loop() {
					op(b, &dst)
				}
				if progs != nil {
					b.ReportMetric(float64((progRuntime(b, progs)-r0).Nanoseconds())/float64(b.N), "bpf-ns/op")
				}
			})
		}
	}
}

// TestProgramsSkipOtherNamespaces checks that sockets created and used in another network namespace leave no
// entry in the owner map (the resolver could not find them through sock_diag anyway), while the same sockets in
// the resolver's namespace do.
func TestProgramsSkipOtherNamespaces(t *testing.T) {
	if !runInNetns(t) {
		return
	}
	r := newTupleResolver(t)
	other := "warden-proc-other-" + netnstest.Suffix()
	netnstest.NewNS(t, other)
	var foreign []uint64
	var ferr error
	netnstest.InNS(t, other, func() { foreign, ferr = openLoopbackSockets(t) })
	if ferr != nil {
		t.Fatalf("sockets in namespace %s: %v", other, ferr)
	}
	own, err := openLoopbackSockets(t)
	if err != nil {
		t.Fatal(err)
	}
	for i, c := range own {
		if _, ok := r.bpf.lookup(c); !ok {
			t.Errorf("socket %d of the resolver's namespace (cookie %d) is not in the owner map", i, c)
		}
	}
	for i, c := range foreign {
		if _, ok := r.bpf.lookup(c); ok {
			t.Errorf("socket %d of namespace %s (cookie %d) is in the owner map", i, other, c)
		}
	}
}

// openLoopbackSockets opens, in the calling thread's network namespace, a UDP socket that sends to loopback and
// a TCP socket connected to a loopback listener, and returns the cookies of all three; they are closed when
// the test ends. It makes only system calls, so it may run on a thread moved into another namespace.
func openLoopbackSockets(t *testing.T) ([]uint64, error) {
	lo := [4]byte{127, 0, 0, 1}
	var fds []int
	t.Cleanup(func() {
		for _, fd := range fds {
			unix.Close(fd)
		}
	})
	open := func(typ int) (int, error) {
		fd, err := unix.Socket(unix.AF_INET, typ|unix.SOCK_CLOEXEC, 0)
		if err == nil {
			fds = append(fds, fd)
		}
		return fd, err
	}
	udp, err := open(unix.SOCK_DGRAM)
	if err != nil {
		return nil, err
	}
	if err := unix.Sendto(udp, []byte("x"), 0, &unix.SockaddrInet4{Addr: lo, Port: 9}); err != nil {
		return nil, fmt.Errorf("udp send: %w", err)
	}
	ln, err := open(unix.SOCK_STREAM)
	if err != nil {
		return nil, err
	}
	if err := unix.Bind(ln, &unix.SockaddrInet4{Addr: lo}); err != nil {
		return nil, err
	}
	if err := unix.Listen(ln, 1); err != nil {
		return nil, err
	}
	sa, err := unix.Getsockname(ln)
	if err != nil {
		return nil, err
	}
	conn, err := open(unix.SOCK_STREAM)
	if err != nil {
		return nil, err
	}
	if err := unix.Connect(conn, sa); err != nil {
		return nil, fmt.Errorf("tcp connect: %w", err)
	}
	var cookies []uint64
	for _, fd := range fds {
		c, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_COOKIE)
		if err != nil {
			return nil, err
		}
		cookies = append(cookies, c)
	}
	return cookies, nil
}

// progRuntime sums the run time the kernel's statistics hold for progs.
func progRuntime(tb testing.TB, progs []*ebpf.Program) time.Duration {
	tb.Helper()
	var total time.Duration
	for _, p := range progs {
		st, err := p.Stats()
		if err != nil {
			tb.Fatal(err)
		}
		total += st.Runtime
	}
	return total
}
