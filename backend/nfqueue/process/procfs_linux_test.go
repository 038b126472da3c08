package process

import (
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/warden-fw/warden/backend"
)

// fakeProc is a directory laid out like the parts of /proc the resolver reads.
type fakeProc struct {
	t    *testing.T
	root string
}

func newFakeProc(t *testing.T) *fakeProc {
	f := &fakeProc{t: t, root: t.TempDir()}
	// Entries a walk must skip.
	f.mkdir("self")
	f.mkdir("sys")
	f.mkdir("12x")
	return f
}

func (f *fakeProc) mkdir(rel string) {
	if err := os.MkdirAll(filepath.Join(f.root, rel), 0o755); err != nil {
		f.t.Fatal(err)
	}
}

func (f *fakeProc) pidDir(pid int) string { return filepath.Join(f.root, strconv.Itoa(pid)) }

// process (re)creates a process with the given name, start time, executable link and descriptors.
func (f *fakeProc) process(pid int, comm string, start uint64, exe string, fds map[int]string) {
	dir := f.pidDir(pid)
	if err := os.RemoveAll(dir); err != nil {
		f.t.Fatal(err)
	}
	f.mkdir(filepath.Join(strconv.Itoa(pid), "fd"))
	if err := os.WriteFile(filepath.Join(dir, "stat"), []byte(statLine(pid, comm, start)), 0o644); err != nil {
		f.t.Fatal(err)
	}
	f.link(filepath.Join(dir, "exe"), exe)
	for fd, target := range fds {
		f.setFD(pid, fd, target)
	}
}

func (f *fakeProc) link(path, target string) {
	os.Remove(path)
	if err := os.Symlink(target, path); err != nil {
		f.t.Fatal(err)
	}
}

func (f *fakeProc) setFD(pid, fd int, target string) {
	f.link(filepath.Join(f.pidDir(pid), "fd", strconv.Itoa(fd)), target)
}

func (f *fakeProc) closeFD(pid, fd int) {
	if err := os.Remove(filepath.Join(f.pidDir(pid), "fd", strconv.Itoa(fd))); err != nil {
		f.t.Fatal(err)
	}
}

func (f *fakeProc) exit(pid int) {
	if err := os.RemoveAll(f.pidDir(pid)); err != nil {
		f.t.Fatal(err)
	}
}

func (f *fakeProc) alive(pid int32) bool {
	_, err := os.Stat(f.pidDir(int(pid)))
	return err == nil
}

func TestProcFSFake(t *testing.T) {
	f := newFakeProc(t)
	f.process(100, "foo bar) x", 5555, "/usr/bin/foo (deleted)", map[int]string{0: "/dev/null", 3: "socket:[1234]", 4: "pipe:[55]", 7: "socket:[999]"})
	f.process(200, "bar", 6666, "/usr/bin/bar", nil)
	p := procFS{root: f.root}
	bufs := newScanBuffers()

	pids, err := p.listPIDs(bufs, nil)
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(pids)
	if diff := cmp.Diff([]int32{100, 200}, pids); diff != "" {
		t.Errorf("listPIDs: -want +got\n%s", diff)
	}

	type sock struct{ FD, Inode int }
	var got []sock
	p.socketsOf(100, bufs, func(fd int32, inode uint32) { got = append(got, sock{int(fd), int(inode)}) })
	slices.SortFunc(got, func(a, b sock) int { return a.FD - b.FD })
	if diff := cmp.Diff([]sock{{3, 1234}, {7, 999}}, got); diff != "" {
		t.Errorf("socketsOf: -want +got\n%s", diff)
	}
	p.socketsOf(300, bufs, func(int32, uint32) { t.Error("socket of a missing process") })

	for _, c := range []struct {
		pid, fd int32
		inode   uint32
		want    bool
	}{{100, 3, 1234, true}, {100, 7, 999, true}, {100, 3, 999, false}, {100, 4, 55, false}, {100, 9, 1234, false}, {300, 3, 1234, false}} {
		if got := p.holdsSocket(c.pid, c.fd, c.inode); got != c.want {
			t.Errorf("holdsSocket(%d, %d, %d) = %v, want %v", c.pid, c.fd, c.inode, got, c.want)
		}
	}

	var sb [statBufSize]byte
	comm, start, err := p.readStat(100, &sb)
	if err != nil || string(comm) != "foo bar) x" || start != 5555 {
		t.Errorf("readStat = %q, %d, %v", comm, start, err)
	}
	if _, _, err := p.readStat(300, &sb); err == nil {
		t.Error("readStat of a missing process succeeded")
	}
	if exe, err := p.readExe(100); exe != "/usr/bin/foo" || err != nil {
		t.Errorf("readExe = %q, %v", exe, err)
	}
}

