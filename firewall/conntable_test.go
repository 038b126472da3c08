package firewall

import (
	"fmt"
	"net/netip"
	"reflect"
	"runtime"
	"testing"

	"github.com/warden-fw/warden/backend"
)

func TestConnKeyRoundTrip(t *testing.T) {
	for _, k := range []backend.ConnKey{
		{Protocol: backend.TCP, Local: netip.MustParseAddrPort("10.0.0.1:40000"), Remote: netip.MustParseAddrPort("1.2.3.4:443")},
		{Protocol: backend.UDP, Local: netip.MustParseAddrPort("[2001:db8::1]:5353"), Remote: netip.MustParseAddrPort("[2001:db8::2]:53")},
		// An IPv4-mapped address stays mapped: it is a different key from its IPv4 form.
		{Protocol: backend.TCP, Local: netip.MustParseAddrPort("[::ffff:10.0.0.1]:1"), Remote: netip.MustParseAddrPort("[::ffff:1.2.3.4]:2")},
		{Protocol: backend.ICMP, Local: netip.MustParseAddrPort("10.0.0.1:0"), Remote: netip.MustParseAddrPort("10.0.0.2:0")},
		{Protocol: backend.TCP}, // invalid addresses
		{Protocol: backend.TCP, Local: netip.AddrPortFrom(netip.IPv6Unspecified(), 0), Remote: netip.MustParseAddrPort("0.0.0.0:0")},
	} {
		ck := packKey(&k)
		if got := ck.unpack(); got != k {
			t.Errorf("%v: round trip gave %v", k, got)
		}
	}
	a := backend.ConnKey{Protocol: backend.TCP, Local: netip.MustParseAddrPort("10.0.0.1:1"), Remote: netip.MustParseAddrPort("1.2.3.4:2")}
	b := backend.ConnKey{Protocol: backend.TCP, Local: netip.MustParseAddrPort("[::ffff:10.0.0.1]:1"), Remote: netip.MustParseAddrPort("[::ffff:1.2.3.4]:2")}
	if packKey(&a) == packKey(&b) {
		t.Error("an IPv4 key and its IPv4-mapped form pack alike")
	}
}

// TestConnTableHoldsNoPointers guards the design: the garbage collector must never have to scan the table's
// keys or entries (see connKey).
func TestConnTableHoldsNoPointers(t *testing.T) {
	var walk func(t reflect.Type) string
	walk = func(typ reflect.Type) string {
		switch typ.Kind() {
		case reflect.Struct:
			for i := range typ.NumField() {
				if p := walk(typ.Field(i).Type); p != "" {
					return typ.Field(i).Name + "." + p
				}
			}
			return ""
		case reflect.Array:
			return walk(typ.Elem())
		case reflect.Pointer, reflect.String, reflect.Slice, reflect.Map, reflect.Chan, reflect.Func,
			reflect.Interface, reflect.UnsafePointer:
			return typ.Kind().String()
		}
		return ""
	}
	for _, v := range []any{connKey{}, connEntry{}} {
		if p := walk(reflect.TypeOf(v)); p != "" {
			t.Errorf("%T holds a pointer: %s", v, p)
		}
	}
}

func testConn(i int, app, domain string) *Conn {
	return &Conn{
		Key: backend.ConnKey{Protocol: backend.TCP, Local: netip.AddrPortFrom(netip.MustParseAddr("10.0.0.1"), uint16(1000+i)),
			Remote: netip.MustParseAddrPort("1.2.3.4:443")},
		Direction: backend.Outbound, PID: int32(i), UID: 1000, App: app, Interface: "eth0", Domain: domain,
		Created: int64(i), decision: backend.Decision{Verdict: backend.Accept, Permanent: true}, rule: refDNS,
	}
}

