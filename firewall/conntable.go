package firewall

import (
	"net/netip"
	"sync"
	"sync/atomic"

	"github.com/warden-fw/warden/backend"
)

// Conn is a tracked connection as the pipeline hands it out (to OnDecision, Lookup and re-evaluation): a copy
// of the table's entry with its names resolved. Changing it changes nothing in the table.
type Conn struct {
	Key       backend.ConnKey
	Direction backend.Direction
	PID       int32
	UID       int32
	App       string
	Interface string
	Domain    string
	// Created is when the connection was first decided (Unix nanoseconds).
	Created int64
	// Own marks Warden's own connections: they are never re-evaluated.
	Own bool

	decision backend.Decision
	rule     *ruleRef
}

// ruleRef names what decided a connection. It is immutable and shared.
type ruleRef struct {
	Name   string // rule name, "" for a default
	Index  int    // rule index, -1 for anything but a rule
	Source string // "rule", "default", "hook", "own", "failed"
}

// Decision returns the connection's decision.
func (c *Conn) Decision() backend.Decision { return c.decision }

// Rule returns the name, index and source of what decided the connection; for a Conn the pipeline did not
// hand out (nothing decided it), "", -1 and "".
func (c *Conn) Rule() (name string, index int, source string) {
	if c.rule == nil {
		return "", -1, ""
	}
	return c.rule.Name, c.rule.Index, c.rule.Source
}

func packDecision(d backend.Decision) uint32 {
	v := uint32(d.Verdict)
	if d.Permanent {
		v |= 1 << 8
	}
	if d.Final {
		v |= 1 << 9
	}
	return v | uint32(d.Route)<<10
}

func unpackDecision(v uint32) backend.Decision {
	return backend.Decision{Verdict: backend.Verdict(v & 0xff), Permanent: v&(1<<8) != 0, Final: v&(1<<9) != 0,
		Route: uint8(v >> 10)}
}

// connKey is backend.ConnKey without pointers (a netip.Addr holds one, for its zone). With pointer-free keys
// and entries the table's maps are never scanned by the garbage collector: with tens of thousands of
// connections, scanning them made every collection's mark phase last milliseconds, during which one of the
// two processors of a small machine marks instead of answering packets. Zones are not kept: no backend sets
// them on a connection's addresses.
type connKey struct {
	local, remote [16]byte
	lport, rport  uint16
	proto         backend.Protocol
	flags         uint8
}

// connKey flags: which addresses are valid, and which are IPv4 (As16 maps IPv4 into IPv6).
const (
	keyLocalValid = 1 << iota
	keyLocal4
	keyRemoteValid
	keyRemote4
)

func packKey(k *backend.ConnKey) connKey {
	c := connKey{local: k.Local.Addr().As16(), remote: k.Remote.Addr().As16(), lport: k.Local.Port(),
		rport: k.Remote.Port(), proto: k.Protocol}
	if a := k.Local.Addr(); a.IsValid() {
		c.flags |= keyLocalValid
		if a.Is4() {
			c.flags |= keyLocal4
		}
	}
	if a := k.Remote.Addr(); a.IsValid() {
		c.flags |= keyRemoteValid
		if a.Is4() {
			c.flags |= keyRemote4
		}
	}
	return c
}

func (c *connKey) unpack() backend.ConnKey {
	addr := func(b [16]byte, valid, is4 bool) netip.Addr {
		switch {
		case !valid:
			return netip.Addr{}
		case is4:
			return netip.AddrFrom16(b).Unmap()
		default:
			return netip.AddrFrom16(b)
		}
	}
	return backend.ConnKey{Protocol: c.proto,
		Local:  netip.AddrPortFrom(addr(c.local, c.flags&keyLocalValid != 0, c.flags&keyLocal4 != 0), c.lport),
		Remote: netip.AddrPortFrom(addr(c.remote, c.flags&keyRemoteValid != 0, c.flags&keyRemote4 != 0), c.rport),
	}
}