// fakeFinder answers socket lookups from a table.
type fakeFinder struct {
	mu      sync.Mutex
	sockets map[netip.AddrPort]sockInfo // by local end
}

func (f *fakeFinder) set(local netip.AddrPort, s sockInfo) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.sockets == nil {
		f.sockets = make(map[netip.AddrPort]sockInfo)
	}
	f.sockets[local] = s
}

func (f *fakeFinder) find(_ backend.Protocol, _ backend.Direction, local, _ netip.AddrPort, _ int) (sockInfo, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	s, ok := f.sockets[local]
	if !ok {
		return sockInfo{}, errNotFound
	}
	return s, nil
}

func newFakeResolver(t *testing.T) (*Resolver, *fakeProc, *fakeFinder) {
	f := newFakeProc(t)
	ff := &fakeFinder{}
	r := newResolver(nil, procFS{root: f.root}, ff.find, f.alive)
	r.scanInterval = 0
	t.Cleanup(func() { r.Close() })
	return r, f, ff
}

var (
	fakeLocal  = netip.MustParseAddrPort("10.0.0.1:40000")
	fakeRemote = netip.MustParseAddrPort("1.1.1.1:443")
	fakeInfo   = backend.Info{Protocol: backend.TCP, Local: fakeLocal, Remote: fakeRemote}
)

// TestResolverOwnership follows one socket through the ways its owner can change; the 5-tuple cache is off so
// every step exercises the inode and executable caches.
func TestResolverOwnership(t *testing.T) {
	r, f, ff := newFakeResolver(t)
	r.tupleTTL = 0
	ff.set(fakeLocal, sockInfo{inode: 999, uid: 1000})
	f.process(50, "idle", 10, "/usr/bin/idle", map[int]string{3: "socket:[1]"})
	f.process(100, "foo", 100, "/usr/bin/foo", map[int]string{0: "/dev/null", 7: "socket:[999]"})

	steps := []struct {
		name      string
		change    func()
		want      backend.Process
		wantOK    bool
		wantWalks uint64 // walks so far
	}{
		{"first lookup walks", func() {}, backend.Process{PID: 100, Path: "/usr/bin/foo", UID: 1000}, true, 1},
		{"known owner needs no walk", func() {}, backend.Process{PID: 100, Path: "/usr/bin/foo", UID: 1000}, true, 1},
		{"handed to another process", func() {
			f.process(200, "bar", 200, "/usr/bin/bar", map[int]string{5: "socket:[999]"})
			f.exit(100)
		}, backend.Process{PID: 200, Path: "/usr/bin/bar", UID: 1000}, true, 2},
		{"pid reused by a process holding it", func() {
			f.process(200, "bar", 201, "/usr/bin/baz", map[int]string{5: "socket:[999]"})
		}, backend.Process{PID: 200, Path: "/usr/bin/baz", UID: 1000}, true, 2},
		{"exec keeps pid and start time", func() {
			f.process(200, "qux", 201, "/usr/bin/qux", map[int]string{5: "socket:[999]"})
		}, backend.Process{PID: 200, Path: "/usr/bin/qux", UID: 1000}, true, 2},
		{"descriptor number changed", func() {
			f.closeFD(200, 5)
			f.setFD(200, 6, "socket:[999]")
		}, backend.Process{PID: 200, Path: "/usr/bin/qux", UID: 1000}, true, 2}, // found among recent owners
		{"no process holds it", func() { f.closeFD(200, 6) }, backend.Process{}, false, 3},
		{"socket gone", func() { ff.set(fakeLocal, sockInfo{inode: 12345}) }, backend.Process{}, false, 4},
		{"deleted executable", func() {
			f.process(300, "new", 300, "/opt/new (deleted)", map[int]string{9: "socket:[12345]"})
		}, backend.Process{PID: 300, Path: "/opt/new", UID: 0}, true, 5},
	}
	for _, s := range steps {
		s.change()
		got, ok := r.ResolveProcess(&fakeInfo)
		if ok != s.wantOK {
			t.Errorf("%s: ok = %v, want %v", s.name, ok, s.wantOK)
		}
		if diff := cmp.Diff(s.want, got); diff != "" {
			t.Errorf("%s: -want +got\n%s", s.name, diff)
		}
		if walks := r.scans.Load(); walks != s.wantWalks {
			t.Errorf("%s: %d walks so far, want %d", s.name, walks, s.wantWalks)
		}
	}
	// Process 100 exited: the walk forgot it.
	r.exeMu.Lock()
	_, stale := r.exes[100]
	r.exeMu.Unlock()
	if stale {
		t.Error("executable cache still holds an exited process")
	}
}

