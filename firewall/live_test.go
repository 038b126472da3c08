package firewall

import (
	"errors"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/warden-fw/warden/backend"
)

// fakeKernel plays backend.LiveReporter: the test says which connections the kernel still tracks.
type fakeKernel struct {
	mu   sync.Mutex
	live map[backend.ConnKey]bool
	err  error
}

func (k *fakeKernel) set(err error, keys ...backend.ConnKey) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.err = err
	k.live = map[backend.ConnKey]bool{}
	for _, key := range keys {
		k.live[key] = true
	}
}

func (k *fakeKernel) LiveConnections(live func(backend.ConnKey)) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.err != nil {
		return k.err
	}
	for key := range k.live {
		live(key)
		// The reply-tuple key of the same entry, as the nfqueue backend reports it: it matches nothing here.
		live(backend.ConnKey{Protocol: key.Protocol, Local: key.Remote, Remote: key.Local})
	}
	return nil
}

// decideOutbound has p decide one outbound connection and returns its key.
func decideOutbound(t *testing.T, p *Pipeline, proto backend.Protocol, local, remote string) backend.ConnKey {
	t.Helper()
	pkt := &reusablePacket{info: backend.Info{Protocol: proto, Direction: backend.Outbound,
		Local: netip.MustParseAddrPort(local), Remote: netip.MustParseAddrPort(remote), PID: -1, UID: -1}}
	p.HandlePacket(pkt)
	if pkt.n.Load() != 1 {
		t.Fatalf("%s → %s: answered %d times", local, remote, pkt.n.Load())
	}
	return pkt.info.Key()
}

func TestLiveListingForgetsEndedConnections(t *testing.T) {
	k := &fakeKernel{}
	p := newPipeline(t, basicPolicy, Options{LiveConnections: k.LiveConnections})
	live := decideOutbound(t, p, backend.TCP, "10.0.0.1:40000", "10.0.0.2:80")
	ended := decideOutbound(t, p, backend.UDP, "10.0.0.1:40001", "10.0.0.2:5000")
	split := decideOutbound(t, p, backend.TCP, "10.0.0.1:40002", "10.0.0.2:443")  // rerouted: tracked by the kernel
	blocked := decideOutbound(t, p, backend.TCP, "10.0.0.1:40003", "10.0.0.2:23") // never gets a kernel entry
	endedSplit := decideOutbound(t, p, backend.TCP, "10.0.0.1:40004", "10.0.0.2:443")
	if got := p.Stats().Connections; got != 5 {
		t.Fatalf("tracked %d connections, want 5", got)
	}

	now := time.Now().Add(time.Minute)
	k.set(nil, live, split)
	if n, err := p.syncLive(now); err != nil || n != 0 {
		t.Fatalf("first listing: forgot %d, err %v; want 0 (one listing is not enough)", n, err)
	}
	n, err := p.syncLive(now.Add(30 * time.Second))
	if err != nil || n != 2 {
		t.Fatalf("second listing: forgot %d, err %v; want 2", n, err)
	}
	for _, c := range []struct {
		name string
		key  backend.ConnKey
		want bool
	}{{"live", live, true}, {"ended", ended, false}, {"live split", split, true}, {"blocked", blocked, true},
		{"ended split", endedSplit, false}} {
		if got := p.Lookup(c.key) != nil; got != c.want {
			t.Errorf("%s connection tracked: %v, want %v", c.name, got, c.want)
		}
	}
	if st := p.Stats(); st.Connections != 3 || st.Ended != 2 || st.ListingErrors != 0 {
		t.Errorf("stats: %d tracked, %d ended, %d listing errors; want 3, 2, 0", st.Connections, st.Ended, st.ListingErrors)
	}
}

// A connection one listing missed (the kernel's table changed under the dump) survives if the next one lists it.
func TestLiveListingNeedsTwoMisses(t *testing.T) {
	k := &fakeKernel{}
	p := newPipeline(t, basicPolicy, Options{LiveConnections: k.LiveConnections})
	c := decideOutbound(t, p, backend.UDP, "10.0.0.1:40000", "10.0.0.2:5000")
	now := time.Now().Add(time.Minute)
	steps := []struct {
		listed  bool
		tracked bool
	}{{false, true}, {true, true}, {false, true}, {false, false}}
	for i, s := range steps {
		if s.listed {
			k.set(nil, c)
		} else {
			k.set(nil)
		}
		if _, err := p.syncLive(now.Add(time.Duration(i) * 30 * time.Second)); err != nil {
			t.Fatal(err)
		}
		if got := p.Lookup(c) != nil; got != s.tracked {
			t.Fatalf("after listing %d (listed %v): tracked %v, want %v", i+1, s.listed, got, s.tracked)
		}
	}
}

func TestLiveListingFailureForgetsNothing(t *testing.T) {
	k := &fakeKernel{}
	p := newPipeline(t, basicPolicy, Options{LiveConnections: k.LiveConnections})
	c := decideOutbound(t, p, backend.TCP, "10.0.0.1:40000", "10.0.0.2:80")
	now := time.Now().Add(time.Minute)
	k.set(nil)
	if _, err := p.syncLive(now); err != nil {
		t.Fatal(err)
	}
	k.set(errors.New("netlink: no buffer space"))
	for i := 1; i <= 3; i++ {
		if _, err := p.syncLive(now.Add(time.Duration(i) * 30 * time.Second)); err == nil {
			t.Fatal("the failed listing reported no error")
		}
	}
	if p.Lookup(c) == nil {
		t.Fatal("a failed listing forgot a connection")
	}
	if st := p.Stats(); st.ListingErrors != 3 || st.Ended != 0 {
		t.Errorf("stats: %d listing errors, %d ended; want 3, 0", st.ListingErrors, st.Ended)
	}
	// The next good listing that misses it is the second miss in a row: the failures did not count as listings.
	k.set(nil)
	if n, err := p.syncLive(now.Add(2 * time.Minute)); err != nil || n != 1 {
		t.Errorf("good listing after failures: forgot %d, err %v; want 1", n, err)
	}
}