// connEntry is what the table keeps of a connection. Names are ids in the table's intern tables.
type connEntry struct {
	created  int64
	lastSeen int64 // coarse clock, Unix seconds
	pid, uid int32
	app      uint32
	iface    uint32
	domain   uint32
	rule     uint32
	decision uint32
	dir      backend.Direction
	own      bool
}

const connShards = 64

// shardPresize is how many connections each shard's map holds from the start: 896 fill the largest single table
// Go's maps keep (1 024 slots at a 7/8 load), so a table of up to 57 344 connections never grows. Growing is
// not cheap on the packet path: every doubling copies the shard and touches fresh memory (in a daemon's first
// seconds under load, about 2 µs of every new connection's decision went there). It costs 6 MiB at start,
// which a busy machine's table reaches anyway and, since Go's maps never shrink, keeps.
const shardPresize = 896

// connTable maps connection keys to connections. It is sharded so that the queue goroutines rarely contend,
// and bounded: when full, an old entry of the same shard is evicted. Keys and entries hold no pointers; the
// strings and rule references they name live once each in intern tables.
type connTable struct {
	shards   [connShards]connShard
	perShard int
	count    atomic.Int64
	evicted  atomic.Uint64

	names internTable[string]
	rules internTable[*ruleRef]
}

type connShard struct {
	mu sync.RWMutex
	m  map[connKey]connEntry
	_  [32]byte // 24 (RWMutex) + 8 (map) + 32 = 64: one shard per cache line, so the queue goroutines do not false-share
}

func newConnTable(max int) *connTable {
	t := &connTable{perShard: max / connShards}
	if t.perShard < 1 {
		t.perShard = 1
	}
	for i := range t.shards {
		t.shards[i].m = make(map[connKey]connEntry, min(t.perShard, shardPresize))
	}
	t.names.init("")
	t.rules.init(nil)
	return t
}

func (t *connTable) shard(k *connKey) *connShard {
	h := uint32(k.lport)*0x9e3779b1 ^ uint32(k.rport)*0x85ebca6b ^
		(uint32(k.remote[12])<<24|uint32(k.remote[13])<<16|uint32(k.remote[14])<<8|uint32(k.remote[15]))*0xc2b2ae35 ^
		uint32(k.proto)
	h ^= h >> 16
	return &t.shards[h%connShards]
}

// touch returns the decision of the connection with key k and records that it was seen at now: by a packet,
// or by a listing of the kernel's live connections. It never moves a last-seen time back. Most calls are
// misses (a new connection's first packet), which need only the read lock.
func (t *connTable) touch(k *backend.ConnKey, now int64) (backend.Decision, bool) {
	ck := packKey(k)
	s := t.shard(&ck)
	s.mu.RLock()
	e, ok := s.m[ck]
	s.mu.RUnlock()
	if ok && e.lastSeen < now {
		s.mu.Lock()
		if e2, still := s.m[ck]; still && e2.lastSeen < now {
			e2.lastSeen = now
			s.m[ck] = e2
		}
		s.mu.Unlock()
	}
	return unpackDecision(e.decision), ok
}

// forgetEnded removes the connections the kernel must be tracking while they live (a protocol with ports, a
// decision that lets packets pass) that were last seen before cutoff, and returns how many it removed.
func (t *connTable) forgetEnded(cutoff int64) int {
	return t.removeWhere(func(k connKey, e connEntry) bool {
		return e.lastSeen < cutoff && k.proto.HasPorts() && passes(unpackDecision(e.decision))
	})
}

// passes reports whether a decision lets the connection's packets through, so that the kernel tracks it.
func passes(d backend.Decision) bool {
	switch d.Verdict {
	case backend.Accept, backend.RerouteToNameserver, backend.RerouteToTunnel, backend.RerouteToSplitTun:
		return true
	}
	return false
}

