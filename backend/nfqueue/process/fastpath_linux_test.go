package process

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/sys/unix"

	"github.com/warden-fw/warden/backend"
)

// execReport is what runExecFrom and runExeced print: the port of the UDP socket they made.
type execReport struct{ Port uint16 }

// runExecFrom makes a UDP socket that survives exec, sends one datagram ("a") from it to peer, reports it,
// and on a line from stdin executes target, which sends from the same socket (runExeced).
func runExecFrom(peer, target string) error {
	ap, err := netip.ParseAddrPort(peer)
	if err != nil {
		return err
	}
	// No SOCK_CLOEXEC: the next program inherits the socket.
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM, 0)
	if err != nil {
		return err
	}
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		return err
	}
	if err := unix.Sendto(fd, []byte("a"), 0, &unix.SockaddrInet4{Addr: ap.Addr().As4(), Port: int(ap.Port())}); err != nil {
		return err
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		return err
	}
	if err := json.NewEncoder(os.Stdout).Encode(execReport{Port: uint16(sa.(*unix.SockaddrInet4).Port)}); err != nil {
		return err
	}
	if _, err := bufio.NewReader(os.Stdin).ReadString('\n'); err != nil {
		return err
	}
	env := append(envWithout(execFromEnv), execedEnv+"="+strconv.Itoa(fd)+","+peer)
	return syscall.Exec(target, []string{target, "-test.run=^$"}, env)
}

// runExeced is runExecFrom's second program: it sends "b" from the inherited socket, then "c" from a new one,
// reports the new one and holds both until stdin closes.
func runExeced(v string) error {
	fdStr, peer, ok := strings.Cut(v, ",")
	if !ok {
		return fmt.Errorf("bad %s %q", execedEnv, v)
	}
	fd, err := strconv.Atoi(fdStr)
	if err != nil {
		return err
	}
	ap, err := netip.ParseAddrPort(peer)
	if err != nil {
		return err
	}
	if err := unix.Sendto(fd, []byte("b"), 0, &unix.SockaddrInet4{Addr: ap.Addr().As4(), Port: int(ap.Port())}); err != nil {
		return err
	}
	u, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		return err
	}
	if _, err := u.WriteToUDPAddrPort([]byte("c"), ap); err != nil {
		return err
	}
	if err := json.NewEncoder(os.Stdout).Encode(execReport{Port: u.LocalAddr().(*net.UDPAddr).AddrPort().Port()}); err != nil {
		return err
	}
	_, _ = io.Copy(io.Discard, os.Stdin)
	runtime.KeepAlive(u)
	return unix.Close(fd)
}

// answerDelta is how much the map answer counters moved.
type answerDelta struct{ Map, Fast, Proc, Stale uint64 }

func answers(before, after Stats) answerDelta {
	return answerDelta{after.MapAnswers - before.MapAnswers, after.MapFast - before.MapFast, after.ProcAnswers - before.ProcAnswers, after.MapStale - before.MapStale}
}

// checkLookup resolves info and compares the answer and the counters that moved with the wanted ones.
func checkLookup(t *testing.T, r *Resolver, name string, info backend.Info, want backend.Process, wantPath answerDelta) {
	t.Helper()
	before := r.Stats()
	got, ok := r.ResolveProcess(&info)
	if !ok {
		t.Errorf("%s (%v): not found", name, &info)
		return
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("%s (%v): -want +got\n%s", name, &info, diff)
	}
	if diff := cmp.Diff(wantPath, answers(before, r.Stats())); diff != "" {
		t.Errorf("%s: answer counters moved -want +got\n%s", name, diff)
	}
}

var (
	byMapVerified = answerDelta{Map: 1}
	byMapFast     = answerDelta{Map: 1, Fast: 1}
)

// TestEBPFCachedRecordNeedsNoProc checks that once the resolver knows a process, the map answers for its next
// socket without reading /proc at all: the resolver's /proc is pointed at an empty directory, where every read
// fails, and the answer still comes, counted as a fast one. Nor does that answer allocate.
func TestEBPFCachedRecordNeedsNoProc(t *testing.T) {
	r := newEBPFResolver(t)
	r.tupleTTL = 0
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	me := backend.Process{PID: int32(os.Getpid()), Path: self, UID: int32(os.Getuid())}
	newSocket := func() backend.Info {
		u, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { u.Close() })
		return backend.Info{Protocol: backend.UDP, Local: u.LocalAddr().(*net.UDPAddr).AddrPort(), Remote: netip.MustParseAddrPort("127.0.0.1:9")}
	}
	checkLookup(t, r, "first socket (the process is new to the resolver)", newSocket(), me, byMapVerified)
	r.proc.root = t.TempDir()
	second := newSocket()
	checkLookup(t, r, "second socket, no /proc", second, me, byMapFast)
	checkLookup(t, r, "same socket again, no /proc", second, me, byMapFast)
	if a := testing.AllocsPerRun(100, func() { r.ResolveProcess(&second) }); a != 0 {
		t.Errorf("a fast map answer allocates %v times", a)
	}
}

