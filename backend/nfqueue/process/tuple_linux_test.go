package process

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf/asm"
	"github.com/google/go-cmp/cmp"
	"golang.org/x/sys/unix"

	"github.com/warden-fw/warden/backend"
	"github.com/warden-fw/warden/backend/netnstest"
)

// Helper processes of the tuple map tests (see runTupleHelper).
const (
	// tupleHelperEnv selects the helper: "conns", "closer", "sharer" or "joinable".
	tupleHelperEnv = "WARDEN_PROCESS_TEST_TUPLE_HELPER"
	// tupleArgsEnv holds the helper's tupleArgs as JSON.
	tupleArgsEnv = "WARDEN_PROCESS_TEST_TUPLE_ARGS"
)

// tupleArgs tells a tuple helper what to do.
type tupleArgs struct {
	Fam            string         // "4" or "6" (conns)
	TCPPeer        netip.AddrPort // conns: dial; closer: dial when Proto is "tcp"
	UDPPeer        netip.AddrPort // conns: send to; closer: send to when Proto is "udp"
	Proto          string         // closer: "tcp" or "udp"
	Port           uint16         // sharer: the port to share
	Opt            int            // sharer, joinable: the socket option to set (SO_REUSEPORT, SO_REUSEADDR), 0 for none
	Addr1, Addr2   netip.Addr     // sharer: the local addresses of the two sockets
	Peer1, Peer2   netip.AddrPort // sharer: send to Peer1 unconnected, and to Peer2 from a connected socket; joinable: Peer1
	DualStackPeer4 bool           // conns: also send to UDPPeer and connect to TCPPeer (IPv4) from IPv6 sockets
}

// tupleReport is what a tuple helper prints (one JSON line per step).
type tupleReport struct {
	TCP, UDP, UDPConn, UDPDual netip.AddrPort // conns: the local ends
	TCPMapped                  netip.AddrPort // conns: an IPv6 socket's connection to the IPv4 peer
	Port                       uint16         // closer: the socket's port
	Closed                     bool           // closer: the socket is closed
	Ready                      bool           // sharer: both sockets have sent
}

// runTupleHelper runs the tuple helper the environment asks for, if any, and reports whether it did.
func runTupleHelper() (bool, error) {
	mode := os.Getenv(tupleHelperEnv)
	if mode == "" {
		return false, nil
	}
	var a tupleArgs
	if err := json.Unmarshal([]byte(os.Getenv(tupleArgsEnv)), &a); err != nil {
		return true, err
	}
	switch mode {
	case "conns":
		return true, runTupleConns(a)
	case "closer":
		return true, runTupleCloser(a)
	case "sharer":
		return true, runTupleSharer(a)
	case "joinable":
		return true, runTupleJoinable(a)
	}
	return true, fmt.Errorf("unknown tuple helper %q", mode)
}

// runTupleConns opens a TCP connection, sends from an unconnected UDP socket and from a connected one (and from
// a dual-stack socket to an IPv4 peer), reports their local ends and holds them until stdin closes.
func runTupleConns(a tupleArgs) error {
	tcpNet, udpNet, lo := "tcp4", "udp4", "127.0.0.1"
	if a.Fam == "6" {
		tcpNet, udpNet, lo = "tcp6", "udp6", "::1"
	}
	var rep tupleReport
	c, err := net.Dial(tcpNet, a.TCPPeer.String())
	if err != nil {
		return err
	}
	rep.TCP = c.LocalAddr().(*net.TCPAddr).AddrPort()
	u, err := net.ListenUDP(udpNet, &net.UDPAddr{IP: net.ParseIP(lo)})
	if err != nil {
		return err
	}
	if _, err := u.WriteToUDPAddrPort([]byte("u"), a.UDPPeer); err != nil {
		return err
	}
	rep.UDP = u.LocalAddr().(*net.UDPAddr).AddrPort()
	uc, err := net.Dial(udpNet, a.UDPPeer.String())
	if err != nil {
		return err
	}
	if _, err := uc.Write([]byte("c")); err != nil {
		return err
	}
	rep.UDPConn = uc.LocalAddr().(*net.UDPAddr).AddrPort()
	held := []any{c, u, uc}
	if a.DualStackPeer4 {
		ud, err := net.ListenUDP("udp", &net.UDPAddr{}) // [::]:port, dual-stack
		if err != nil {
			return err
		}
		if _, err := ud.WriteToUDPAddrPort([]byte("d"), a.UDPPeer); err != nil {
			return err
		}
		rep.UDPDual = netip.AddrPortFrom(netip.MustParseAddr(lo), uint16(ud.LocalAddr().(*net.UDPAddr).Port))
		held = append(held, ud)
		// Go dials an IPv4 peer from an IPv4 socket; an IPv6 one connects to ::ffff:a.b.c.d.
		fd, err := unix.Socket(unix.AF_INET6, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return err
		}
		if err := unix.Connect(fd, &unix.SockaddrInet6{Port: int(a.TCPPeer.Port()), Addr: a.TCPPeer.Addr().As16()}); err != nil {
			return err
		}
		sa, err := unix.Getsockname(fd)
		if err != nil {
			return err
		}
		sa6 := sa.(*unix.SockaddrInet6)
		rep.TCPMapped = netip.AddrPortFrom(netip.AddrFrom16(sa6.Addr).Unmap(), uint16(sa6.Port))
	}
	if err := json.NewEncoder(os.Stdout).Encode(rep); err != nil {
		return err
	}
	_, _ = io.Copy(io.Discard, os.Stdin)
	_ = held
	return nil
}