// get returns a copy of the connection with key k.
func (t *connTable) get(k backend.ConnKey) (Conn, bool) {
	ck := packKey(&k)
	s := t.shard(&ck)
	s.mu.RLock()
	e, ok := s.m[ck]
	s.mu.RUnlock()
	if !ok {
		return Conn{}, false
	}
	return t.view(&ck, &e), true
}

// view resolves an entry's names.
func (t *connTable) view(k *connKey, e *connEntry) Conn {
	return Conn{Key: k.unpack(), Direction: e.dir, PID: e.pid, UID: e.uid, App: t.names.get(e.app),
		Interface: t.names.get(e.iface), Domain: t.names.get(e.domain), Created: e.created, Own: e.own,
		decision: unpackDecision(e.decision), rule: t.rules.get(e.rule)}
}

// insert adds c, seen at now, unless a connection with its key exists, in which case it returns the existing
// one's decision (two packets of a new connection may be decided concurrently; the first decision stands).
func (t *connTable) insert(c *Conn, now int64) (backend.Decision, bool) {
	ck := packKey(&c.Key)
	s := t.shard(&ck)
	s.mu.Lock()
	defer s.mu.Unlock()
	if old, ok := s.m[ck]; ok {
		return unpackDecision(old.decision), false
	}
	if len(s.m) >= t.perShard {
		t.evictOneLocked(s)
	}
	s.m[ck] = connEntry{created: c.Created, lastSeen: now, pid: c.PID, uid: c.UID, app: t.names.acquire(c.App),
		iface: t.names.acquire(c.Interface), domain: t.names.acquire(c.Domain), rule: t.rules.acquire(c.rule),
		decision: packDecision(c.decision), dir: c.Direction, own: c.Own}
	t.count.Add(1)
	return c.decision, true
}

// release gives back the names an entry held.
func (t *connTable) release(e *connEntry) {
	t.names.release(e.app)
	t.names.release(e.iface)
	t.names.release(e.domain)
	t.rules.release(e.rule)
}

// evictOneLocked removes the least recently seen of a few entries (map iteration order is random, so this
// samples the shard).
func (t *connTable) evictOneLocked(s *connShard) {
	var victim connKey
	var oldest connEntry
	n := 0
	for k, e := range s.m {
		if n == 0 || e.lastSeen < oldest.lastSeen {
			victim, oldest = k, e
		}
		if n++; n == 8 {
			break
		}
	}
	if n > 0 {
		delete(s.m, victim)
		t.release(&oldest)
		t.count.Add(-1)
		t.evicted.Add(1)
	}
}

func (t *connTable) remove(k backend.ConnKey) bool {
	ck := packKey(&k)
	s := t.shard(&ck)
	s.mu.Lock()
	e, ok := s.m[ck]
	if ok {
		delete(s.m, ck)
		t.release(&e)
		t.count.Add(-1)
	}
	s.mu.Unlock()
	return ok
}

// each calls f with a copy of every connection. f must not touch the table, nor keep the pointer: one Conn is
// reused for every call (a fresh one per connection would be an allocation each).
func (t *connTable) each(f func(*Conn)) {
	var c Conn
	for i := range t.shards {
		s := &t.shards[i]
		s.mu.RLock()
		for k, e := range s.m {
			c = t.view(&k, &e)
			f(&c)
		}
		s.mu.RUnlock()
	}
}

// update calls f with a copy of every connection and stores the decision and rule it returns. f must not
// touch the table, nor keep the pointer (see each).
func (t *connTable) update(f func(*Conn) (backend.Decision, *ruleRef)) {
	var c Conn
	for i := range t.shards {
		s := &t.shards[i]
		s.mu.Lock()
		for k, e := range s.m {
			c = t.view(&k, &e)
			d, ref := f(&c)
			if ref != c.rule {
				t.rules.release(e.rule)
				e.rule = t.rules.acquire(ref)
			}
			e.decision = packDecision(d)
			s.m[k] = e
		}
		s.mu.Unlock()
	}
}

