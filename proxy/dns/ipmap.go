package dns

import (
	"net/netip"
	"sync"
)

// ipMap remembers, for each address an answer carried, which name the application asked for and the CNAME
// chain that led there. The pipeline reads it once per new connection, so reads take a shard's read lock and
// do not allocate. It is bounded by generations: each shard fills a current map; when that is full it becomes
// the old map (the previous old one is dropped) and a new current map starts. A read looks in both.
type ipMap struct {
	shards [ipShards]ipShard
	half   int // entries per shard and generation
}

const ipShards = 32

type ipShard struct {
	mu       sync.RWMutex
	cur, old map[netip.Addr]ipEntry
}

type ipEntry struct {
	names   []string // shared with the cache entry; never modified
	expires int64
}

func newIPMap(size int) *ipMap {
	m := &ipMap{half: max(1, size/ipShards/2)}
	for i := range m.shards {
		m.shards[i].cur = make(map[netip.Addr]ipEntry)
	}
	return m
}

func (m *ipMap) shard(ip netip.Addr) *ipShard {
	b := ip.As16()
	// The low bytes vary most between addresses (v4-mapped addresses keep their prefix constant).
	h := uint32(b[15]) | uint32(b[14])<<8 | uint32(b[13])<<16 | uint32(b[12])<<24
	h ^= uint32(b[7]) | uint32(b[6])<<8
	h *= 0x9E3779B1
	return &m.shards[h>>27]
}

// lookup returns the names recorded for ip, or nil.
func (m *ipMap) lookup(ip netip.Addr, now int64) []string {
	ip = ip.Unmap()
	sh := m.shard(ip)
	sh.mu.RLock()
	e, ok := sh.cur[ip]
	if !ok {
		e, ok = sh.old[ip]
	}
	sh.mu.RUnlock()
	if !ok || now >= e.expires {
		return nil
	}
	return e.names
}

// record remembers names for ip until expires. The latest answer wins: when several names share an address
// (CDNs), the one asked for last is the best guess for the connection that follows. Re-recording what is
// already there takes only the read lock, so serving the same cached answer again costs no write.
func (m *ipMap) record(ip netip.Addr, names []string, expires int64) {
	sh := m.shard(ip)
	sh.mu.RLock()
	e, ok := sh.cur[ip]
	sh.mu.RUnlock()
	if ok && e.expires >= expires && len(e.names) > 0 && &e.names[0] == &names[0] {
		return
	}
	sh.mu.Lock()
	if _, ok := sh.cur[ip]; !ok && len(sh.cur) >= m.half {
		sh.old, sh.cur = sh.cur, make(map[netip.Addr]ipEntry, m.half)
	}
	sh.cur[ip] = ipEntry{names: names, expires: expires}
	sh.mu.Unlock()
}

func (m *ipMap) len(now int64) int {
	n := 0
	for i := range m.shards {
		sh := &m.shards[i]
		sh.mu.RLock()
		for _, e := range sh.cur {
			if now < e.expires {
				n++
			}
		}
		for ip, e := range sh.old {
			if _, dup := sh.cur[ip]; !dup && now < e.expires {
				n++
			}
		}
		sh.mu.RUnlock()
	}
	return n
}