func TestConnTableRoundTripAndNames(t *testing.T) {
	tab := newConnTable(1 << 16)
	const n = 200
	for i := range n {
		app := fmt.Sprintf("/usr/bin/app%d", i%2)
		if _, ok := tab.insert(testConn(i, app, "example.org"), 5); !ok {
			t.Fatalf("insert %d refused", i)
		}
	}
	// Two applications, one interface, one domain.
	if got := tab.names.size(); got != 4 {
		t.Errorf("%d names interned, want 4", got)
	}
	if got := tab.rules.size(); got != 1 {
		t.Errorf("%d rule references interned, want 1", got)
	}
	want := testConn(7, "/usr/bin/app1", "example.org")
	got, ok := tab.get(want.Key)
	if !ok || !reflect.DeepEqual(&got, want) {
		t.Fatalf("get = %+v, %v\nwant  %+v", got, ok, *want)
	}
	if d, ok := tab.insert(testConn(7, "/other", ""), 5); ok || d != want.decision {
		t.Errorf("second insert of a key: %v, %v; want the first decision and false", d, ok)
	}

	// Names in use survive a sweep; names nobody uses are freed and their ids reused.
	for i := range n {
		if !tab.remove(testConn(i, "", "").Key) {
			t.Fatalf("remove %d: not found", i)
		}
	}
	if got := tab.names.size(); got != 4 {
		t.Errorf("before the sweep %d names, want 4 (freed only by sweep)", got)
	}
	tab.expire(func(backend.Protocol) int64 { return 0 })
	if got := tab.names.size(); got != 0 {
		t.Errorf("after removing every connection and a sweep %d names remain", got)
	}
	if got := tab.rules.size(); got != 0 {
		t.Errorf("after removing every connection and a sweep %d rule references remain", got)
	}
	tab.insert(testConn(1, "/usr/bin/new", ""), 5)
	if got := len(tab.names.vals); got != 5 {
		t.Errorf("the name table grew to %d slots, want its 5 (ids reused)", got)
	}
	if c, _ := tab.get(testConn(1, "", "").Key); c.App != "/usr/bin/new" || c.Domain != "" || c.Interface != "eth0" {
		t.Errorf("after reuse: %+v", c)
	}
}

func TestConnTableEvictionAndExpiryReleaseNames(t *testing.T) {
	tab := newConnTable(connShards) // one connection per shard
	for i := range 500 {
		tab.insert(testConn(i, fmt.Sprintf("/app%d", i), ""), int64(i))
	}
	if tab.len() > connShards || tab.evicted.Load() < 500-connShards {
		t.Fatalf("%d connections, %d evicted", tab.len(), tab.evicted.Load())
	}
	tab.names.sweep()
	// Every remaining connection holds its own application name, plus the shared interface.
	if got, want := tab.names.size(), tab.len()+1; got != want {
		t.Errorf("%d names after evictions, want %d", got, want)
	}
	before := tab.len()
	if n := tab.expire(func(backend.Protocol) int64 { return 1 << 40 }); n != before || tab.len() != 0 {
		t.Errorf("expire removed %d of %d and left %d", n, before, tab.len())
	}
	if got := tab.names.size(); got != 0 {
		t.Errorf("%d names after expiring everything", got)
	}
}

func TestConnTableUpdate(t *testing.T) {
	tab := newConnTable(1 << 10)
	for i := range 10 {
		tab.insert(testConn(i, "/a", ""), 1)
	}
	blocked := &ruleRef{Name: "block", Index: 3, Source: "rule"}
	tab.update(func(c *Conn) (backend.Decision, *ruleRef) {
		if c.PID%2 == 0 {
			return backend.Decision{Verdict: backend.Block, Permanent: true}, blocked
		}
		return c.decision, c.rule
	})
	tab.each(func(c *Conn) {
		name, _, _ := c.Rule()
		if c.PID%2 == 0 && (c.Decision().Verdict != backend.Block || name != "block") ||
			c.PID%2 == 1 && (c.Decision().Verdict != backend.Accept || name != "nameserver") {
			t.Errorf("pid %d: %v by %q", c.PID, c.Decision(), name)
		}
	})
	tab.names.sweep()
	tab.rules.sweep()
	if got := tab.rules.size(); got != 2 {
		t.Errorf("%d rule references after the update, want 2", got)
	}
}

// BenchmarkConnTableGC measures what the garbage collector pays for a full table: a forced collection with
// 100 000 connections tracked. With pointer-free entries it does not grow with the table.
func BenchmarkConnTableGC(b *testing.B) {
	tab := newConnTable(1 << 20)
	for i := range 100_000 {
		c := testConn(i, "/usr/bin/app", fmt.Sprintf("d%d.example", i%500))
		c.Key.Remote = netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}), 443)
		tab.insert(c, 1)
	}
	b.ResetTimer()
	for b.Loop() {
		runtime.GC()
	}
	runtime.KeepAlive(tab)
}

