package process

import (
	"errors"
	"log/slog"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/warden-fw/warden/backend"
)

const (
	// defaultTupleTTL keeps a 5-tuple's answer long enough to cover the packets queued before the verdict and
	// a SYN retransmission (1 s), and short enough that a reused 5-tuple is very unlikely to meet a stale answer.
	defaultTupleTTL = 2 * time.Second
	// defaultScanInterval is the least time between the starts of two /proc walks. Lookups that miss meanwhile
	// wait for the next walk and share it.
	defaultScanInterval = 50 * time.Millisecond
	// maxTuples bounds the 5-tuple cache.
	maxTuples = 8192
	// hotPIDs is how many recent socket owners a walk visits first: a process that opened one socket is
	// the likeliest to have opened the next.
	hotPIDs = 8
)

var _ backend.ProcessResolver = (*Resolver)(nil)

// socketFinder looks up the socket behind a connection; it is the sock_diag pool outside unit tests.
type socketFinder func(proto backend.Protocol, dir backend.Direction, local, remote netip.AddrPort, ifindex int) (sockInfo, error)

// Resolver finds the process behind a connection. It is safe for concurrent use.
type Resolver struct {
	log   *slog.Logger
	proc  procFS
	find  socketFinder
	alive func(pid int32) bool
	// now returns monotonic time since the resolver's creation.
	now  func() time.Duration
	diag *diagPool // nil in unit tests

	tupleTTL     time.Duration
	scanInterval time.Duration

	closeOnce sync.Once
	closed    chan struct{}
	lastLog   atomic.Int64 // time.Duration of the last logged lookup error, for rate limiting
	scans     atomic.Uint64

	tupleMu sync.RWMutex // guards tuples
	tuples  map[backend.ConnKey]tupleEntry

	ownerMu sync.Mutex // guards the fields below
	owners  map[uint32]owner
	hot     [hotPIDs]int32
	hotNext int

	exeMu sync.Mutex // guards exes
	exes  map[int32]exeEntry

	scanMu       sync.Mutex // guards the fields below
	pending      map[uint32]struct{}
	scanning     bool
	scanDone     chan struct{}
	startedGen   uint64
	completedGen uint64
	lastScan     time.Duration
	everScanned  bool

	// walk is used only by the goroutine running a /proc walk (scanning is true).
	walk walkState
}

// tupleEntry is a cached answer for one 5-tuple.
type tupleEntry struct {
	proc    backend.Process
	expires time.Duration
}

// owner is where a socket inode was last seen open.
type owner struct {
	pid int32
	fd  int32
}

// exeEntry is a process's executable, valid while the PID's start time and command name stay the same: a
// reused PID has another start time, and exec(2) changes the name (almost always).
type exeEntry struct {
	start uint64
	comm  string
	path  string
}

// walkState holds a /proc walk's reusable buffers and what the last walk saw.
type walkState struct {
	bufs    *scanBuffers
	pids    []int32
	order   []int32
	found   []foundSocket
	known   map[int32]struct{} // PIDs present at the last walk
	present map[int32]struct{}
	scanned map[int32]struct{}
	seen    map[uint32]struct{}
}

type foundSocket struct {
	inode uint32
	owner owner
}

// New opens a sock_diag netlink socket in the calling thread's network namespace (the daemon's) and returns a
// resolver using it. The caller must Close it.
func New(logger *slog.Logger) (*Resolver, error) {
	pool, err := newDiagPool()
	if err != nil {
		return nil, err
	}
	r := newResolver(logger, procFS{root: "/proc"}, pool.findSocket, processAlive)
	r.diag = pool
	return r, nil
}

func newResolver(logger *slog.Logger, proc procFS, find socketFinder, alive func(int32) bool) *Resolver {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	epoch := time.Now()
	return &Resolver{
		log:          logger,
		proc:         proc,
		find:         find,
		alive:        alive,
		now:          func() time.Duration { return time.Since(epoch) },
		tupleTTL:     defaultTupleTTL,
		scanInterval: defaultScanInterval,
		closed:       make(chan struct{}),
		tuples:       make(map[backend.ConnKey]tupleEntry),
		owners:       make(map[uint32]owner),
		exes:         make(map[int32]exeEntry),
		pending:      make(map[uint32]struct{}),
		walk: walkState{
			bufs:    newScanBuffers(),
			known:   make(map[int32]struct{}),
			present: make(map[int32]struct{}),
			scanned: make(map[int32]struct{}),
			seen:    make(map[uint32]struct{}),
		},
	}
}

// Close releases the netlink sockets. Lookups after Close report unknown.
func (r *Resolver) Close() error {
	r.closeOnce.Do(func() {
		close(r.closed)
		if r.diag != nil {
			r.diag.close()
		}
	})
	return nil
}

// processAlive reports whether a process with this PID exists (a zombie counts as alive).
func processAlive(pid int32) bool {
	// kill(pid, 0) never blocks, so the raw form skips the scheduler's syscall bookkeeping.
	_, _, errno := unix.RawSyscall(unix.SYS_KILL, uintptr(pid), 0, 0)
	return errno == 0 || errno == unix.EPERM
}