// runTupleCloser makes one socket (a TCP connection, or a UDP socket that sends once), reports its port, closes
// it on a line from stdin (a TCP connection with a reset, so its port is free at once), reports that, and
// lives on until stdin closes: its PID stays valid while its socket is gone.
func runTupleCloser(a tupleArgs) error {
	var closeFn func() error
	var port uint16
	switch a.Proto {
	case "tcp":
		c, err := net.Dial("tcp4", a.TCPPeer.String())
		if err != nil {
			return err
		}
		if err := c.(*net.TCPConn).SetLinger(0); err != nil {
			return err
		}
		port, closeFn = c.LocalAddr().(*net.TCPAddr).AddrPort().Port(), c.Close
	case "udp":
		u, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			return err
		}
		if _, err := u.WriteToUDPAddrPort([]byte("x"), a.UDPPeer); err != nil {
			return err
		}
		port, closeFn = u.LocalAddr().(*net.UDPAddr).AddrPort().Port(), u.Close
	default:
		return fmt.Errorf("bad proto %q", a.Proto)
	}
	enc := json.NewEncoder(os.Stdout)
	if err := enc.Encode(tupleReport{Port: port}); err != nil {
		return err
	}
	in := bufio.NewReader(os.Stdin)
	if _, err := in.ReadString('\n'); err != nil {
		return err
	}
	if err := closeFn(); err != nil {
		return err
	}
	if err := enc.Encode(tupleReport{Closed: true}); err != nil {
		return err
	}
	_, _ = io.Copy(io.Discard, in)
	return nil
}

// withOpt returns a Control function setting the socket option opt (SOL_SOCKET) before bind; none for 0.
func withOpt(opt int) func(_, _ string, c syscall.RawConn) error {
	if opt == 0 {
		return nil
	}
	return func(_, _ string, c syscall.RawConn) error {
		var serr error
		if err := c.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, opt, 1) }); err != nil {
			return err
		}
		return serr
	}
}

// runTupleSharer binds two UDP sockets to a port another process holds (with option Opt, or on other local
// addresses): the first, on Addr1, sends to Peer1 unconnected; the second, on Addr2, connects to Peer2 and
// sends. It reports and holds them until stdin closes.
func runTupleSharer(a tupleArgs) error {
	lc := net.ListenConfig{Control: withOpt(a.Opt)}
	pc, err := lc.ListenPacket(context.Background(), "udp4", netip.AddrPortFrom(a.Addr1, a.Port).String())
	if err != nil {
		return err
	}
	if _, err := pc.(*net.UDPConn).WriteToUDPAddrPort([]byte("1"), a.Peer1); err != nil {
		return err
	}
	d := net.Dialer{LocalAddr: net.UDPAddrFromAddrPort(netip.AddrPortFrom(a.Addr2, a.Port)), Control: withOpt(a.Opt)}
	uc, err := d.Dial("udp4", a.Peer2.String())
	if err != nil {
		return err
	}
	if _, err := uc.Write([]byte("2")); err != nil {
		return err
	}
	if err := json.NewEncoder(os.Stdout).Encode(tupleReport{Ready: true}); err != nil {
		return err
	}
	_, _ = io.Copy(io.Discard, os.Stdin)
	_ = []any{pc, uc}
	return nil
}

// runTupleJoinable connects a UDP socket with option Opt (if any), unbound, to Peer1 (autobind gives it a port
// no other socket holds, and the connect its local address) and sends; it reports the port and holds the socket
// until stdin closes. Another socket may then bind the same port: with SO_REUSEADDR on both, or on another
// local address.
func runTupleJoinable(a tupleArgs) error {
	d := net.Dialer{Control: withOpt(a.Opt)}
	uc, err := d.Dial("udp4", a.Peer1.String())
	if err != nil {
		return err
	}
	if _, err := uc.Write([]byte("j")); err != nil {
		return err
	}
	if err := json.NewEncoder(os.Stdout).Encode(tupleReport{Port: uc.LocalAddr().(*net.UDPAddr).AddrPort().Port()}); err != nil {
		return err
	}
	_, _ = io.Copy(io.Discard, os.Stdin)
	_ = uc
	return nil
}

// tupleHelper is a running tuple helper.
type tupleHelper struct {
	cmd     *exec.Cmd
	stdin   io.WriteCloser
	reports chan tupleReport
}

// startTupleHelper runs a tuple helper, killed when the test ends.
func startTupleHelper(t *testing.T, mode string, a tupleArgs) *tupleHelper {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	args, err := json.Marshal(a)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(self, "-test.run=^$")
	cmd.Env = append(envWithout(inNetnsEnv), tupleHelperEnv+"="+mode, tupleArgsEnv+"="+string(args))
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	cmd.Stderr = os.Stderr
	h := &tupleHelper{cmd: cmd, reports: make(chan tupleReport, 4)}
	if h.stdin, err = cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.stdin.Close(); cmd.Process.Kill(); cmd.Wait() })
	go func() {
		dec := json.NewDecoder(stdout)
		for {
			var rep tupleReport
			if dec.Decode(&rep) != nil {
				close(h.reports)
				return
			}
			h.reports <- rep
		}
	}()
	return h
}

// next returns the helper's next report, failing the test when it exits or takes too long.
func (h *tupleHelper) next(t *testing.T) tupleReport {
	t.Helper()
	select {
	case rep, ok := <-h.reports:
		if !ok {
			t.Fatal("tuple helper exited without reporting")
		}
		return rep
	case <-time.After(childStartWait):
		t.Fatal("tuple helper did not report in time")
	}
	panic("unreachable")
}

