package dns

import (
	"encoding/binary"
	"hash/maphash"
	"net/netip"
	"strings"
	"sync"

	mdns "github.com/miekg/dns"
)

// entry is one answer as the cache keeps it: packed, so serving it copies bytes and patches the ID, the
// question's case, the flags and the TTLs in place. Everything but the list links is immutable once built,
// so a reader may use an entry after dropping the shard lock.
type entry struct {
	key    string
	msg    []byte   // ID 0, question name in lower case, no OPT record
	ttlOff []uint16 // offsets of the TTL fields in msg
	ttls   []uint32 // the TTLs as received
	stored int64    // clock reading (ns) when it was received
	// ttl is how long the answer may be served from the cache, in seconds; 0 means not cached.
	ttl     uint32
	expires int64
	// names holds the query name and then the CNAME chain it led to, lower case, without the trailing dot.
	names []string
	// addrs holds the A/AAAA addresses of the chain's last name.
	addrs []netip.Addr

	prev, next *entry // LRU links, guarded by the shard's mutex
}

const cacheShards = 16

// cache is a bounded LRU of answers, sharded so concurrent hits rarely share a lock.
type cache struct {
	seed   maphash.Seed
	shards [cacheShards]cacheShard
}

type cacheShard struct {
	mu   sync.Mutex
	m    map[string]*entry
	head entry // sentinel: head.next is the most recently used entry, head.prev the least
	max  int
}

func newCache(size int) *cache {
	c := &cache{seed: maphash.MakeSeed()}
	per := max(1, (size+cacheShards-1)/cacheShards)
	for i := range c.shards {
		sh := &c.shards[i]
		sh.m = make(map[string]*entry)
		sh.head.next, sh.head.prev = &sh.head, &sh.head
		sh.max = per
	}
	return c
}

func (c *cache) shard(key []byte) *cacheShard {
	return &c.shards[maphash.Bytes(c.seed, key)%cacheShards]
}

// get returns the live entry for key, or nil. An expired entry is removed.
func (c *cache) get(key []byte, now int64) *entry {
	sh := c.shard(key)
	sh.mu.Lock()
	e := sh.m[string(key)]
	if e == nil {
		sh.mu.Unlock()
		return nil
	}
	if now >= e.expires {
		sh.removeLocked(e)
		sh.mu.Unlock()
		return nil
	}
	if sh.head.next != e {
		e.unlink()
		sh.pushFrontLocked(e)
	}
	sh.mu.Unlock()
	return e
}

// put stores e (replacing any entry with its key), evicting the least recently used entry when full.
func (c *cache) put(e *entry) {
	sh := c.shard([]byte(e.key))
	sh.mu.Lock()
	if old := sh.m[e.key]; old != nil {
		sh.removeLocked(old)
	}
	for len(sh.m) >= sh.max && sh.head.prev != &sh.head {
		sh.removeLocked(sh.head.prev)
	}
	sh.m[e.key] = e
	sh.pushFrontLocked(e)
	sh.mu.Unlock()
}

func (c *cache) len() int {
	n := 0
	for i := range c.shards {
		sh := &c.shards[i]
		sh.mu.Lock()
		n += len(sh.m)
		sh.mu.Unlock()
	}
	return n
}

func (sh *cacheShard) removeLocked(e *entry) {
	delete(sh.m, e.key)
	e.unlink()
}

func (sh *cacheShard) pushFrontLocked(e *entry) {
	e.prev, e.next = &sh.head, sh.head.next
	sh.head.next.prev = e
	sh.head.next = e
}

func (e *entry) unlink() {
	e.prev.next, e.next.prev = e.next, e.prev
	e.prev, e.next = nil, nil
}

// appendKey appends the cache key of a question: the lower-case name, then type, class and the request bits
// that change the answer (DO, CD).
func appendKey(dst []byte, name string, qtype, qclass uint16, do, cd bool) []byte {
	for i := 0; i < len(name); i++ {
		ch := name[i]
		if 'A' <= ch && ch <= 'Z' {
			ch += 'a' - 'A'
		}
		dst = append(dst, ch)
	}
	var bits byte
	if do {
		bits |= 1
	}
	if cd {
		bits |= 2
	}
	return append(dst, 0, byte(qtype>>8), byte(qtype), byte(qclass>>8), byte(qclass), bits)
}

// newEntry builds an entry from an upstream reply to the question (lower-case fully qualified name, type,
// class). It takes ownership of r and modifies it.
func newEntry(key string, r *mdns.Msg, lowerName string, qtype, qclass uint16, now int64) (*entry, error) {
	r.Id = 0
	r.Authoritative = false // we answer from elsewhere
	r.Question = []mdns.Question{{Name: lowerName, Qtype: qtype, Qclass: qclass}}
	extra := r.Extra[:0]
	for _, rr := range r.Extra {
		// The OPT record is per hop: serving adds one when the client sent one. TSIG never passes through.
		switch rr.Header().Rrtype {
		case mdns.TypeOPT, mdns.TypeTSIG, mdns.TypeSIG:
			continue
		}
		extra = append(extra, rr)
	}
	r.Extra = extra
	r.Compress = true
	packed, err := r.Pack()
	if err != nil {
		return nil, err
	}
	offs, err := ttlOffsets(packed, nil)
	if err != nil {
		return nil, err
	}
	e := &entry{key: key, msg: packed, ttlOff: offs, ttls: make([]uint32, len(offs)), stored: now}
	minTTL := uint32(maxCacheTTL)
	for i, o := range offs {
		e.ttls[i] = binary.BigEndian.Uint32(packed[o:])
		minTTL = min(minTTL, e.ttls[i])
	}

	switch {
	case r.Truncated:
		// A truncated answer is incomplete; never cache it.
	case r.Rcode == mdns.RcodeSuccess && len(r.Answer) > 0:
		e.ttl = minTTL
	case r.Rcode == mdns.RcodeSuccess || r.Rcode == mdns.RcodeNameError:
		// Negative answer (NODATA or NXDOMAIN): RFC 2308 caches it for the SOA's TTL, bounded by its
		// minimum field; without a SOA it is not cached.
		for _, rr := range r.Ns {
			if soa, ok := rr.(*mdns.SOA); ok {
				e.ttl = min(soa.Hdr.Ttl, soa.Minttl, maxNegativeTTL)
				break
			}
		}
	}
	e.expires = now + int64(e.ttl)*1e9

	cur := lowerName
	e.names = append(e.names, trimDot(cur))
	for range 16 { // CNAME chains longer than this are broken or hostile
		next := ""
		for _, rr := range r.Answer {
			if c, ok := rr.(*mdns.CNAME); ok && strings.EqualFold(c.Hdr.Name, cur) {
				next = strings.ToLower(c.Target)
				break
			}
		}
		if next == "" || next == cur {
			break
		}
		cur = next
		e.names = append(e.names, trimDot(cur))
	}
	for _, rr := range r.Answer {
		var ip netip.Addr
		switch a := rr.(type) {
		case *mdns.A:
			ip, _ = netip.AddrFromSlice(a.A)
		case *mdns.AAAA:
			ip, _ = netip.AddrFromSlice(a.AAAA)
		default:
			continue
		}
		if ip.IsValid() && strings.EqualFold(rr.Header().Name, cur) {
			e.addrs = append(e.addrs, ip.Unmap())
		}
	}
	return e, nil
}

func trimDot(s string) string {
	if len(s) > 1 {
		return strings.TrimSuffix(s, ".")
	}
	return s
}