// ResolveProcess returns the process owning the connection info describes (TCP or UDP). ok is false when no
// process holds the socket any more, or the socket cannot be found. It may read /proc and wait for a shared
// /proc walk (tens of milliseconds at worst), so it must not run on a packet-reading goroutine.
func (r *Resolver) ResolveProcess(info *backend.Info) (backend.Process, bool) {
	if info == nil || !info.Protocol.HasPorts() {
		return backend.Process{}, false
	}
	key := backend.ConnKey{
		Protocol: info.Protocol,
		Local:    netip.AddrPortFrom(info.Local.Addr().Unmap(), info.Local.Port()),
		Remote:   netip.AddrPortFrom(info.Remote.Addr().Unmap(), info.Remote.Port()),
	}
	if !key.Local.Addr().IsValid() || !key.Remote.Addr().IsValid() || key.Local.Addr().Is4() != key.Remote.Addr().Is4() {
		return backend.Process{}, false
	}
	if p, ok := r.cachedTuple(key); ok {
		return p, true
	}
	p, ok := r.resolve(info.Direction, key, info.IfIndex)
	if ok && r.tupleTTL > 0 {
		r.storeTuple(key, p)
	}
	return p, ok
}

// cachedTuple returns a fresh cached answer whose process still exists.
func (r *Resolver) cachedTuple(key backend.ConnKey) (backend.Process, bool) {
	r.tupleMu.RLock()
	e, ok := r.tuples[key]
	r.tupleMu.RUnlock()
	if !ok || r.now() >= e.expires {
		return backend.Process{}, false
	}
	// The process may have exited since: then the socket may be gone or inherited, so look again.
	if !r.alive(e.proc.PID) {
		r.tupleMu.Lock()
		if cur, ok := r.tuples[key]; ok && cur == e {
			delete(r.tuples, key)
		}
		r.tupleMu.Unlock()
		return backend.Process{}, false
	}
	return e.proc, true
}

func (r *Resolver) storeTuple(key backend.ConnKey, p backend.Process) {
	now := r.now()
	r.tupleMu.Lock()
	defer r.tupleMu.Unlock()
	if len(r.tuples) >= maxTuples {
		for k, e := range r.tuples {
			if now >= e.expires {
				delete(r.tuples, k)
			}
		}
		if len(r.tuples) >= maxTuples {
			clear(r.tuples) // a burst of distinct connections; they are all new anyway
		}
	}
	r.tuples[key] = tupleEntry{proc: p, expires: now + r.tupleTTL}
}

func (r *Resolver) resolve(dir backend.Direction, key backend.ConnKey, ifindex int) (backend.Process, bool) {
	s, err := r.find(key.Protocol, dir, key.Local, key.Remote, ifindex)
	if err != nil {
		if err != errNotFound && err != errClosed {
			r.logError("socket lookup failed", key, err)
		}
		return backend.Process{}, false
	}
	pid, ok := r.ownerOf(s.inode)
	if !ok {
		return backend.Process{}, false
	}
	path, ok := r.exePath(pid)
	if !ok {
		return backend.Process{}, false
	}
	return backend.Process{PID: pid, Path: path, UID: int32(s.uid)}, true
}

// logError logs at most one lookup error per ten seconds; a broken netlink socket would otherwise flood the log.
func (r *Resolver) logError(msg string, key backend.ConnKey, err error) {
	now := r.now()
	last := r.lastLog.Load()
	if last != 0 && now-time.Duration(last) < 10*time.Second || !r.lastLog.CompareAndSwap(last, int64(now)) {
		return
	}
	r.log.Warn(msg, "conn", key.String(), "err", err)
}

// ownerOf returns the PID holding socket inode, walking /proc when the cached owner no longer holds it.
func (r *Resolver) ownerOf(inode uint32) (int32, bool) {
	if pid, ok := r.validOwner(inode); ok {
		return pid, true
	}
	if !r.awaitScan(inode) {
		return 0, false
	}
	return r.validOwner(inode)
}

// validOwner returns the cached owner of inode if it still holds the socket.
func (r *Resolver) validOwner(inode uint32) (int32, bool) {
	r.ownerMu.Lock()
	o, ok := r.owners[inode]
	r.ownerMu.Unlock()
	if !ok || !r.proc.holdsSocket(o.pid, o.fd, inode) {
		return 0, false
	}
	r.ownerMu.Lock()
	if r.hot[(r.hotNext+hotPIDs-1)%hotPIDs] != o.pid {
		r.hot[r.hotNext] = o.pid
		r.hotNext = (r.hotNext + 1) % hotPIDs
	}
	r.ownerMu.Unlock()
	return o.pid, true
}

