// Package redirect holds the table the firewall pipeline and the split-tunnel proxy share: at verdict time the
// pipeline records where a split-tunnelled connection was going, the kernel redirects the connection to the
// proxy, and the proxy looks the original destination (and the interface to leave through) up here.
//
// The table is touched once per split connection, not per packet, so a plain mutex is enough. Entries live for
// a short TTL: a redirected connection reaches the proxy microseconds after its verdict, so an entry nobody
// consumed within the TTL belongs to a connection that never arrived.
package redirect

import (
	"net/netip"
	"sync"
	"time"

	"github.com/warden-fw/warden/backend"
)

// Entry is one split-tunnelled flow, recorded by the pipeline when it gives RerouteToSplitTun.
type Entry struct {
	// Protocol is backend.TCP or backend.UDP.
	Protocol backend.Protocol
	// Client is the application's local address:port (the source of the original connection).
	Client netip.AddrPort
	// Original is the original destination.
	Original netip.AddrPort
	// Interface is the interface to leave through; "" means the proxy's configured default.
	Interface string
}

// DefaultTTL and DefaultMax are sensible values for NewTable when the caller has no better ones.
const (
	DefaultTTL = 30 * time.Second
	DefaultMax = 65536
)

type clientKey struct {
	proto  backend.Protocol
	client netip.AddrPort
}

// item is one recorded entry. Items sit on an intrusive list in record order; since every item has the same
// TTL, record order is also expiry order, so the list head is both the next to expire and the oldest to evict.
type item struct {
	e          Entry
	at         time.Time
	prev, next *item
}

// Table maps (protocol, client address) to the original destinations the pipeline recorded. One client may
// have several entries: a UDP socket talking to several peers is one flow per (client, original destination).
// It is safe for concurrent use.
type Table struct {
	ttl time.Duration
	max int
	now func() time.Time

	mu         sync.Mutex
	byClient   map[clientKey][]*item // usually one item per client
	head, tail *item                 // record order, oldest first
	n          int
}

// NewTable returns an empty table whose entries expire ttl after they were recorded and which holds at most
// max entries (recording beyond that evicts the oldest). Non-positive values take DefaultTTL / DefaultMax.
func NewTable(ttl time.Duration, max int) *Table {
	return newTable(ttl, max, time.Now)
}

func newTable(ttl time.Duration, max int, now func() time.Time) *Table {
	if ttl <= 0 {
		ttl = DefaultTTL
	}
	if max <= 0 {
		max = DefaultMax
	}
	return &Table{ttl: ttl, max: max, now: now, byClient: make(map[clientKey][]*item)}
}

// normalize keeps IPv4-mapped IPv6 addresses and plain IPv4 addresses equal, whichever way a caller parsed them.
func normalize(ap netip.AddrPort) netip.AddrPort {
	if ap.Addr().Is4In6() {
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	return ap
}

// Record stores e, replacing an entry for the same protocol, client and original destination (and restarting
// its TTL).
func (t *Table) Record(e Entry) {
	e.Client = normalize(e.Client)
	e.Original = normalize(e.Original)
	now := t.now()
	k := clientKey{e.Protocol, e.Client}

	t.mu.Lock()
	defer t.mu.Unlock()
	t.expireLocked(now)
	items := t.byClient[k]
	for i, it := range items {
		if it.e.Original == e.Original {
			t.removeLocked(k, i)
			break
		}
	}
	it := &item{e: e, at: now}
	t.byClient[k] = append(t.byClient[k], it)
	t.pushLocked(it)
	for t.n > t.max {
		t.dropLocked(t.head)
	}
}

// Lookup returns the most recently recorded entry for the client without consuming it (UDP: several flows of
// one client socket may need it).
func (t *Table) Lookup(p backend.Protocol, client netip.AddrPort) (Entry, bool) {
	return t.find(p, client, netip.AddrPort{}, false)
}

// Take returns and removes the most recently recorded entry for the client (TCP: one connection per entry).
func (t *Table) Take(p backend.Protocol, client netip.AddrPort) (Entry, bool) {
	return t.find(p, client, netip.AddrPort{}, true)
}

// LookupFlow returns the entry for exactly this client and original destination without consuming it.
func (t *Table) LookupFlow(p backend.Protocol, client, original netip.AddrPort) (Entry, bool) {
	return t.find(p, client, normalize(original), false)
}

// TakeFlow returns and removes the entry for exactly this client and original destination.
func (t *Table) TakeFlow(p backend.Protocol, client, original netip.AddrPort) (Entry, bool) {
	return t.find(p, client, normalize(original), true)
}

// find looks for the client's newest entry, or the one whose original destination is orig when orig is valid.
func (t *Table) find(p backend.Protocol, client, orig netip.AddrPort, take bool) (Entry, bool) {
	k := clientKey{p, normalize(client)}
	now := t.now()

	t.mu.Lock()
	defer t.mu.Unlock()
	t.expireLocked(now)
	items := t.byClient[k]
	for i := len(items) - 1; i >= 0; i-- {
		it := items[i]
		if orig.IsValid() && it.e.Original != orig {
			continue
		}
		e := it.e
		if take {
			t.removeLocked(k, i)
		}
		return e, true
	}
	return Entry{}, false
}

// Len returns the number of live entries.
func (t *Table) Len() int {
	now := t.now()
	t.mu.Lock()
	defer t.mu.Unlock()
	t.expireLocked(now)
	return t.n
}

// Purge drops every entry. The proxy calls it when it (re)starts, so no entry of a previous run survives.
func (t *Table) Purge() {
	t.mu.Lock()
	defer t.mu.Unlock()
	clear(t.byClient)
	t.head, t.tail, t.n = nil, nil, 0
}

func (t *Table) expireLocked(now time.Time) {
	for t.head != nil && now.Sub(t.head.at) >= t.ttl {
		t.dropLocked(t.head)
	}
}

// dropLocked removes it from both the list and the client map.
func (t *Table) dropLocked(it *item) {
	k := clientKey{it.e.Protocol, it.e.Client}
	for i, x := range t.byClient[k] {
		if x == it {
			t.removeLocked(k, i)
			return
		}
	}
}

// removeLocked removes the i-th item of client k from the map and the list.
func (t *Table) removeLocked(k clientKey, i int) {
	items := t.byClient[k]
	it := items[i]
	if len(items) == 1 {
		delete(t.byClient, k)
	} else {
		t.byClient[k] = append(items[:i:i], items[i+1:]...)
	}
	if it.prev != nil {
		it.prev.next = it.next
	} else {
		t.head = it.next
	}
	if it.next != nil {
		it.next.prev = it.prev
	} else {
		t.tail = it.prev
	}
	it.prev, it.next = nil, nil
	t.n--
}

func (t *Table) pushLocked(it *item) {
	it.prev = t.tail
	if t.tail != nil {
		t.tail.next = it
	} else {
		t.head = it
	}
	t.tail = it
	t.n++
}