// newTupleResolver returns a resolver with the tuple map active and its 5-tuple cache off, so every lookup
// takes the path measured. It fails when the kernel should run the tuple programs and does not.
// thisProcess is the test process as the resolver reports it.
func thisProcess(t *testing.T) *backend.Process {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	return &backend.Process{PID: int32(os.Getpid()), Path: self, UID: int32(os.Getuid())}
}

func newTupleResolver(t *testing.T) *Resolver {
	t.Helper()
	r := newEBPFResolver(t)
	if !r.Stats().TupleMap {
		t.Fatalf("eBPF connection tuple map not loaded: %v", r.tupleErr)
	}
	// The default programs keep their records in socket storage; the kernels these tests run on have it, so
	// falling back to the hash maps would be a bug here.
	if want := !testOptions.DisableMirror && !testOptions.DisableSocketStorage; r.Stats().SocketStorage != want {
		t.Fatalf("socket storage programs loaded: %v, want %v", r.Stats().SocketStorage, want)
	}
	r.tupleTTL = 0
	return r
}

// TestHashMapPrograms runs the attribution tests against the hash map programs, which keep the owner and tuple
// maps in the kernel and are what a kernel without socket storage for these programs gets
// (Options.DisableSocketStorage: the mirror mirrors the maps). The tests themselves run against the default
// socket storage programs.
func TestHashMapPrograms(t *testing.T) {
	for _, test := range []struct {
		name string
		run  func(*testing.T)
	}{
		{"AttributionInNetns", TestEBPFAttributionInNetns},
		{"SocketOutlivesCreator", TestEBPFSocketOutlivesCreator},
		{"TupleMapAnswersOutbound", TestTupleMapAnswersOutbound},
		{"TupleClosedSocketPortReused", TestTupleClosedSocketPortReused},
		{"TupleSharedPort", TestTupleSharedPort},
		{"ProgramsSkipOtherNamespaces", TestProgramsSkipOtherNamespaces},
		{"MirrorLostEvents", TestMirrorLostEvents},
	} {
		t.Run(test.name, func(t *testing.T) {
			defer func(o Options) { testOptions = o }(testOptions)
			testOptions = Options{DisableSocketStorage: true}
			test.run(t)
		})
	}
}

// tuplePath is how a lookup was answered.
type tuplePath struct {
	Tuple, Diag, Map uint64
}

var (
	byTuple     = tuplePath{Tuple: 1, Map: 1}
	byDiagMap   = tuplePath{Diag: 1, Map: 1}
	byDiagOther = tuplePath{Diag: 1}
)

func tupleDelta(before, after Stats) tuplePath {
	return tuplePath{after.TupleAnswers - before.TupleAnswers, after.DiagLookups - before.DiagLookups, after.MapAnswers - before.MapAnswers}
}

// checkTupleLookup resolves info and compares the answer (nil: none) and the path taken with the wanted ones.
func checkTupleLookup(t *testing.T, r *Resolver, name string, info backend.Info, want *backend.Process, path tuplePath) {
	t.Helper()
	before := r.Stats()
	got, ok := r.ResolveProcess(&info)
	switch {
	case want == nil && ok:
		t.Errorf("%s (%v): answered %+v, want no answer", name, &info, got)
	case want != nil && !ok:
		t.Errorf("%s (%v): not found", name, &info)
	case want != nil:
		if diff := cmp.Diff(*want, got); diff != "" {
			t.Errorf("%s (%v): -want +got\n%s", name, &info, diff)
		}
	}
	after := r.Stats()
	if diff := cmp.Diff(path, tupleDelta(before, after)); diff != "" {
		t.Errorf("%s: answer path -want +got\n%s", name, diff)
	}
	if path == byTuple && r.mirror != nil && after.MirrorAnswers != before.MirrorAnswers+1 {
		t.Errorf("%s: answered from the tuple map, but not from its mirror (mirror answers %d -> %d)", name, before.MirrorAnswers, after.MirrorAnswers)
	}
	// The immediate lookup (the packet's goroutine) answers exactly what the tuple map answered, now that the
	// process's record is known, and leaves everything else to ResolveProcess.
	now, ok := r.ResolveProcessNow(&info)
	switch {
	case path == byTuple && !ok:
		t.Errorf("%s: the tuple map answered, the immediate lookup did not", name)
	case path == byTuple && now != got:
		t.Errorf("%s: immediate lookup %+v, ResolveProcess %+v", name, now, got)
	case path != byTuple && ok:
		t.Errorf("%s: immediate lookup answered %+v without the tuple map", name, now)
	}
}

// TestCmpXchgEncoding checks the compare-and-exchange the tuple programs use is encoded as one (imm
// BPF_CMPXCHG), not as the atomic add the assembler would otherwise emit.
func TestCmpXchgEncoding(t *testing.T) {
	var buf bytes.Buffer
	if _, err := cmpXchg64(asm.R8, asm.R7).Marshal(&buf, binary.LittleEndian); err != nil {
		t.Fatal(err)
	}
	want := []byte{0xdb, 0x78, 0, 0, bpfCmpXchg, 0, 0, 0} // BPF_STX|BPF_ATOMIC|BPF_DW, src r7, dst r8
	if diff := cmp.Diff(want, buf.Bytes()); diff != "" {
		t.Errorf("-want +got\n%s", diff)
	}
}

