package redirect

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	"github.com/warden-fw/warden/backend"
)

type fakeClock struct{ t time.Time }

func (c *fakeClock) now() time.Time { return c.t }

func ap(s string) netip.AddrPort { return netip.MustParseAddrPort(s) }

func TestTakeVersusLookup(t *testing.T) {
	tb := NewTable(time.Minute, 10)
	e := Entry{Protocol: backend.TCP, Client: ap("10.0.0.1:5000"), Original: ap("192.0.2.1:443"), Interface: "eth1"}
	tb.Record(e)

	for i := 0; i < 3; i++ {
		got, ok := tb.Lookup(backend.TCP, e.Client)
		if !ok {
			t.Fatalf("Lookup #%d: missing", i)
		}
		if d := cmp.Diff(e, got, cmpopts.EquateComparable(netip.AddrPort{})); d != "" {
			t.Fatalf("Lookup #%d (-want +got):\n%s", i, d)
		}
	}
	if _, ok := tb.Lookup(backend.UDP, e.Client); ok {
		t.Fatal("Lookup with the other protocol found the TCP entry")
	}
	got, ok := tb.Take(backend.TCP, e.Client)
	if !ok || got != e {
		t.Fatalf("Take = %+v, %v; want the entry", got, ok)
	}
	if _, ok := tb.Take(backend.TCP, e.Client); ok {
		t.Fatal("second Take found a consumed entry")
	}
	if n := tb.Len(); n != 0 {
		t.Fatalf("Len after Take = %d, want 0", n)
	}
}

func TestTTL(t *testing.T) {
	clk := &fakeClock{t: time.Unix(1000, 0)}
	tb := newTable(10*time.Second, 10, clk.now)
	a := Entry{Protocol: backend.UDP, Client: ap("10.0.0.1:1"), Original: ap("192.0.2.1:53")}
	b := Entry{Protocol: backend.UDP, Client: ap("10.0.0.1:2"), Original: ap("192.0.2.1:53")}
	tb.Record(a)
	clk.t = clk.t.Add(6 * time.Second)
	tb.Record(b)
	clk.t = clk.t.Add(3 * time.Second) // a is 9s old, b 3s
	if n := tb.Len(); n != 2 {
		t.Fatalf("Len at 9s = %d, want 2", n)
	}
	clk.t = clk.t.Add(time.Second) // a is exactly 10s old: expired
	if _, ok := tb.Lookup(backend.UDP, a.Client); ok {
		t.Fatal("entry older than the TTL still found")
	}
	if _, ok := tb.Lookup(backend.UDP, b.Client); !ok {
		t.Fatal("younger entry expired with the older one")
	}
	// Recording the same flow again restarts its TTL.
	clk.t = clk.t.Add(5 * time.Second) // b is 9s old
	tb.Record(b)
	clk.t = clk.t.Add(5 * time.Second)
	if _, ok := tb.Take(backend.UDP, b.Client); !ok {
		t.Fatal("re-recorded entry expired on its first TTL")
	}
}

func TestBoundEvictsOldest(t *testing.T) {
	tb := NewTable(time.Hour, 3)
	for i := 1; i <= 5; i++ {
		tb.Record(Entry{Protocol: backend.TCP, Client: netip.AddrPortFrom(netip.MustParseAddr("10.0.0.1"), uint16(i)),
			Original: ap("192.0.2.1:80")})
	}
	if n := tb.Len(); n != 3 {
		t.Fatalf("Len = %d, want the bound 3", n)
	}
	var got []bool
	for i := 1; i <= 5; i++ {
		_, ok := tb.Lookup(backend.TCP, netip.AddrPortFrom(netip.MustParseAddr("10.0.0.1"), uint16(i)))
		got = append(got, ok)
	}
	if d := cmp.Diff([]bool{false, false, true, true, true}, got); d != "" {
		t.Fatalf("present entries (-want +got):\n%s", d)
	}
}

// TestSeveralFlowsPerClient covers one UDP socket talking to several peers: each (client, original) is kept.
func TestSeveralFlowsPerClient(t *testing.T) {
	tb := NewTable(time.Hour, 10)
	c := ap("10.0.0.1:5000")
	e1 := Entry{Protocol: backend.UDP, Client: c, Original: ap("192.0.2.1:3478"), Interface: "a"}
	e2 := Entry{Protocol: backend.UDP, Client: c, Original: ap("192.0.2.2:3478"), Interface: "b"}
	tb.Record(e1)
	tb.Record(e2)
	if got, _ := tb.Lookup(backend.UDP, c); got != e2 {
		t.Fatalf("Lookup = %+v, want the newest %+v", got, e2)
	}
	if got, ok := tb.LookupFlow(backend.UDP, c, e1.Original); !ok || got != e1 {
		t.Fatalf("LookupFlow(e1) = %+v, %v", got, ok)
	}
	if _, ok := tb.LookupFlow(backend.UDP, c, ap("192.0.2.3:3478")); ok {
		t.Fatal("LookupFlow found a flow that was never recorded")
	}
	// Re-recording a flow replaces it instead of adding a duplicate.
	e1b := e1
	e1b.Interface = "c"
	tb.Record(e1b)
	if n := tb.Len(); n != 2 {
		t.Fatalf("Len = %d, want 2", n)
	}
	if got, ok := tb.TakeFlow(backend.UDP, c, e1.Original); !ok || got != e1b {
		t.Fatalf("TakeFlow(e1) = %+v, %v, want %+v", got, ok, e1b)
	}
	if got, ok := tb.Take(backend.UDP, c); !ok || got != e2 {
		t.Fatalf("Take = %+v, %v, want %+v", got, ok, e2)
	}
	if n := tb.Len(); n != 0 {
		t.Fatalf("Len = %d, want 0", n)
	}
}