// awaitScan returns after a /proc walk that started after the call and looked for inode has finished. Walks
// start at most once per scanInterval; every lookup that misses meanwhile joins the next one. It reports false
// when the resolver was closed.
func (r *Resolver) awaitScan(inode uint32) bool {
	r.scanMu.Lock()
	r.pending[inode] = struct{}{}
	want := r.startedGen + 1 // the next walk to start takes the pending set, including inode
	for r.completedGen < want {
		if r.scanning {
			done := r.scanDone
			r.scanMu.Unlock()
			select {
			case <-done:
			case <-r.closed:
				return false
			}
			r.scanMu.Lock()
			continue
		}
		r.scanning = true
		done := make(chan struct{})
		r.scanDone = done
		wait := time.Duration(0)
		if r.everScanned {
			wait = r.lastScan + r.scanInterval - r.now()
		}
		r.scanMu.Unlock()

		if wait > 0 {
			t := time.NewTimer(wait)
			select {
			case <-t.C:
			case <-r.closed:
				t.Stop()
				r.scanMu.Lock()
				r.scanning = false
				close(done)
				r.scanMu.Unlock()
				return false
			}
		}

		r.scanMu.Lock()
		wanted := r.pending
		r.pending = make(map[uint32]struct{}, len(wanted))
		r.startedGen++
		gen := r.startedGen
		r.lastScan = r.now()
		r.everScanned = true
		r.scanMu.Unlock()

		r.scan(wanted)

		r.scanMu.Lock()
		r.completedGen = gen
		r.scanning = false
		close(done)
	}
	r.scanMu.Unlock()
	return true
}

// scan walks /proc/<pid>/fd looking for the wanted inodes, recording every socket it passes. It visits the
// recent owners first, then processes that appeared since the last walk, then the rest, and stops once all
// wanted inodes are found, so the usual miss (a known busy process opened another socket, or a new process
// started) costs a few directories, and only a socket whose process is gone costs a full walk.
func (r *Resolver) scan(wanted map[uint32]struct{}) {
	r.scans.Add(1)
	w := &r.walk
	pids, err := r.proc.listPIDs(w.bufs, w.pids[:0])
	w.pids = pids
	if err != nil {
		r.logError("listing processes failed", backend.ConnKey{}, err)
		return
	}
	clear(w.present)
	for _, pid := range pids {
		w.present[pid] = struct{}{}
	}

	r.ownerMu.Lock()
	hot := r.hot
	r.ownerMu.Unlock()
	clear(w.scanned) // used as "already ordered" while building the order
	order := w.order[:0]
	for _, pid := range hot {
		if _, ok := w.present[pid]; ok && pid != 0 {
			if _, dup := w.scanned[pid]; !dup {
				w.scanned[pid] = struct{}{}
				order = append(order, pid)
			}
		}
	}
	for _, pid := range pids {
		if _, old := w.known[pid]; !old {
			if _, dup := w.scanned[pid]; !dup {
				w.scanned[pid] = struct{}{}
				order = append(order, pid)
			}
		}
	}
	for _, pid := range pids {
		if _, dup := w.scanned[pid]; !dup {
			order = append(order, pid)
		}
	}
	w.order = order

	clear(w.scanned)
	clear(w.seen)
	found := w.found[:0]
	remaining := len(wanted)
	var cur int32
	record := func(fd int32, inode uint32) {
		if _, dup := w.seen[inode]; dup {
			return // shared with an earlier process (inherited); the first found stays the owner
		}
		w.seen[inode] = struct{}{}
		found = append(found, foundSocket{inode: inode, owner: owner{pid: cur, fd: fd}})
		if _, ok := wanted[inode]; ok {
			remaining--
		}
	}
	for _, pid := range order {
		cur = pid
		r.proc.socketsOf(pid, w.bufs, record)
		w.scanned[pid] = struct{}{}
		if remaining == 0 {
			break
		}
	}
	w.found = found

	r.ownerMu.Lock()
	for _, f := range found {
		r.owners[f.inode] = f.owner
	}
	for inode, o := range r.owners {
		_, alive := w.present[o.pid]
		_, scanned := w.scanned[o.pid]
		_, seen := w.seen[inode]
		if !alive || scanned && !seen {
			delete(r.owners, inode)
		}
	}
	r.ownerMu.Unlock()

	r.exeMu.Lock()
	for pid := range r.exes {
		if _, ok := w.present[pid]; !ok {
			delete(r.exes, pid)
		}
	}
	r.exeMu.Unlock()

	w.known, w.present = w.present, w.known
}

// exePath returns process pid's executable, from the cache when the PID still names the same process.
func (r *Resolver) exePath(pid int32) (string, bool) {
	var sb [statBufSize]byte
	comm, start, err := r.proc.readStat(pid, &sb)
	if err != nil {
		return "", false // gone
	}
	r.exeMu.Lock()
	e, ok := r.exes[pid]
	r.exeMu.Unlock()
	if ok && e.start == start && e.comm == string(comm) {
		return e.path, true
	}
	path, err := r.proc.readExe(pid)
	if err != nil {
		if !errors.Is(err, unix.ENOENT) || !r.alive(pid) {
			return "", false
		}
		path = "" // alive without an executable link (a kernel thread): known PID, unknown path
	}
	r.exeMu.Lock()
	r.exes[pid] = exeEntry{start: start, comm: string(comm), path: path}
	r.exeMu.Unlock()
	return path, true
}