// A fresh table takes its first tens of thousands of connections without allocating: its maps are sized at start,
// so no insert on the packet path pays for a map growing.
func TestConnTablePresized(t *testing.T) {
	tab := newConnTable(262144)
	const n = 40000 // about 625 per shard, well below shardPresize in every shard
	conns := make([]Conn, n)
	for i := range conns {
		c := testConn(0, "/usr/bin/app", "")
		c.Key.Local = netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 1, byte(i >> 8), byte(i)}), uint16(1024+i%50000))
		c.Key.Remote = netip.AddrPortFrom(netip.AddrFrom4([4]byte{192, 0, byte(i >> 8), byte(i)}), 443)
		conns[i] = *c
	}
	tab.insert(&conns[0], 5) // interns the names once
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	for i := 1; i < n; i++ {
		if _, ok := tab.insert(&conns[i], 5); !ok {
			t.Fatalf("insert %d refused", i)
		}
	}
	runtime.ReadMemStats(&after)
	if got := after.TotalAlloc - before.TotalAlloc; got > 64<<10 {
		t.Errorf("inserting %d connections allocated %d bytes; the maps grew", n-1, got)
	}
	if tab.len() != n {
		t.Errorf("table holds %d, want %d", tab.len(), n)
	}
}

// fullTable returns a table of size connections, full, and how the benchmarks make their i-th connection
// (each with its own remote address, so that they spread over the shards).
func fullTable(size int) (*connTable, func(i int) *Conn) {
	tab := newConnTable(size)
	conn := func(i int) *Conn {
		c := testConn(i, "/usr/bin/app", "")
		c.Key.Remote = netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, byte(i >> 24), byte(i >> 16), byte(i >> 8)}), uint16(i))
		return c
	}
	for i := range size {
		tab.insert(conn(i), 1)
	}
	return tab, conn
}

// BenchmarkConnTableChurn is a full table with the churn of a busy host: every new connection's look-up misses,
// its insert evicts another, and as many connections end as begin. Go maps pay for this churn in tombstones
// (docs/performance.md, session 8).
func BenchmarkConnTableChurn(b *testing.B) {
	const size = 1 << 16
	tab, conn := fullTable(size)
	i := size
	for b.Loop() {
		c := conn(i)
		tab.touch(&c.Key, 2)
		tab.insert(c, 2)
		tab.remove(conn(i - size/2).Key)
		i++
	}
}

// BenchmarkConnTableFull is a full table that only grows: every insert evicts, as on a busy host whose
// connections the kernel still tracks (or whose ends Warden cannot see).
func BenchmarkConnTableFull(b *testing.B) {
	const size = 1 << 16
	tab, conn := fullTable(size)
	i := size
	for b.Loop() {
		tab.insert(conn(i), 2)
		i++
	}
	b.ReportMetric(float64(tab.evicted.Load())/float64(b.N), "evictions/op")
}

// A sweep runs every few seconds over every tracked connection while packets are being decided. It must not
// allocate per connection it looks at: with 100 000 connections that was about 9 MB of garbage per sweep,
// collected on the processors that answer packets.
func TestConnTableSweepAllocations(t *testing.T) {
	tab, _ := fullTable(4096)
	keep := func(backend.Protocol) int64 { return 0 } // nothing is older than this: nothing goes
	allocs := testing.AllocsPerRun(5, func() {
		if n := tab.expire(keep); n != 0 {
			t.Fatalf("expire removed %d live connections", n)
		}
		tab.forgetEnded(0)
	})
	if allocs > 8 {
		t.Errorf("a sweep over %d connections allocated %.0f times", tab.len(), allocs)
	}
	// Re-evaluation after a reload, and a listing, walk the table the same way.
	seen := 0
	allocs = testing.AllocsPerRun(5, func() {
		tab.update(func(c *Conn) (backend.Decision, *ruleRef) { seen++; return c.decision, c.rule })
		tab.each(func(*Conn) { seen++ })
	})
	if seen == 0 || allocs > 8 {
		t.Errorf("walking %d connections visited %d and allocated %.0f times", tab.len(), seen, allocs)
	}
}