// TestTupleMapAnswersOutbound runs a child that makes a TCP connection, sends from an unconnected and from a
// connected UDP socket, and checks the first two (and a dual-stack socket's send to an IPv4 peer) are answered
// from the tuple map without asking sock_diag, while the connected UDP socket, an inbound connection with the
// same tuple and a packet whose UID the queue did not report go through sock_diag.
func TestTupleMapAnswersOutbound(t *testing.T) {
	if !runInNetns(t) {
		return
	}
	r := newTupleResolver(t)
	uid := int32(os.Getuid())
	for _, fam := range []string{"4", "6"} {
		t.Run("ipv"+fam, func(t *testing.T) {
			lo := "127.0.0.1"
			if fam == "6" {
				lo = "::1"
			}
			ln, err := net.Listen("tcp"+fam, net.JoinHostPort(lo, "0"))
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			sink, err := net.ListenUDP("udp"+fam, &net.UDPAddr{IP: net.ParseIP(lo)})
			if err != nil {
				t.Fatal(err)
			}
			defer sink.Close()
			lnAddr, sinkAddr := ln.Addr().(*net.TCPAddr).AddrPort(), sink.LocalAddr().(*net.UDPAddr).AddrPort()
			h := startTupleHelper(t, "conns", tupleArgs{Fam: fam, TCPPeer: lnAddr, UDPPeer: sinkAddr, DualStackPeer4: fam == "4"})
			rep := h.next(t)
			child := &backend.Process{PID: int32(h.cmd.Process.Pid), Path: h.cmd.Path, UID: uid}
			out := func(p backend.Protocol, local, remote netip.AddrPort) backend.Info {
				return backend.Info{Protocol: p, Direction: backend.Outbound, Local: local, Remote: remote, UID: uid}
			}
			checkTupleLookup(t, r, "tcp connect", out(backend.TCP, rep.TCP, lnAddr), child, byTuple)
			checkTupleLookup(t, r, "tcp connect again", out(backend.TCP, rep.TCP, lnAddr), child, byTuple)
			checkTupleLookup(t, r, "udp unconnected sendto", out(backend.UDP, rep.UDP, sinkAddr), child, byTuple)
			checkTupleLookup(t, r, "udp connected send", out(backend.UDP, rep.UDPConn, sinkAddr), child, byDiagMap)
			if fam == "4" {
				// Bound to the wildcard: its sends carry no local address the resolver may use (see ownerFromTuple).
				checkTupleLookup(t, r, "udp dual-stack socket to an ipv4 peer", out(backend.UDP, rep.UDPDual, sinkAddr), child, byDiagMap)
				checkTupleLookup(t, r, "tcp from an ipv6 socket to an ipv4 peer", out(backend.TCP, rep.TCPMapped, lnAddr), child, byTuple)
			}
			in := out(backend.UDP, rep.UDP, sinkAddr)
			in.Direction = backend.Inbound
			checkTupleLookup(t, r, "inbound with an outbound tuple", in, child, byDiagMap)
			noUID := out(backend.TCP, rep.TCP, lnAddr)
			noUID.UID = backend.Unknown
			checkTupleLookup(t, r, "queue without the uid", noUID, child, byDiagMap)
			other := out(backend.UDP, rep.UDP, netip.AddrPortFrom(sinkAddr.Addr(), sinkAddr.Port()+1))
			checkTupleLookup(t, r, "udp to a peer the socket never sent to", other, child, byDiagMap)

			info := out(backend.UDP, rep.UDP, sinkAddr)
			if a := testing.AllocsPerRun(100, func() { r.ResolveProcess(&info) }); a != 0 {
				t.Errorf("a tuple map answer allocates %v times", a)
			}
			if a := testing.AllocsPerRun(100, func() { r.ResolveProcessNow(&info) }); a != 0 {
				t.Errorf("an immediate tuple map answer allocates %v times", a)
			}
		})
	}
}

// TestTupleClosedSocketPortReused checks that a tuple whose socket was closed, in a process that still runs, is
// never attributed to that process: the lookup falls back to sock_diag (which finds no socket, then this
// process's socket that took the port over), and once the new socket sends or connects, the tuple names it.
func TestTupleClosedSocketPortReused(t *testing.T) {
	if !runInNetns(t) {
		return
	}
	r := newTupleResolver(t)
	me := thisProcess(t)

	t.Run("udp", func(t *testing.T) {
		sink, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
		defer sink.Close()
		sinkAddr := sink.LocalAddr().(*net.UDPAddr).AddrPort()
		info, local := closeInHelper(t, r, backend.UDP, tupleArgs{Proto: "udp", UDPPeer: sinkAddr}, sinkAddr)
		u, err := net.ListenUDP("udp4", net.UDPAddrFromAddrPort(local))
		if err != nil {
			t.Fatal(err)
		}
		defer u.Close()
		checkTupleLookup(t, r, "port taken by another process's socket", info, me, byDiagMap)
		if _, err := u.WriteToUDPAddrPort([]byte("x"), sinkAddr); err != nil {
			t.Fatal(err)
		}
		checkTupleLookup(t, r, "the new socket sent", info, me, byTuple)
	})

	t.Run("tcp", func(t *testing.T) {
		ln, err := net.Listen("tcp4", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		lnAddr := ln.Addr().(*net.TCPAddr).AddrPort()
		info, local := closeInHelper(t, r, backend.TCP, tupleArgs{Proto: "tcp", TCPPeer: lnAddr}, lnAddr)
		d := net.Dialer{LocalAddr: net.TCPAddrFromAddrPort(local)}
		c, err := d.Dial("tcp4", lnAddr.String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		checkTupleLookup(t, r, "the port connected again by another process", info, me, byTuple)
	})
}

// closeInHelper runs a "closer" helper that opens a socket to peer, checks its outbound connection is
// answered from the tuple map as the helper's, has it close the socket, and checks the tuple is then never
// answered for it. It returns the connection's info and local address, now free for another socket.
func closeInHelper(t *testing.T, r *Resolver, proto backend.Protocol, a tupleArgs, peer netip.AddrPort) (backend.Info, netip.AddrPort) {
	t.Helper()
	uid := int32(os.Getuid())
	h := startTupleHelper(t, "closer", a)
	local := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), h.next(t).Port)
	info := backend.Info{Protocol: proto, Direction: backend.Outbound, Local: local, Remote: peer, UID: uid}
	closer := &backend.Process{PID: int32(h.cmd.Process.Pid), Path: h.cmd.Path, UID: uid}
	checkTupleLookup(t, r, "before the close", info, closer, byTuple)
	fmt.Fprintln(h.stdin, "close")
	if !h.next(t).Closed {
		t.Fatal("closer did not close")
	}
	checkTupleLookup(t, r, "closed, port free", info, nil, byDiagOther)
	return info, local
}