// expire removes connections last seen before the cutoff for their protocol.
func (t *connTable) expire(cutoff func(backend.Protocol) int64) int {
	return t.removeWhere(func(k connKey, e connEntry) bool { return e.lastSeen < cutoff(k.proto) })
}

// removeWhere removes the connections stale reports, returns how many, and then lets go of names no connection
// uses any more (also those that evictions and removals left). stale takes copies: pointers to the loop's
// variables would escape through the func value, one allocation per tracked connection and sweep.
func (t *connTable) removeWhere(stale func(connKey, connEntry) bool) int {
	n := 0
	for i := range t.shards {
		s := &t.shards[i]
		s.mu.Lock()
		for k, e := range s.m {
			if stale(k, e) {
				delete(s.m, k)
				t.release(&e)
				n++
			}
		}
		s.mu.Unlock()
	}
	t.count.Add(int64(-n))
	t.names.sweep()
	t.rules.sweep()
	return n
}

func (t *connTable) len() int { return int(t.count.Load()) }

// internTable stores each distinct value once and names it by a small id, counting the connections that use
// it. Id 0 is the zero value and is never counted or freed. Ids whose count fell to zero are freed by sweep,
// not at once, so that acquire needs only the read lock when the value is already known (the common case:
// the same application, interface and domain recur).
type internTable[V comparable] struct {
	mu   sync.RWMutex
	ids  map[V]uint32
	vals []V
	refs []atomic.Int32 // grows by replacement, under the write lock
	free []uint32
}

func (it *internTable[V]) init(zero V) {
	it.ids = map[V]uint32{zero: 0}
	it.vals = []V{zero}
	it.refs = make([]atomic.Int32, 1)
}

func (it *internTable[V]) acquire(v V) uint32 {
	it.mu.RLock()
	id, ok := it.ids[v]
	if ok && id != 0 {
		it.refs[id].Add(1)
	}
	it.mu.RUnlock()
	if ok {
		return id
	}
	it.mu.Lock()
	defer it.mu.Unlock()
	if id, ok := it.ids[v]; ok { // added meanwhile
		if id != 0 {
			it.refs[id].Add(1)
		}
		return id
	}
	if n := len(it.free); n > 0 {
		id = it.free[n-1]
		it.free = it.free[:n-1]
		it.vals[id] = v
	} else {
		id = uint32(len(it.vals))
		it.vals = append(it.vals, v)
		if int(id) >= len(it.refs) {
			refs := make([]atomic.Int32, 2*len(it.refs)+1)
			for i := range it.refs {
				refs[i].Store(it.refs[i].Load())
			}
			it.refs = refs
		}
	}
	it.ids[v] = id
	it.refs[id].Store(1)
	return id
}

func (it *internTable[V]) release(id uint32) {
	if id == 0 {
		return
	}
	it.mu.RLock()
	it.refs[id].Add(-1)
	it.mu.RUnlock()
}

func (it *internTable[V]) get(id uint32) V {
	it.mu.RLock()
	v := it.vals[id]
	it.mu.RUnlock()
	return v
}

// sweep frees the ids no connection uses. Under the write lock no acquire can revive one meanwhile.
func (it *internTable[V]) sweep() {
	it.mu.Lock()
	defer it.mu.Unlock()
	var zero V
	for id := 1; id < len(it.vals); id++ {
		if it.refs[id].Load() == 0 && it.vals[id] != zero {
			delete(it.ids, it.vals[id])
			it.vals[id] = zero
			it.free = append(it.free, uint32(id))
		}
	}
}

// size returns how many values are stored (for tests).
func (it *internTable[V]) size() int {
	it.mu.RLock()
	defer it.mu.RUnlock()
	return len(it.ids) - 1
}