// TestEBPFExecAfterCached runs a process the resolver knows, which then executes another program that sends
// from the socket it inherited and from a new one: neither is answered from the old program's record.
func TestEBPFExecAfterCached(t *testing.T) {
	r := newEBPFResolver(t)
	r.tupleTTL = 0
	from := copyTestBinary(t, "exec-from.test")
	to := copyTestBinary(t, "exec-to.test")
	sink, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer sink.Close()
	sinkAddr := sink.LocalAddr().(*net.UDPAddr).AddrPort()

	cmd := exec.Command(from, "-test.run=^$")
	cmd.Env = append(os.Environ(), execFromEnv+"="+sinkAddr.String(), execTargetEnv+"="+to)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
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
	t.Cleanup(func() { stdin.Close(); cmd.Process.Kill(); cmd.Wait() })
	lines := make(chan string, 4)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()
	report := func() execReport {
		t.Helper()
		select {
		case l, ok := <-lines:
			if !ok {
				t.Fatal("child stopped before reporting")
			}
			var rep execReport
			if err := json.Unmarshal([]byte(l), &rep); err != nil {
				t.Fatalf("child said %q: %v", l, err)
			}
			return rep
		case <-time.After(childStartWait):
			t.Fatal("child did not report in time")
		}
		return execReport{}
	}
	// receive waits for the child's datagram: once it is here, the sendmsg program has run for it.
	receive := func(want string, fromPort uint16) {
		t.Helper()
		sink.SetReadDeadline(time.Now().Add(childStartWait))
		var buf [16]byte
		n, src, err := sink.ReadFromUDPAddrPort(buf[:])
		if err != nil {
			t.Fatalf("waiting for %q: %v", want, err)
		}
		if string(buf[:n]) != want || fromPort != 0 && src.Port() != fromPort {
			t.Fatalf("got %q from %v, want %q from port %d", buf[:n], src, want, fromPort)
		}
	}
	lo := netip.MustParseAddr("127.0.0.1")
	udpFrom := func(port uint16) backend.Info {
		return backend.Info{Protocol: backend.UDP, Direction: backend.Outbound, Local: netip.AddrPortFrom(lo, port), Remote: sinkAddr}
	}
	pid := int32(cmd.Process.Pid)
	before := backend.Process{PID: pid, Path: from, UID: int32(os.Getuid())}
	after := backend.Process{PID: pid, Path: to, UID: int32(os.Getuid())}

	inherited := report().Port
	receive("a", inherited)
	checkLookup(t, r, "before exec, process new to the resolver", udpFrom(inherited), before, byMapVerified)
	checkLookup(t, r, "before exec, process known", udpFrom(inherited), before, byMapFast)

	if _, err := io.WriteString(stdin, "exec\n"); err != nil {
		t.Fatal(err)
	}
	receive("b", inherited)
	fresh := report().Port
	receive("c", fresh)
	checkLookup(t, r, "after exec, inherited socket sent from", udpFrom(inherited), after, byMapVerified)
	checkLookup(t, r, "after exec, new socket", udpFrom(fresh), after, byMapFast)
}