// TestTupleSharedPort checks that a UDP tuple two sockets can share is never answered from the tuple map,
// which could name either: sockets sharing a port with SO_REUSEPORT, a socket with SO_REUSEADDR joining the
// port of a connected one; and that sockets bound to the same port on different local addresses are each
// answered for their own address, and a connected socket no hook saw sending never for another's.
func TestTupleSharedPort(t *testing.T) {
	if !runInNetns(t) {
		return
	}
	r := newTupleResolver(t)
	uid := int32(os.Getuid())
	me := thisProcess(t)
	lo := netip.MustParseAddr("127.0.0.1")
	newPeers := func(t *testing.T) (peers [3]netip.AddrPort) {
		for i := range peers {
			s, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { s.Close() })
			peers[i] = s.LocalAddr().(*net.UDPAddr).AddrPort()
		}
		return peers
	}
	listen := func(t *testing.T, opt int, at netip.AddrPort) *net.UDPConn {
		lc := net.ListenConfig{Control: withOpt(opt)}
		pc, err := lc.ListenPacket(context.Background(), "udp4", at.String())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { pc.Close() })
		return pc.(*net.UDPConn)
	}
	send := func(t *testing.T, u *net.UDPConn, to netip.AddrPort) {
		t.Helper()
		if _, err := u.WriteToUDPAddrPort([]byte("p"), to); err != nil {
			t.Fatal(err)
		}
	}
	out := func(local, to netip.AddrPort) backend.Info {
		return backend.Info{Protocol: backend.UDP, Direction: backend.Outbound, Local: local, Remote: to, UID: uid}
	}
	// notFromTuples checks a lookup goes to sock_diag, and, when want is set, that it answers want.
	notFromTuples := func(t *testing.T, name string, info backend.Info, want *backend.Process) {
		t.Helper()
		before := r.Stats()
		got, ok := r.ResolveProcess(&info)
		if d := tupleDelta(before, r.Stats()); d.Tuple != 0 || d.Diag != 1 {
			t.Errorf("%s: answered by %+v, want by sock_diag", name, d)
		}
		if want != nil {
			if !ok {
				t.Errorf("%s: not found", name)
			} else if diff := cmp.Diff(*want, got); diff != "" {
				t.Errorf("%s: -want +got\n%s", name, diff)
			}
		}
	}

	t.Run("reuseport", func(t *testing.T) {
		peers := newPeers(t)
		u := listen(t, unix.SO_REUSEPORT, netip.AddrPortFrom(lo, 0))
		local := u.LocalAddr().(*net.UDPAddr).AddrPort()
		send(t, u, peers[0])
		// Another socket may join the port at any time: its sends are never in the tuple map.
		notFromTuples(t, "before sharing", out(local, peers[0]), me)
		h := startTupleHelper(t, "sharer", tupleArgs{Port: local.Port(), Opt: unix.SO_REUSEPORT, Addr1: lo, Addr2: lo, Peer1: peers[0], Peer2: peers[1]})
		if !h.next(t).Ready {
			t.Fatal("sharer not ready")
		}
		send(t, u, peers[1])
		// sock_diag answers for one of the sockets sharing the tuple; which one is the kernel's choice.
		notFromTuples(t, "both sent unconnected", out(local, peers[0]), nil)
		notFromTuples(t, "the other's connected socket", out(local, peers[1]), nil)
	})

	t.Run("reuseaddr joins a connected socket", func(t *testing.T) {
		peers := newPeers(t)
		h := startTupleHelper(t, "joinable", tupleArgs{Opt: unix.SO_REUSEADDR, Peer1: peers[0]})
		local := netip.AddrPortFrom(lo, h.next(t).Port)
		joinable := &backend.Process{PID: int32(h.cmd.Process.Pid), Path: h.cmd.Path, UID: uid}
		checkTupleLookup(t, r, "connected socket alone", out(local, peers[0]), joinable, byDiagMap)
		u := listen(t, unix.SO_REUSEADDR, local)
		send(t, u, peers[0])
		// The packet may be the connected socket's, which no hook saw sending.
		notFromTuples(t, "after this process joined and sent", out(local, peers[0]), nil)
	})

	t.Run("distinct local addresses", func(t *testing.T) {
		peers := newPeers(t)
		u := listen(t, 0, netip.AddrPortFrom(lo, 0))
		local := u.LocalAddr().(*net.UDPAddr).AddrPort()
		for _, p := range peers {
			send(t, u, p)
		}
		checkTupleLookup(t, r, "alone on the port", out(local, peers[0]), me, byTuple)
		a2, a3 := netip.MustParseAddr("127.0.0.2"), netip.MustParseAddr("127.0.0.3")
		h := startTupleHelper(t, "sharer", tupleArgs{Port: local.Port(), Addr1: a2, Addr2: a3, Peer1: peers[0], Peer2: peers[1]})
		if !h.next(t).Ready {
			t.Fatal("sharer not ready")
		}
		sharer := &backend.Process{PID: int32(h.cmd.Process.Pid), Path: h.cmd.Path, UID: uid}
		send(t, u, peers[0])
		send(t, u, peers[1])
		// Each address's tuple has its own key.
		checkTupleLookup(t, r, "a peer both send to, from here", out(local, peers[0]), me, byTuple)
		checkTupleLookup(t, r, "a peer both send to, from the other", out(netip.AddrPortFrom(a2, local.Port()), peers[0]), sharer, byTuple)
		checkTupleLookup(t, r, "a peer the other's connected socket sends to, from here", out(local, peers[1]), me, byTuple)
		// Bound to one address without reuse flags, then connected: its tuple was recorded at connect.
		checkTupleLookup(t, r, "the other's connected socket", out(netip.AddrPortFrom(a3, local.Port()), peers[1]), sharer, byTuple)
		checkTupleLookup(t, r, "a peer only this process sends to", out(local, peers[2]), me, byTuple)
	})

	t.Run("an address next to a connected autobound socket", func(t *testing.T) {
		peers := newPeers(t)
		h := startTupleHelper(t, "joinable", tupleArgs{Peer1: peers[0]})
		local := netip.AddrPortFrom(lo, h.next(t).Port)
		joinable := &backend.Process{PID: int32(h.cmd.Process.Pid), Path: h.cmd.Path, UID: uid}
		checkTupleLookup(t, r, "connected socket alone", out(local, peers[0]), joinable, byDiagMap)
		other := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.2"), local.Port())
		u := listen(t, 0, other)
		send(t, u, peers[0])
		// No hook saw the connected socket send: its packets must not meet this process's tuple.
		checkTupleLookup(t, r, "connected socket after this process sent from the port", out(local, peers[0]), joinable, byDiagMap)
		checkTupleLookup(t, r, "this process's socket", out(other, peers[0]), me, byTuple)
	})
}

