package firewall

import (
	"sync"
	"sync/atomic"

	"github.com/warden-fw/warden/backend"
)

// Conn is one tracked connection. Fields that never change after insertion are plain; the decision,
// last-seen time and byte counts change concurrently and are atomic.
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

	decision atomic.Uint32
	rule     atomic.Pointer[ruleRef]
	lastSeen atomic.Int64 // coarse clock, Unix seconds
	BytesTx  atomic.Uint64
	BytesRx  atomic.Uint64
	// Own marks Warden's own connections: they are never re-evaluated.
	Own bool
}

// ruleRef names what decided a connection. It is immutable and shared, so updating it is one pointer store.
type ruleRef struct {
	Name   string // rule name, "" for a default
	Index  int    // rule index, -1 for anything but a rule
	Source string // "rule", "default", "hook", "own", "failed"
}

// Decision returns the connection's current decision.
func (c *Conn) Decision() backend.Decision { return unpackDecision(c.decision.Load()) }

// Rule returns the name, index and source of what decided the connection.
func (c *Conn) Rule() (name string, index int, source string) {
	r := c.rule.Load()
	return r.Name, r.Index, r.Source
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

const connShards = 64

// connTable maps connection keys to connections. It is sharded so that the two queue goroutines rarely
// contend, and bounded: when full, an old entry of the same shard is evicted.
type connTable struct {
	shards   [connShards]connShard
	perShard int
	count    atomic.Int64
	evicted  atomic.Uint64
}

type connShard struct {
	mu sync.RWMutex
	m  map[backend.ConnKey]*Conn
	_  [32]byte // 24 (RWMutex) + 8 (map) + 32 = 64: one shard per cache line, so the two queue goroutines do not false-share
}

func newConnTable(max int) *connTable {
	t := &connTable{perShard: max / connShards}
	if t.perShard < 1 {
		t.perShard = 1
	}
	for i := range t.shards {
		t.shards[i].m = make(map[backend.ConnKey]*Conn)
	}
	return t
}

func (t *connTable) shard(k *backend.ConnKey) *connShard {
	a := k.Remote.Addr().As16()
	h := uint32(k.Local.Port())*0x9e3779b1 ^ uint32(k.Remote.Port())*0x85ebca6b ^
		(uint32(a[12])<<24|uint32(a[13])<<16|uint32(a[14])<<8|uint32(a[15]))*0xc2b2ae35 ^ uint32(k.Protocol)
	h ^= h >> 16
	return &t.shards[h%connShards]
}

func (t *connTable) get(k backend.ConnKey) *Conn {
	s := t.shard(&k)
	s.mu.RLock()
	c := s.m[k]
	s.mu.RUnlock()
	return c
}

// insert adds c unless a connection with its key exists, in which case it returns the existing one (two
// packets of a new connection may be decided concurrently; the first decision stands).
func (t *connTable) insert(c *Conn) (*Conn, bool) {
	s := t.shard(&c.Key)
	s.mu.Lock()
	defer s.mu.Unlock()
	if old, ok := s.m[c.Key]; ok {
		return old, false
	}
	if len(s.m) >= t.perShard {
		t.evictOneLocked(s)
	}
	s.m[c.Key] = c
	t.count.Add(1)
	return c, true
}

// evictOneLocked removes the least recently seen of a few entries (map iteration order is random, so this
// samples the shard).
func (t *connTable) evictOneLocked(s *connShard) {
	var victim *Conn
	n := 0
	for _, c := range s.m {
		if victim == nil || c.lastSeen.Load() < victim.lastSeen.Load() {
			victim = c
		}
		if n++; n == 8 {
			break
		}
	}
	if victim != nil {
		delete(s.m, victim.Key)
		t.count.Add(-1)
		t.evicted.Add(1)
	}
}

func (t *connTable) remove(k backend.ConnKey) bool {
	s := t.shard(&k)
	s.mu.Lock()
	_, ok := s.m[k]
	if ok {
		delete(s.m, k)
		t.count.Add(-1)
	}
	s.mu.Unlock()
	return ok
}

// each calls f for every connection. f must not touch the table.
func (t *connTable) each(f func(*Conn)) {
	for i := range t.shards {
		s := &t.shards[i]
		s.mu.RLock()
		for _, c := range s.m {
			f(c)
		}
		s.mu.RUnlock()
	}
}

// expire removes connections last seen before the cutoff for their protocol.
func (t *connTable) expire(cutoff func(backend.Protocol) int64) int {
	n := 0
	for i := range t.shards {
		s := &t.shards[i]
		s.mu.Lock()
		for k, c := range s.m {
			if c.lastSeen.Load() < cutoff(k.Protocol) {
				delete(s.m, k)
				n++
			}
		}
		s.mu.Unlock()
	}
	t.count.Add(int64(-n))
	return n
}

func (t *connTable) len() int { return int(t.count.Load()) }