// TestMapEntryTrust checks which map entries the resolver answers from its cached record without /proc, on a
// fake /proc whose process is backed by a real one (for the pidfd the exit watcher needs), and that once that
// process has exited a new process under its PID is never taken for it, even with the same name.
func TestMapEntryTrust(t *testing.T) {
	r, f, _ := newFakeResolver(t)
	w, err := newExitWatcher(r.recordExited)
	if err != nil {
		t.Fatal(err)
	}
	r.watcher = w // closed with the resolver
	exited := make(chan int32, 4)
	hook := func(pid int32) { exited <- pid }
	r.exitHook.Store(&hook)

	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	idle := exec.Command(self, "-test.run=^$")
	idle.Env = append(os.Environ(), idleEnv+"=1")
	stdin, err := idle.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := idle.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { idle.Process.Kill(); idle.Wait() })
	pid := idle.Process.Pid

	const start = 100 // clock ticks
	f.process(pid, "foo", start, "/usr/bin/foo", nil)
	rec, ok := r.record(int32(pid))
	if !ok {
		t.Fatal("no record for the idle process")
	}
	if rec.pidfd < 0 {
		if os.Getenv("CI") != "" {
			t.Fatal("the record is not watched: no pidfd (CI is set)")
		}
		t.Skip("the record is not watched: no pidfd here")
	}
	entry := func(pid int, comm string, ticks uint64) ownerEntry {
		e := ownerEntry{tgid: int32(pid), seenNs: ticks*1e7 + 5e6}
		copy(e.comm[:], comm)
		return e
	}
	// A PID above the kernel's limit (PID_MAX_LIMIT, 2^22): it has a record, but no process to watch.
	const unwatched = 1<<22 + 1
	f.process(unwatched, "foo", start, "/usr/bin/foo", nil)
	if urec, ok := r.record(unwatched); !ok || urec.pidfd >= 0 {
		t.Fatalf("record of an impossible PID: %+v, %v", urec, ok)
	}

	tests := []struct {
		name  string
		entry ownerEntry
		want  *procRecord
	}{
		{"written by the known process", entry(pid, "foo", 200), rec},
		{"written in the tick it started", entry(pid, "foo", start), rec},
		{"written before it started (PID reused since)", entry(pid, "foo", start-1), nil},
		{"another name (an exec since, or a renamed thread)", entry(pid, "bar", 200), nil},
		{"a longer name with the same start", entry(pid, "foobar", 200), nil},
		{"no name", entry(pid, "", 200), nil},
		{"a process without a record", entry(pid+1, "foo", 200), nil},
		{"an unwatched record", entry(unwatched, "foo", 200), nil},
	}
	for _, tt := range tests {
		if got := r.trustedRecord(&tt.entry); got != tt.want {
			t.Errorf("%s: trusted %p, want %p", tt.name, got, tt.want)
		}
	}

	// A trusted entry is answered without /proc: the process's directory is gone, and still the answer comes.
	f.exit(pid)
	e := entry(pid, "foo", 200)
	before := r.Stats()
	if got, ok := r.ownerFromEntry(&e); !ok || got != rec {
		t.Errorf("trusted entry with /proc gone: %p, %v; want %p", got, ok, rec)
	}
	if d := answers(before, r.Stats()); d != byMapFast {
		t.Errorf("trusted entry: counters moved %+v, want %+v", d, byMapFast)
	}

	// The process exits; the watcher marks the record dead and drops it.
	stdin.Close()
	if err := idle.Wait(); err != nil {
		t.Fatal(err)
	}
	for noticed := false; !noticed; {
		select {
		case p := <-exited:
			noticed = p == int32(pid)
		case <-time.After(10 * time.Second):
			t.Fatal("the watcher did not notice the exit")
		}
	}
	if !rec.dead.Load() {
		t.Fatal("exited process's record is not dead")
	}
	// Between marking it dead and dropping it the record is still in the cache: dead is enough to distrust it.
	r.exeMu.Lock()
	r.exes[int32(pid)] = rec
	r.exeMu.Unlock()
	if got := r.trustedRecord(&e); got != nil {
		t.Error("dead record trusted")
	}

	// The PID is reused by a process with the same name and another program. An entry written before the new
	// process started is stale; one written after is answered from /proc, with the new program.
	f.process(pid, "foo", 300, "/usr/bin/other", nil)
	steps := []struct {
		name   string
		entry  ownerEntry
		wantOK bool
		path   string
		moved  answerDelta
	}{
		{"entry of the exited process", entry(pid, "foo", 250), false, "", answerDelta{Stale: 1}},
		{"entry of the new process", entry(pid, "foo", 400), true, "/usr/bin/other", byMapVerified},
	}
	for _, s := range steps {
		before := r.Stats()
		got, ok := r.ownerFromEntry(&s.entry)
		if ok != s.wantOK || ok && got.path != s.path {
			t.Errorf("%s: %+v, %v; want path %q, %v", s.name, got, ok, s.path, s.wantOK)
		}
		if d := answers(before, r.Stats()); d != s.moved {
			t.Errorf("%s: counters moved %+v, want %+v", s.name, d, s.moved)
		}
	}
}