// BenchmarkResolveOutbound measures the lookup of outbound UDP flows whose sockets have sent, with the 5-tuple
// cache off: answered from the tuple map when the queue reported the UID, and through sock_diag and the owner
// map when it did not (the path every outbound lookup took before the tuple map).
func BenchmarkResolveOutbound(b *testing.B) {
	netnstest.RequireRoot(b)
	r, err := New(nil)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { r.Close() })
	if r.bpf == nil || !r.bpf.hasTuples() {
		b.Skipf("eBPF connection tuple map not loaded: %v", r.bpfErr)
	}
	r.tupleTTL = 0
	remote := netip.MustParseAddrPort("127.0.0.1:9")
	infos := make([]backend.Info, 256)
	for i := range infos {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { unix.Close(fd) })
		// Bound to an address: the programs key its sends with it (a wildcard-bound socket's key, without
		// one, is never used).
		if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: remote.Addr().As4()}); err != nil {
			b.Fatal(err)
		}
		if err := unix.Sendto(fd, []byte("x"), 0, &unix.SockaddrInet4{Addr: remote.Addr().As4(), Port: int(remote.Port())}); err != nil {
			b.Fatal(err)
		}
		sa, err := unix.Getsockname(fd)
		if err != nil {
			b.Fatal(err)
		}
		infos[i] = backend.Info{Protocol: backend.UDP, Direction: backend.Outbound, Local: netip.AddrPortFrom(remote.Addr(), uint16(sa.(*unix.SockaddrInet4).Port)), Remote: remote}
	}
	mirror := r.mirror
	for _, bc := range []struct {
		name   string
		uid    int32
		mirror *mirrorRing
	}{
		{"mirror", int32(os.Getuid()), mirror}, // the tuple map's user-space mirror: no system call
		{"tuple", int32(os.Getuid()), nil},     // the tuple and owner maps through bpf(2)
		{"diag", backend.Unknown, nil},         // sock_diag, then the owner map
	} {
		b.Run(bc.name, func(b *testing.B) {
			r.mirror = bc.mirror
			defer func() { r.mirror = mirror }()
			for i := range infos {
				infos[i].UID = bc.uid
			}
			before := r.Stats()
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				if _, ok := r.ResolveProcess(&infos[i%len(infos)]); !ok {
					b.Fatal("not found")
				}
				i++
			}
			d := tupleDelta(before, r.Stats())
			b.ReportMetric(float64(d.Diag)/float64(i), "diag/op")
			b.ReportMetric(float64(d.Tuple)/float64(i), "tuple/op")
		})
	}
}

// TestTupleMapDisabled checks Options.DisableTupleMap leaves the tuple map out: an outbound UDP flow is then
// resolved through sock_diag and the owner map, as before the tuple map.
func TestTupleMapDisabled(t *testing.T) {
	netnstest.RequireRoot(t)
	r, err := NewWithOptions(nil, Options{DisableTupleMap: true})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	requireBPF(t, r)
	if r.Stats().TupleMap {
		t.Fatal("tuple map loaded though disabled")
	}
	r.tupleTTL = 0
	u, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	remote := netip.MustParseAddrPort("127.0.0.1:9")
	if _, err := u.WriteToUDPAddrPort([]byte("x"), remote); err != nil {
		t.Fatal(err)
	}
	me := thisProcess(t)
	info := backend.Info{Protocol: backend.UDP, Direction: backend.Outbound, Local: u.LocalAddr().(*net.UDPAddr).AddrPort(), Remote: remote, UID: int32(os.Getuid())}
	checkTupleLookup(t, r, "udp sendto", info, me, byDiagMap)
}