func TestMappedAddressesNormalized(t *testing.T) {
	tb := NewTable(time.Hour, 10)
	tb.Record(Entry{Protocol: backend.TCP, Client: ap("[::ffff:10.0.0.1]:80"), Original: ap("[::ffff:192.0.2.1]:443")})
	got, ok := tb.TakeFlow(backend.TCP, ap("10.0.0.1:80"), ap("192.0.2.1:443"))
	if !ok || got.Client != ap("10.0.0.1:80") || got.Original != ap("192.0.2.1:443") {
		t.Fatalf("TakeFlow = %+v, %v", got, ok)
	}
}

func TestPurge(t *testing.T) {
	tb := NewTable(time.Hour, 10)
	for i := 0; i < 5; i++ {
		tb.Record(Entry{Protocol: backend.UDP, Client: netip.AddrPortFrom(netip.MustParseAddr("::1"), uint16(100+i))})
	}
	tb.Purge()
	if n := tb.Len(); n != 0 {
		t.Fatalf("Len after Purge = %d", n)
	}
	if _, ok := tb.Lookup(backend.UDP, ap("[::1]:100")); ok {
		t.Fatal("entry survived Purge")
	}
	// The table stays usable.
	tb.Record(Entry{Protocol: backend.UDP, Client: ap("[::1]:1")})
	if n := tb.Len(); n != 1 {
		t.Fatalf("Len after Purge+Record = %d", n)
	}
}

// TestAgainstOracle replays random operations against a slow obvious model of the table.
func TestAgainstOracle(t *testing.T) {
	type rec struct {
		e  Entry
		at time.Time
	}
	rng := rand.New(rand.NewPCG(1, 2))
	clk := &fakeClock{t: time.Unix(0, 0)}
	const ttl, max = 10 * time.Second, 8
	tb := newTable(ttl, max, clk.now)
	var model []rec // record order

	live := func() {
		kept := model[:0]
		for _, r := range model {
			if clk.t.Sub(r.at) < ttl {
				kept = append(kept, r)
			}
		}
		model = kept
	}
	client := func() netip.AddrPort {
		return netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 0, 0, byte(rng.IntN(3))}), uint16(rng.IntN(3)))
	}
	orig := func() netip.AddrPort {
		return netip.AddrPortFrom(netip.AddrFrom4([4]byte{192, 0, 2, byte(rng.IntN(3))}), 53)
	}
	proto := func() backend.Protocol {
		if rng.IntN(2) == 0 {
			return backend.TCP
		}
		return backend.UDP
	}
	for step := 0; step < 20000; step++ {
		clk.t = clk.t.Add(time.Duration(rng.IntN(1500)) * time.Millisecond)
		live()
		p, c, o := proto(), client(), orig()
		switch op := rng.IntN(4); op {
		case 0:
			e := Entry{Protocol: p, Client: c, Original: o, Interface: fmt.Sprint(step)}
			tb.Record(e)
			for i, r := range model {
				if r.e.Protocol == p && r.e.Client == c && r.e.Original == o {
					model = append(model[:i], model[i+1:]...)
					break
				}
			}
			model = append(model, rec{e, clk.t})
			if len(model) > max {
				model = model[1:]
			}
		case 1, 2:
			flow := op == 2
			take := rng.IntN(2) == 0
			var got Entry
			var ok bool
			switch {
			case flow && take:
				got, ok = tb.TakeFlow(p, c, o)
			case flow:
				got, ok = tb.LookupFlow(p, c, o)
			case take:
				got, ok = tb.Take(p, c)
			default:
				got, ok = tb.Lookup(p, c)
			}
			want, wantOK := Entry{}, false
			for i := len(model) - 1; i >= 0; i-- {
				r := model[i]
				if r.e.Protocol == p && r.e.Client == c && (!flow || r.e.Original == o) {
					want, wantOK = r.e, true
					if take {
						model = append(model[:i], model[i+1:]...)
					}
					break
				}
			}
			if ok != wantOK || got != want {
				t.Fatalf("step %d: find(%v %v %v flow=%v take=%v) = %+v,%v; model says %+v,%v",
					step, p, c, o, flow, take, got, ok, want, wantOK)
			}
		case 3:
			if got := tb.Len(); got != len(model) {
				t.Fatalf("step %d: Len = %d, model %d", step, got, len(model))
			}
		}
	}
}

func TestConcurrentUse(t *testing.T) {
	tb := NewTable(time.Minute, 100)
	var wg sync.WaitGroup
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 2000; i++ {
				c := netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 0, byte(g), 1}), uint16(i))
				tb.Record(Entry{Protocol: backend.TCP, Client: c, Original: ap("192.0.2.1:80")})
				if _, ok := tb.Take(backend.TCP, c); !ok {
					t.Errorf("goroutine %d: entry %d vanished", g, i)
					return
				}
			}
		}()
	}
	wg.Wait()
	if n := tb.Len(); n != 0 {
		t.Fatalf("Len = %d, want 0", n)
	}
}

func BenchmarkRecordTake(b *testing.B) {
	tb := NewTable(time.Minute, 1<<16)
	e := Entry{Protocol: backend.TCP, Client: ap("10.0.0.1:5000"), Original: ap("192.0.2.1:443")}
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		e.Client = netip.AddrPortFrom(e.Client.Addr(), uint16(i))
		tb.Record(e)
		tb.Take(backend.TCP, e.Client)
	}
}