// TestWalkStopsEarly checks a walk visits a recent owner first and stops once it has what it looks for, and
// that a fruitless walk visits everything.
func TestWalkStopsEarly(t *testing.T) {
	r, f, ff := newFakeResolver(t)
	r.tupleTTL = 0
	for pid := 1000; pid < 1020; pid++ {
		f.process(pid, "p", uint64(pid), "/bin/p", map[int]string{3: "socket:[" + strconv.Itoa(pid) + "]"})
	}
	ff.set(fakeLocal, sockInfo{inode: 1010})
	if got, ok := r.ResolveProcess(&fakeInfo); !ok || got.PID != 1010 {
		t.Fatalf("first lookup = %+v, %v", got, ok)
	}
	// Process 1010 opens another socket; the lookup finds it among the recent owners without any walk.
	f.setFD(1010, 4, "socket:[5000]")
	ff.set(fakeLocal, sockInfo{inode: 5000})
	walks := r.scans.Load()
	if got, ok := r.ResolveProcess(&fakeInfo); !ok || got.PID != 1010 {
		t.Fatalf("second lookup = %+v, %v", got, ok)
	}
	if n := r.scans.Load() - walks; n != 0 {
		t.Errorf("a hot process's new socket cost %d walks of /proc, want 0", n)
	}
	ff.set(fakeLocal, sockInfo{inode: 6000}) // nobody holds it
	if _, ok := r.ResolveProcess(&fakeInfo); ok {
		t.Fatal("unheld socket resolved")
	}
	if n := len(r.walk.scanned); n != 20 {
		t.Errorf("fruitless walk visited %d processes, want 20", n)
	}
}

// TestTupleCache checks the 5-tuple cache answers within its lifetime, expires, and drops an answer whose
// process has exited.
func TestTupleCache(t *testing.T) {
	r, f, ff := newFakeResolver(t)
	var clock time.Duration
	r.now = func() time.Duration { return clock }
	f.process(100, "foo", 100, "/usr/bin/foo", map[int]string{7: "socket:[1]"})
	f.process(200, "bar", 200, "/usr/bin/bar", map[int]string{7: "socket:[2]"})
	ff.set(fakeLocal, sockInfo{inode: 1})
	foo := backend.Process{PID: 100, Path: "/usr/bin/foo"}
	bar := backend.Process{PID: 200, Path: "/usr/bin/bar"}
	check := func(step string, want backend.Process) {
		t.Helper()
		got, ok := r.ResolveProcess(&fakeInfo)
		if !ok || got != want {
			t.Errorf("%s: %+v, %v; want %+v", step, got, ok, want)
		}
	}
	check("first", foo)
	ff.set(fakeLocal, sockInfo{inode: 2}) // the 5-tuple now belongs to another socket
	clock += r.tupleTTL - 1
	check("within the lifetime", foo)
	clock++
	check("expired", bar)
	ff.set(fakeLocal, sockInfo{inode: 1})
	f.exit(200)
	check("owner exited", foo)
}

func TestClosedResolverAnswersUnknown(t *testing.T) {
	r, f, ff := newFakeResolver(t)
	f.process(100, "foo", 100, "/usr/bin/foo", map[int]string{7: "socket:[1]"})
	ff.set(fakeLocal, sockInfo{inode: 1})
	r.Close()
	if _, ok := r.ResolveProcess(&fakeInfo); ok {
		t.Error("closed resolver answered")
	}
	if err := r.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}