// TestMirrorLostEvents fills a one-page event ring while the mirror cannot read it, so the programs lose
// events, and checks the mirror notices: it is reset, the next lookup is still answered right (through sock_diag
// and /proc; the hash map programs' maps, which the mirror only mirrors, answer it without them), and sockets
// made after that are answered by the mirror again.
func TestMirrorLostEvents(t *testing.T) {
	if !runInNetns(t) {
		return
	}
	defer func(n int) { mirrorRingSize = n }(mirrorRingSize)
	mirrorRingSize = os.Getpagesize()
	r := newTupleResolver(t)
	if r.mirror == nil {
		t.Fatal("no socket mirror")
	}
	me := thisProcess(t)
	peer := netip.MustParseAddrPort("127.0.0.1:9")
	// dial opens a UDP socket bound to loopback and connected to peer: its tuple is recorded at connect.
	dial := func() (*net.UDPConn, error) {
		return net.DialUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)}, net.UDPAddrFromAddrPort(peer))
	}
	// connected dials a socket kept until the test ends and returns its lookup info.
	connected := func() backend.Info {
		c, err := dial()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return backend.Info{Protocol: backend.UDP, Direction: backend.Outbound,
			Local: c.LocalAddr().(*net.UDPAddr).AddrPort(), Remote: peer, UID: int32(os.Getuid())}
	}
	// Learn this process first, so answers below are trusted without /proc.
	checkTupleLookup(t, r, "first socket", connected(), me, byTuple)

	// Nothing drains the ring meanwhile. The socket looked up next is made before the lock is released, so its
	// events are lost with the others: the ring's reader, which the programs wake on a ring this full, may read
	// and reset the mirror before the lookup does, and would then mirror a socket made after that.
	r.mirror.mu.Lock()
	var kept *net.UDPConn
	for i := range 200 {
		c, err := dial()
		if err != nil {
			r.mirror.mu.Unlock()
			t.Fatal(err)
		}
		if i < 199 {
			c.Close()
		} else {
			kept = c
		}
	}
	r.mirror.mu.Unlock()
	t.Cleanup(func() { kept.Close() })

	info := backend.Info{Protocol: backend.UDP, Direction: backend.Outbound,
		Local: kept.LocalAddr().(*net.UDPAddr).AddrPort(), Remote: peer, UID: int32(os.Getuid())}
	before := r.Stats()
	got, ok := r.ResolveProcess(&info)
	if !ok || got != *me {
		t.Fatalf("after lost events: %+v %v, want %+v", got, ok, *me)
	}
	after := r.Stats()
	if after.MirrorResets == 0 || after.MirrorAnswers != before.MirrorAnswers {
		t.Fatalf("after lost events: mirror resets %d, answers %d -> %d; want a reset and the maps to answer",
			after.MirrorResets, before.MirrorAnswers, after.MirrorAnswers)
	}
	checkTupleLookup(t, r, "socket made after the reset", connected(), me, byTuple)
}

// TestRepeatedSendsReportNothing checks what the socket storage programs report of UDP sockets that send again
// and again, as DNS clients, QUIC and games do: a send to the peer a socket reported last, or to the peer it is
// connected to, reports nothing (no event for the mirror, no map operation), while each change of peer is
// reported, so every peer is answered from the tuple.
func TestRepeatedSendsReportNothing(t *testing.T) {
	if !runInNetns(t) {
		return
	}
	r := newTupleResolver(t)
	if r.mirror == nil {
		t.Fatal("no socket mirror")
	}
	uid := int32(os.Getuid())
	me := thisProcess(t)
	lo := net.IPv4(127, 0, 0, 1)
	var peers [2]netip.AddrPort
	for i := range peers {
		sink, err := net.ListenUDP("udp4", &net.UDPAddr{IP: lo})
		if err != nil {
			t.Fatal(err)
		}
		defer sink.Close()
		peers[i] = sink.LocalAddr().(*net.UDPAddr).AddrPort()
	}
	events := func() uint64 { return replayedEvents(r) }
	// sendto sends n datagrams to peer with an explicit destination, which is what runs the sendmsg program.
	sendto := func(c *net.UDPConn, peer netip.AddrPort, n int) {
		t.Helper()
		raw, err := c.SyscallConn()
		if err != nil {
			t.Fatal(err)
		}
		sa := &unix.SockaddrInet4{Addr: peer.Addr().As4(), Port: int(peer.Port())}
		for range n {
			var serr error
			if err := raw.Write(func(fd uintptr) bool { serr = unix.Sendto(int(fd), []byte("x"), 0, sa); return true }); err != nil {
				t.Fatal(err)
			}
			if serr != nil {
				t.Fatal(serr)
			}
		}
	}
	out := func(c *net.UDPConn, peer netip.AddrPort) backend.Info {
		return backend.Info{Protocol: backend.UDP, Direction: backend.Outbound,
			Local: c.LocalAddr().(*net.UDPAddr).AddrPort(), Remote: peer, UID: uid}
	}

	u, err := net.ListenUDP("udp4", &net.UDPAddr{IP: lo})
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	sendto(u, peers[0], 1)
	checkTupleLookup(t, r, "first send", out(u, peers[0]), me, byTuple)
	before := events()
	sendto(u, peers[0], 50)
	if got := events() - before; got != 0 {
		t.Errorf("50 more sends to the same peer reported %d events, want none", got)
	}
	sendto(u, peers[1], 1)
	checkTupleLookup(t, r, "another peer", out(u, peers[1]), me, byTuple)
	sendto(u, peers[0], 1)
	checkTupleLookup(t, r, "the first peer again", out(u, peers[0]), me, byTuple)

	// Bound before it connects, so connect4 reports its tuple.
	c, err := net.DialUDP("udp4", &net.UDPAddr{IP: lo}, net.UDPAddrFromAddrPort(peers[1]))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	checkTupleLookup(t, r, "connected", out(c, peers[1]), me, byTuple)
	before = events()
	sendto(c, peers[1], 50)
	if got := events() - before; got != 0 {
		t.Errorf("50 sends to the connected peer reported %d events, want none", got)
	}
	sendto(c, peers[0], 1)
	checkTupleLookup(t, r, "connected socket sending to another peer", out(c, peers[0]), me, byTuple)
}