// A listing that panics is a failed listing: reported, counted, nothing forgotten.
func TestLiveListingPanicIsAnError(t *testing.T) {
	calls := 0
	p := newPipeline(t, basicPolicy, Options{LiveConnections: func(func(backend.ConnKey)) error {
		calls++
		if calls > 1 {
			panic("unexpected kernel answer")
		}
		return nil
	}})
	c := decideOutbound(t, p, backend.UDP, "10.0.0.1:40000", "10.0.0.2:5000")
	now := time.Now().Add(time.Minute)
	for i := range 3 {
		_, err := p.syncLive(now.Add(time.Duration(i) * 30 * time.Second))
		if (err != nil) != (i > 0) {
			t.Fatalf("listing %d: err %v", i+1, err)
		}
	}
	if p.Lookup(c) == nil || p.Stats().ListingErrors != 2 {
		t.Errorf("after panicking listings: tracked %v, %d listing errors; want true, 2", p.Lookup(c) != nil, p.Stats().ListingErrors)
	}
}

// A listed connection counts as seen: a TCP connection open for longer than the idle timeout is not expired
// while the kernel still tracks it, and one that is gone is.
func TestLiveListingKeepsLongConnections(t *testing.T) {
	k := &fakeKernel{}
	p := newPipeline(t, basicPolicy, Options{LiveConnections: k.LiveConnections})
	long := decideOutbound(t, p, backend.TCP, "10.0.0.1:40000", "10.0.0.2:22")
	gone := decideOutbound(t, p, backend.TCP, "10.0.0.1:40001", "10.0.0.2:22")
	later := time.Now().Add(idleTimeouts[backend.TCP] + time.Minute)
	k.set(nil, long)
	if _, err := p.syncLive(later.Add(-30 * time.Second)); err != nil { // the first listing forgets nothing
		t.Fatal(err)
	}
	if n := p.sweep(later); n != 1 {
		t.Errorf("idle sweep expired %d connections, want 1", n)
	}
	if p.Lookup(long) == nil || p.Lookup(gone) != nil {
		t.Errorf("after the idle sweep: long-lived tracked %v (want true), gone tracked %v (want false)",
			p.Lookup(long) != nil, p.Lookup(gone) != nil)
	}
}

// The janitor lists on its own, at the interval.
func TestJanitorListsLiveConnections(t *testing.T) {
	listed := make(chan struct{}, 1)
	newPipeline(t, basicPolicy, Options{LiveInterval: time.Second, LiveConnections: func(func(backend.ConnKey)) error {
		select {
		case listed <- struct{}{}:
		default:
		}
		return nil
	}})
	select {
	case <-listed:
	case <-time.After(10 * time.Second):
		t.Fatal("no listing within 10 s at a 1 s interval")
	}
}

// Listing is spaced by its cost: about 0.05 % of a processor, ten times that once the table is three quarters
// full, never more often than LiveInterval.
func TestListingInterval(t *testing.T) {
	p := newPipeline(t, basicPolicy, Options{MaxConnections: 64 * 2, LiveInterval: 30 * time.Second})
	if got := p.listingInterval(time.Millisecond); got != 30*time.Second {
		t.Errorf("cheap listing: every %v, want 30s", got)
	}
	if got := p.listingInterval(250 * time.Millisecond); got != 500*time.Second {
		t.Errorf("250 ms listing, table empty: every %v, want 500s", got)
	}
	// Shards fill unevenly (a full one evicts), so add connections until three quarters are tracked.
	for i := 0; p.Stats().Connections < 96; i++ {
		if i == 1000 {
			t.Fatalf("table holds %d of 128 after %d connections", p.Stats().Connections, i)
		}
		decideOutbound(t, p, backend.UDP, netip.AddrPortFrom(netip.MustParseAddr("10.0.0.1"), uint16(40000+i)).String(), "10.0.0.2:5000")
	}
	if got := p.listingInterval(250 * time.Millisecond); got != 50*time.Second {
		t.Errorf("250 ms listing, table %d of 128: every %v, want 50s", p.Stats().Connections, got)
	}
}

// The first listing's cost is estimated from the table's size: a daemon that started busy waits.
func TestFirstListingWaitsForLargeTable(t *testing.T) {
	p := newPipeline(t, basicPolicy, Options{LiveInterval: time.Second})
	t0 := time.Now()
	if got := p.firstListingAt(t0).Sub(t0); got != time.Second {
		t.Errorf("empty table: first listing after %v, want 1s", got)
	}
	for i := range 2000 {
		decideOutbound(t, p, backend.UDP, netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 1, byte(i >> 8), byte(i)}), 40000).String(),
			"10.0.0.2:5000")
	}
	// 2 000 entries at 2.5 µs: 5 ms, spaced to 0.05 % of a processor.
	if got := p.firstListingAt(t0).Sub(t0); got != 10*time.Second {
		t.Errorf("2 000 connections: first listing after %v, want 10s", got)
	}
}
