package process

import (
	"errors"
	"log/slog"
	"math"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/warden-fw/warden/backend"
	"github.com/warden-fw/warden/backend/nfqueue/bpfkit"
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

var _ backend.ImmediateProcessResolver = (*Resolver)(nil)

// socketFinder looks up the socket behind a connection; it is the sock_diag pool outside unit tests.
type socketFinder func(proto backend.Protocol, dir backend.Direction, local, remote netip.AddrPort, ifindex int) (sockInfo, error)

// Resolver finds the process behind a connection. It is safe for concurrent use.
type Resolver struct {
	log   *slog.Logger
	proc  procFS
	find  socketFinder
	alive func(pid int32) bool
	// now returns monotonic time since the resolver's creation.
	now     func() time.Duration
	diag    *diagPool    // nil in unit tests
	watcher *exitWatcher // nil in unit tests: records are then checked with alive
	bpf     *bpfOwners   // nil when eBPF is off or unavailable: every lookup uses /proc
	bpfErr  error        // why bpf is nil, when it was wanted
	// ringWait wakes the event ring's background reader; nil without the mirror.
	ringWait *ringWaiter
	// tupleErr is why bpf has no tuple map, when it was wanted.
	tupleErr error
	// exitHook, when set, is called with the PID of each watched process that exits (tests wait on it).
	exitHook atomic.Pointer[func(pid int32)]

	tupleTTL     time.Duration
	scanInterval time.Duration

	closeOnce sync.Once
	closed    chan struct{} // closed by Close, to wake waiters
	isClosed  atomic.Bool
	lastLog   atomic.Int64 // time.Duration of the last logged lookup error, for rate limiting
	scans     atomic.Uint64

	mapAnswers  atomic.Uint64
	procAnswers atomic.Uint64
	mapMisses   atomic.Uint64
	mapStale    atomic.Uint64
	mapFast     atomic.Uint64
	tupleHits   atomic.Uint64
	immediate   atomic.Uint64
	// mirror replays the programs' events (see mirror_linux.go), nil without one (or with Options.DisableMirror).
	mirror        *mirrorRing
	mirrorAnswers atomic.Uint64
	diagLookups   atomic.Uint64

	tupleMu sync.RWMutex // guards tuples
	tuples  map[backend.ConnKey]tupleEntry

	ownerMu sync.Mutex // guards the fields below
	owners  map[uint32]owner
	hot     [hotPIDs]int32
	hotNext int

	exeMu sync.Mutex // guards exes
	exes  map[int32]*procRecord

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
	rec     *procRecord
	uid     int32
	expires time.Duration
}

// owner is where a socket inode was last seen open.
type owner struct {
	pid int32
	fd  int32
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
// resolver using it, with the eBPF socket owner map when the system allows it. The caller must Close it.
func New(logger *slog.Logger) (*Resolver, error) {
	return NewWithOptions(logger, Options{})
}

// NewWithOptions is New with options. When the eBPF programs cannot be loaded or attached, it logs why once at
// info level and returns a resolver that uses /proc alone.
func NewWithOptions(logger *slog.Logger, opts Options) (*Resolver, error) {
	pool, err := newDiagPool()
	if err != nil {
		return nil, err
	}
	r := newResolver(logger, procFS{root: "/proc"}, pool.findSocket, processAlive)
	r.diag = pool
	if r.watcher, err = newExitWatcher(r.recordExited); err != nil {
		pool.close()
		return nil, err
	}
	if !opts.DisableEBPF {
		r.bpf, r.bpfErr = r.loadBPF(pool.slots[0].c.fd, !opts.DisableTupleMap, opts.DisableMirror || opts.DisableSocketStorage)
		if r.bpfErr != nil {
			r.log.Info("process attribution runs on /proc alone: eBPF socket owner map unavailable", "reason", r.bpfErr)
		}
	}
	if r.bpf != nil && r.bpf.mirror != nil && !opts.DisableMirror {
		r.mirror = r.bpf.mirror
		w, err := newRingWaiter(r.bpf.ringMap.FD())
		if err != nil {
			// The timer alone paces the reads; a burst may then overflow the ring, which resets the mirror.
			r.log.Warn("the event ring's reader cannot be woken; it reads on a timer alone", "err", err)
		}
		r.ringWait = w
		go r.syncMirror(r.mirror, w)
	}
	return r, nil
}

// loadBPF loads the eBPF programs. With withTuples it records outbound connections' tuples for the namespace
// of the socket fd: through socket storage and the mirror alone, or, with noStorage or where the kernel lacks
// what that needs, through the tuple map; when neither can be loaded (a kernel without SO_NETNS_COOKIE, atomics
// or bpf_get_netns_cookie for sock_ops), it logs why and loads the owner map alone.
func (r *Resolver) loadBPF(fd int, withTuples, noStorage bool) (*bpfOwners, error) {
	if !withTuples {
		return newBPFOwners(modeOwners, 0)
	}
	netns, err := bpfkit.NetnsCookie(fd)
	if err == nil {
		var b *bpfOwners
		if !noStorage {
			if b, err = newBPFOwners(modeStorage, netns); err == nil {
				return b, nil
			}
			r.log.Info("the attribution programs keep their records in hash maps: socket storage unavailable", "reason", err)
		}
		if b, err = newBPFOwners(modeTupleMaps, netns); err == nil {
			return b, nil
		}
	}
	r.tupleErr = err
	r.log.Info("outbound connections are resolved through sock_diag: eBPF connection tuple map unavailable", "reason", err)
	return newBPFOwners(modeOwners, 0)
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
		exes:         make(map[int32]*procRecord),
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

// The event ring is drained at every lookup, and by syncMirror while no connection is resolved, at intervals
// between mirrorSyncMin and mirrorSyncMax. The shortest interval lets the small ring absorb a steady 25 000
// new sockets a second (about 4 MB/s of events) that no lookup drains, as when no rule needs the process.
const (
	mirrorSyncMin = 5 * time.Millisecond
	mirrorSyncMax = time.Second
)

// syncMirror keeps the event ring drained between lookups until the resolver closes. Each read sets the wait
// before the next (see nextSyncWait): an idle daemon wakes once a second for it instead of twenty times. The
// programs cut a wait short when the ring is a quarter full (w; nil: the timer alone).
func (r *Resolver) syncMirror(m *mirrorRing, w *ringWaiter) {
	if w != nil {
		defer w.close()
	}
	for wait := mirrorSyncMin; r.sleep(w, wait); {
		drained, size := m.sync()
		wait = nextSyncWait(wait, drained, size)
	}
}

// sleep waits d, or less when the programs wake w (nil: a timer alone); false once the resolver closes.
func (r *Resolver) sleep(w *ringWaiter, d time.Duration) bool {
	if w != nil {
		return w.wait(d)
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-r.closed:
		return false
	case <-t.C:
		return true
	}
}

// nextSyncWait returns the wait before the next read of a ring of size bytes when the last read, after wait,
// drained that many bytes. It doubles the wait while reads find nothing. When they find events, it keeps the
// wait short enough that, at the rate just seen, the ring would be at most a quarter full by the next read;
// the rest of the ring absorbs a burst. Between mirrorSyncMin and mirrorSyncMax either way.
func nextSyncWait(wait time.Duration, drained, size int) time.Duration {
	next := 2 * wait
	if drained > 0 && size > 0 {
		next = min(next, time.Duration(float64(wait)*float64(size)/(4*float64(drained))))
	}
	return min(max(next, mirrorSyncMin), mirrorSyncMax)
}

// Close releases the netlink sockets. Lookups after Close report unknown.
func (r *Resolver) Close() error {
	r.closeOnce.Do(func() {
		r.isClosed.Store(true)
		close(r.closed)
		if r.ringWait != nil {
			r.ringWait.wake()
		}
		if r.diag != nil {
			r.diag.close()
		}
		if r.watcher != nil {
			r.watcher.close()
		}
		if r.bpf != nil {
			r.bpf.close()
		}
	})
	return nil
}

// Stats returns how lookups have been answered so far.
func (r *Resolver) Stats() Stats {
	var sockets int
	var resets, events uint64
	if r.mirror != nil {
		sockets, resets, events = r.mirror.stats()
	}
	return Stats{
		MirrorSockets: sockets, MirrorResets: resets, MirrorEvents: events,
		EBPF:          r.bpf != nil,
		MapAnswers:    r.mapAnswers.Load(),
		ProcAnswers:   r.procAnswers.Load(),
		MapMisses:     r.mapMisses.Load(),
		MapStale:      r.mapStale.Load(),
		MapFast:       r.mapFast.Load(),
		TupleMap:      r.bpf != nil && r.bpf.hasTuples(),
		SocketStorage: r.bpf != nil && r.bpf.mode == modeStorage,
		TupleAnswers:  r.tupleHits.Load(),
		DiagLookups:   r.diagLookups.Load(),
		Immediate:     r.immediate.Load(),
		Mirror:        r.mirror != nil,
		MirrorAnswers: r.mirrorAnswers.Load(),
	}
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
	key, ok := r.lookupKey(info)
	if !ok {
		return backend.Process{}, false
	}
	if e, ok := r.cachedTuple(key); ok {
		return backend.Process{PID: e.rec.pid, Path: e.rec.path, UID: e.uid}, true
	}
	rec, uid, ok := r.resolve(info.Direction, key, info.IfIndex, info.UID)
	if !ok {
		return backend.Process{}, false
	}
	if r.tupleTTL > 0 {
		r.storeTuple(key, tupleEntry{rec: rec, uid: uid})
	}
	return backend.Process{PID: rec.pid, Path: rec.path, UID: uid}, true
}

// ResolveProcessNow answers what it can without blocking: from the answer cache, or for an outbound
// connection by its tuple (the socket mirror, or two bpf(2) map lookups without it; no sock_diag, no /proc)
// when the owner's record is trusted as it is. ok false means "ask ResolveProcess".
func (r *Resolver) ResolveProcessNow(info *backend.Info) (backend.Process, bool) {
	key, ok := r.lookupKey(info)
	if !ok {
		return backend.Process{}, false
	}
	if e, ok := r.cachedTuple(key); ok {
		return backend.Process{PID: e.rec.pid, Path: e.rec.path, UID: e.uid}, true
	}
	if info.Direction != backend.Outbound || info.UID < 0 || r.bpf == nil {
		return backend.Process{}, false
	}
	rec, ok := r.ownerFromTuple(key, false)
	if !ok {
		return backend.Process{}, false
	}
	r.immediate.Add(1)
	return backend.Process{PID: rec.pid, Path: rec.path, UID: info.UID}, true
}

// lookupKey is the connection's key as the lookups use it, or false when info describes nothing to look up.
func (r *Resolver) lookupKey(info *backend.Info) (backend.ConnKey, bool) {
	if info == nil || !info.Protocol.HasPorts() || r.isClosed.Load() {
		return backend.ConnKey{}, false
	}
	key := backend.ConnKey{
		Protocol: info.Protocol,
		Local:    netip.AddrPortFrom(info.Local.Addr().Unmap(), info.Local.Port()),
		Remote:   netip.AddrPortFrom(info.Remote.Addr().Unmap(), info.Remote.Port()),
	}
	if !key.Local.Addr().IsValid() || !key.Remote.Addr().IsValid() || key.Local.Addr().Is4() != key.Remote.Addr().Is4() {
		return backend.ConnKey{}, false
	}
	return key, true
}

// cachedTuple returns a fresh cached answer whose process still exists.
func (r *Resolver) cachedTuple(key backend.ConnKey) (tupleEntry, bool) {
	r.tupleMu.RLock()
	e, ok := r.tuples[key]
	r.tupleMu.RUnlock()
	if !ok || r.now() >= e.expires {
		return tupleEntry{}, false
	}
	// The process may have exited since: then the socket may be gone or inherited, so look again.
	if !r.recordAlive(e.rec) {
		r.tupleMu.Lock()
		if cur, ok := r.tuples[key]; ok && cur == e {
			delete(r.tuples, key)
		}
		r.tupleMu.Unlock()
		return tupleEntry{}, false
	}
	return e, true
}

// recordAlive reports whether rec's process still runs: from the exit watcher's flag, without a system call,
// when the record is watched.
func (r *Resolver) recordAlive(rec *procRecord) bool {
	if rec.dead.Load() {
		return false
	}
	// pidfd is set before the record is published and never changes after.
	return rec.pidfd >= 0 || r.alive(rec.pid)
}

func (r *Resolver) storeTuple(key backend.ConnKey, e tupleEntry) {
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
	e.expires = now + r.tupleTTL
	r.tuples[key] = e
}

// resolve finds the socket, its owner and the owner's record, and returns the record and the socket's UID.
// queueUID is the socket's UID as the packet's queue reported it, backend.Unknown when it did not.
func (r *Resolver) resolve(dir backend.Direction, key backend.ConnKey, ifindex int, queueUID int32) (*procRecord, int32, bool) {
	// An outbound connection the programs saw needs no sock_diag round trip: its tuple names the socket. The
	// UID sock_diag would report is the socket's sk_uid, which the queue reported with the packet; without
	// it, sock_diag is asked so the answer stays complete.
	if dir == backend.Outbound && queueUID >= 0 && r.bpf != nil {
		if rec, ok := r.ownerFromTuple(key, true); ok {
			return rec, queueUID, true
		}
	}
	r.diagLookups.Add(1)
	s, err := r.find(key.Protocol, dir, key.Local, key.Remote, ifindex)
	if err != nil {
		if err != errNotFound && err != errClosed {
			r.logError("socket lookup failed", "conn", key.String(), "err", err)
		}
		return nil, 0, false
	}
	if r.bpf != nil && s.cookie != 0 {
		if rec, ok := r.ownerFromMap(s.cookie); ok {
			return rec, int32(s.uid), true
		}
	}
	pid, ok := r.ownerOf(s.inode)
	if !ok {
		return nil, 0, false
	}
	rec, ok := r.record(pid)
	if !ok {
		return nil, 0, false
	}
	r.procAnswers.Add(1)
	return rec, int32(s.uid), true
}

// ownerFromTuple returns the record of the process behind an outbound connection from the tuple map: the
// tuple names a socket cookie, and the cookie's owner entry must exist (sock_release deletes it, so a cookie of
// a closed socket, whose port another socket may have taken since, has none) and be trusted by the same rules
// as ownerFromEntry's. Anything else (no entry, a shared key, an untrusted owner) reports false, without
// touching the map counters: sock_diag then answers as before.
//
// Only keys with the local address are used. The programs also write address-less keys for a wildcard-bound
// UDP socket's unconnected sends, but such an entry can outlive the socket's exclusive hold of the port: once
// the socket connects, the kernel binds it to one address, another socket may bind the port on another address
// and send to the same peer, and the address-less key would name the first socket's process. Those sends are
// answered by sock_diag instead.
func (r *Resolver) ownerFromTuple(key backend.ConnKey, mayBlock bool) (*procRecord, bool) {
	k, ok := encodeTupleKey(uint8(key.Protocol), key.Local, key.Remote, true)
	if !ok {
		return nil, false
	}
	var e ownerEntry
	switch ans := r.mirrorLookup(&k, &e); ans {
	case mirrorNone:
		return nil, false
	case mirrorUnknown:
		cookie, ok := r.bpf.lookupTuple(&k)
		if !ok || cookie == tupleAmbiguous {
			return nil, false
		}
		if e, ok = r.bpf.lookup(cookie); !ok {
			return nil, false // closed
		}
	}
	rec := r.trustedRecord(&e)
	if rec != nil {
		r.mapFast.Add(1)
	} else if !mayBlock {
		return nil, false
	} else if rec, ok = r.recordStartedBy(e.tgid, bootTicks(e.seenNs)); !ok {
		return nil, false
	}
	r.noteHot(rec.pid)
	r.mapAnswers.Add(1)
	r.tupleHits.Add(1)
	return rec, true
}

// mirrorLookup asks the socket mirror (no system call) for k's owner, filling e when found.
func (r *Resolver) mirrorLookup(k *tupleKey, e *ownerEntry) mirrorAnswer {
	if r.mirror == nil {
		return mirrorUnknown
	}
	got, ans := r.mirror.lookup(k)
	switch ans {
	case mirrorFound:
		*e = got
		r.mirrorAnswers.Add(1)
	case mirrorNone:
		r.mirrorAnswers.Add(1)
	}
	return ans
}

// ownerFromMap returns the record of the process the eBPF map names as the socket's user, if that process
// still exists and had started when the map entry was written (else the PID was reused since).
func (r *Resolver) ownerFromMap(cookie uint64) (*procRecord, bool) {
	e, ok := r.bpf.lookup(cookie)
	if !ok {
		r.mapMisses.Add(1) // created before the programs were attached, accepted from a listener, or evicted
		return nil, false
	}
	return r.ownerFromEntry(&e)
}

// ownerFromEntry is ownerFromMap for a map entry already read: from the cached record without a system call
// when the record is known to describe the entry's writer (see trustedRecord), else from /proc/<pid>/stat.
func (r *Resolver) ownerFromEntry(e *ownerEntry) (*procRecord, bool) {
	if rec := r.trustedRecord(e); rec != nil {
		r.noteHot(rec.pid)
		r.mapFast.Add(1)
		r.mapAnswers.Add(1)
		return rec, true
	}
	rec, ok := r.recordStartedBy(e.tgid, bootTicks(e.seenNs))
	if !ok {
		r.mapStale.Add(1) // the recorded process is gone: whoever holds the socket now is found in /proc
		return nil, false
	}
	r.noteHot(rec.pid)
	r.mapAnswers.Add(1)
	return rec, true
}

// trustedRecord returns the cached record of the process that wrote e, when it can tell without a system call
// that the record describes that process as it is now, and nil when /proc must be asked. It trusts a record
// that is watched (its pidfd is in the exit watcher) and not dead, that had started by the entry's write time,
// and whose name is the one the entry holds. What each condition rules out:
//
//   - The PID was reused after the record was made (the record's process exited, another got its PID and wrote
//     the entry): the watcher marks a record dead when its process exits, which the kernel signals on the pidfd
//     before the parent can even reap it, so before the PID is free; reuse then needs the kernel to cycle
//     through the whole PID space as well. What is left is a watcher goroutine that has not run for all that
//     time, and a new process of the same name; we accept that. An unwatched record (the watcher is full, or
//     the kernel has no pidfds) has no such flag and always goes to /proc.
//   - The PID was reused between the map write and the record's creation (the entry names a process that has
//     exited; the record is of a later one): the later process started after the write, so its start time is
//     past the entry's time. Both are compared in clock ticks, so a PID freed and reused within one tick (10 ms)
//     of the write is not caught; that needs a PID-space cycle within the tick.
//   - The record was made from an image exec'd after the write: exec changes the name to the new program's
//     (unless both programs have the same file name), so the names differ and /proc answers, as it always did.
//   - The process exec'd after the write, and after the record was made: the record and the entry both name
//     the old program. The connect and sendmsg programs rewrite the entry when the calling thread's name differs
//     from the one recorded, so once the new program connects or sends (UDP) with the socket, or makes a new
//     one, the names differ and /proc answers. A socket the new program has not used that way since its exec
//     (a TCP connection made before it) is still attributed to the program that made it, where /proc would
//     name the new one.
//   - A thread renamed by its program (prctl PR_SET_NAME) records its own name, not the process's that
//     /proc/<pid>/stat shows: such entries never match and always go to /proc.
//
// A same-named exec (the same file name at another path) is missed here exactly as recordStartedBy misses it.
func (r *Resolver) trustedRecord(e *ownerEntry) *procRecord {
	r.exeMu.Lock()
	rec := r.exes[e.tgid]
	r.exeMu.Unlock()
	// pidfd is set before the record is published and never changes after.
	if rec == nil || rec.pidfd < 0 || rec.dead.Load() || rec.start > bootTicks(e.seenNs) || rec.comm != string(e.commBytes()) {
		return nil
	}
	return rec
}

// logError logs at most one lookup error per ten seconds; a broken netlink socket would otherwise flood the log.
func (r *Resolver) logError(msg string, args ...any) {
	now := r.now()
	last := r.lastLog.Load()
	if last != 0 && now-time.Duration(last) < 10*time.Second || !r.lastLog.CompareAndSwap(last, int64(now)) {
		return
	}
	r.log.Warn(msg, args...)
}

// ownerOf returns the PID holding socket inode, walking /proc when the cached owner no longer holds it.
func (r *Resolver) ownerOf(inode uint32) (int32, bool) {
	if pid, ok := r.validOwner(inode); ok {
		return pid, true
	}
	// Most new sockets belong to a process that opened one recently: looking through those few first avoids
	// waiting for the next rate-limited walk of all of /proc.
	if pid, ok := r.ownerAmongHot(inode); ok {
		return pid, true
	}
	if !r.awaitScan(inode) {
		return 0, false
	}
	return r.validOwner(inode)
}

// hotBuffers are the buffers of ownerAmongHot, which may run concurrently with a walk and with itself.
var hotBuffers = sync.Pool{New: func() any { return newScanBuffers() }}

// ownerAmongHot looks for inode among the fds of the recent socket owners and caches what it finds.
func (r *Resolver) ownerAmongHot(inode uint32) (int32, bool) {
	r.ownerMu.Lock()
	hot, next := r.hot, r.hotNext
	r.ownerMu.Unlock()
	bufs := hotBuffers.Get().(*scanBuffers)
	defer hotBuffers.Put(bufs)
	var found owner
	ok := false
	// Most recent owner first, and stop reading descriptors at the match: each one read is a system call.
	for i := 1; i <= hotPIDs && !ok; i++ {
		pid := hot[(next-i+hotPIDs)%hotPIDs]
		if pid == 0 {
			continue
		}
		r.proc.socketsUntil(pid, bufs, func(fd int32, ino uint32) bool {
			if ino == inode {
				found, ok = owner{pid: pid, fd: fd}, true
			}
			return ok
		})
	}
	if !ok {
		return 0, false
	}
	r.ownerMu.Lock()
	r.owners[inode] = found
	r.ownerMu.Unlock()
	return found.pid, true
}

// validOwner returns the cached owner of inode if it still holds the socket.
func (r *Resolver) validOwner(inode uint32) (int32, bool) {
	r.ownerMu.Lock()
	o, ok := r.owners[inode]
	r.ownerMu.Unlock()
	if !ok || !r.proc.holdsSocket(o.pid, o.fd, inode) {
		return 0, false
	}
	r.noteHot(o.pid)
	return o.pid, true
}

// noteHot makes pid the most recent socket owner, so a /proc walk visits it first.
func (r *Resolver) noteHot(pid int32) {
	r.ownerMu.Lock()
	if r.hot[(r.hotNext+hotPIDs-1)%hotPIDs] != pid {
		r.hot[r.hotNext] = pid
		r.hotNext = (r.hotNext + 1) % hotPIDs
	}
	r.ownerMu.Unlock()
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
		r.logError("listing processes failed", "err", err)
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

	var gone []*procRecord
	r.exeMu.Lock()
	for pid, rec := range r.exes {
		if _, ok := w.present[pid]; !ok {
			delete(r.exes, pid)
			gone = append(gone, rec)
		}
	}
	r.exeMu.Unlock()
	for _, rec := range gone {
		r.forget(rec) // an exit the watcher has not reported yet, or an unwatched record
	}

	w.known, w.present = w.present, w.known
}

// record returns the record of the process running as pid, from the cache while the PID still names the same
// process (same start time, so not a reused PID; same name, so (almost certainly) no exec since).
func (r *Resolver) record(pid int32) (*procRecord, bool) {
	return r.recordStartedBy(pid, math.MaxUint64)
}

// recordStartedBy is record for a process that must have started by maxStart (in /proc's clock ticks).
func (r *Resolver) recordStartedBy(pid int32, maxStart uint64) (*procRecord, bool) {
	var sb [statBufSize]byte
	comm, start, err := r.proc.readStat(pid, &sb)
	if err != nil || start > maxStart {
		return nil, false // gone, or a newer process under a reused PID
	}
	r.exeMu.Lock()
	rec := r.exes[pid]
	r.exeMu.Unlock()
	if rec != nil && rec.start == start && rec.comm == string(comm) && !rec.dead.Load() {
		return rec, true
	}

	pidfd := -1
	if r.watcher != nil {
		if pidfd = openPidfd(pid); pidfd >= 0 {
			// The pidfd pins whatever process has the PID now; make sure it is the one whose stat we read.
			c2, s2, err := r.proc.readStat(pid, &sb)
			if err != nil || s2 != start {
				unix.Close(pidfd)
				return nil, false
			}
			comm = c2
		}
	}
	path, err := r.proc.readExe(pid)
	if err != nil {
		if !errors.Is(err, unix.ENOENT) || !r.alive(pid) {
			if pidfd >= 0 {
				unix.Close(pidfd)
			}
			return nil, false
		}
		path = "" // alive without an executable link (a kernel thread): known PID, unknown path
	}
	nrec := &procRecord{pid: pid, start: start, comm: string(comm), path: path, pidfd: -1}
	if pidfd >= 0 {
		r.watcher.watch(nrec, pidfd)
	}
	r.exeMu.Lock()
	old := r.exes[pid]
	r.exes[pid] = nrec
	r.exeMu.Unlock()
	if old != nil {
		r.forget(old) // answers cached from it are stale (exec or PID reuse)
	}
	return nrec, true
}

// forget marks rec dead, so every cached answer pointing at it is looked up afresh.
func (r *Resolver) forget(rec *procRecord) {
	if r.watcher != nil {
		r.watcher.forget(rec)
		return
	}
	rec.dead.Store(true)
}

// recordExited runs on the watcher goroutine when a watched process exits.
func (r *Resolver) recordExited(rec *procRecord) {
	r.exeMu.Lock()
	if r.exes[rec.pid] == rec {
		delete(r.exes, rec.pid)
	}
	r.exeMu.Unlock()
	if hook := r.exitHook.Load(); hook != nil {
		(*hook)(rec.pid)
	}
}