// TestSocketsReportedFromBind checks when the socket storage programs first report a socket: not at its
// creation, which would cost every client socket an event that its connect repeats, but when it is bound (a
// listener or a receiving UDP socket, which connect and send never report) or connected.
func TestSocketsReportedFromBind(t *testing.T) {
	if !runInNetns(t) {
		return
	}
	r := newTupleResolver(t)
	if r.mirror == nil || r.bpf.mode != modeStorage {
		t.Skip("the socket storage programs are not loaded")
	}
	events := func() uint64 { return replayedEvents(r) }
	newSocket := func(typ int) (fd int, cookie uint64) {
		t.Helper()
		fd, err := unix.Socket(unix.AF_INET, typ|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { unix.Close(fd) })
		if cookie, err = unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_COOKIE); err != nil {
			t.Fatal(err)
		}
		return fd, cookie
	}
	owned := func(what string, cookie uint64, want bool) {
		t.Helper()
		o, ok := r.mirror.owner(cookie)
		if ok != want || (ok && o.tgid != int32(os.Getpid())) {
			t.Errorf("%s: owner %+v recorded %v, want recorded %v by this process", what, o, ok, want)
		}
	}
	loopback := &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}

	before := events()
	tcp, tcpCookie := newSocket(unix.SOCK_STREAM)
	udp, udpCookie := newSocket(unix.SOCK_DGRAM)
	if got := events() - before; got != 0 {
		t.Errorf("creating two sockets reported %d events, want none", got)
	}
	owned("created TCP socket", tcpCookie, false)

	if err := unix.Bind(tcp, loopback); err != nil {
		t.Fatal(err)
	}
	owned("bound TCP socket", tcpCookie, true)
	if err := unix.Listen(tcp, 1); err != nil {
		t.Fatal(err)
	}
	sa, err := unix.Getsockname(tcp)
	if err != nil {
		t.Fatal(err)
	}

	// A client socket connected without a bind: its connect reports it, in one event.
	before = events()
	if err := unix.Connect(udp, sa); err != nil {
		t.Fatal(err)
	}
	if got := events() - before; got != 1 {
		t.Errorf("connecting a fresh UDP socket reported %d events, want 1", got)
	}
	owned("connected UDP socket", udpCookie, true)
}

// TestRingBurstAfterIdle checks that a burst of sockets while no lookup reads the event ring, after the reader
// has backed off to its idle pace, wakes the reader before the ring overflows: the programs wake it when they
// write into a ring already a quarter full.
func TestRingBurstAfterIdle(t *testing.T) {
	if !runInNetns(t) {
		return
	}
	r := newTupleResolver(t)
	if r.mirror == nil || r.ringWait == nil {
		t.Skip("no event ring reader")
	}
	// The reader doubles its wait while the ring stays empty, from mirrorSyncMin to mirrorSyncMax in about
	// 1.3 s; nothing announces that it got there.
	time.Sleep(mirrorSyncMax + mirrorSyncMax/2)
	before := r.Stats()
	// Each socket reports its bind and its release: three rings' worth, written far faster than one idle
	// wait.
	sockets := uint64(3 * mirrorRingSize / 64)
	lo := &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}
	start := time.Now()
	for range sockets {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		if err := unix.Bind(fd, lo); err != nil {
			unix.Close(fd)
			t.Fatal(err)
		}
		unix.Close(fd)
	}
	took := time.Since(start)
	r.mirror.sync()
	after := r.Stats()
	t.Logf("%d sockets in %v; events %d, resets %d", sockets, took, after.MirrorEvents-before.MirrorEvents, after.MirrorResets-before.MirrorResets)
	if took > mirrorSyncMax/2 {
		t.Skipf("the burst took %v, too slow to outrun an idle reader", took)
	}
	if after.MirrorResets != before.MirrorResets {
		t.Errorf("the ring overflowed during the burst (%d resets)", after.MirrorResets-before.MirrorResets)
	}
	if got := after.MirrorEvents - before.MirrorEvents; got < 2*sockets {
		t.Errorf("%d events replayed, want at least %d (a bind and a release per socket)", got, 2*sockets)
	}
}

// replayedEvents brings the resolver's mirror up to date and returns how many events it has replayed.
func replayedEvents(r *Resolver) uint64 {
	r.mirror.sync()
	return r.Stats().MirrorEvents
}
