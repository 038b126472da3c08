package nfqueue

import (
	"errors"
	"log/slog"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/warden-fw/warden/backend"
	"github.com/warden-fw/warden/backend/nfqueue/marks"
)

func TestMarkFor(t *testing.T) {
	tests := []struct {
		d       backend.Decision
		fm      backend.FailMode
		want    uint32
		wantErr bool
	}{
		{backend.Decision{Verdict: backend.Accept}, backend.FailOpen, marks.Accept, false},
		{backend.Decision{Verdict: backend.Accept, Permanent: true}, backend.FailOpen, marks.AcceptAlways, false},
		{backend.AcceptFinal, backend.FailClosed, marks.AcceptFinal, false},
		{backend.Decision{Verdict: backend.Block}, backend.FailOpen, marks.Block, false},
		{backend.Decision{Verdict: backend.Block, Permanent: true}, backend.FailOpen, marks.BlockAlways, false},
		{backend.Decision{Verdict: backend.Drop}, backend.FailOpen, marks.Drop, false},
		{backend.Decision{Verdict: backend.Drop, Permanent: true}, backend.FailOpen, marks.DropAlways, false},
		{backend.Decision{Verdict: backend.RerouteToTunnel}, backend.FailOpen, marks.RerouteTunnel, false},
		{backend.Decision{Verdict: backend.RerouteToSplitTun}, backend.FailOpen, marks.RerouteSplit, false},
		{backend.Decision{Verdict: backend.RerouteToSplitTun, Permanent: true, Route: 1}, backend.FailOpen, 1728, false},
		{backend.Decision{Verdict: backend.RerouteToSplitTun, Permanent: true, Route: 16}, backend.FailOpen, 1743, false},
		{backend.Decision{Verdict: backend.RerouteToSplitTun, Route: 17}, backend.FailClosed, marks.Drop, true},
		{backend.Decision{Verdict: backend.Accept, Route: 1}, backend.FailOpen, marks.Accept, true},
		{backend.Decision{Verdict: backend.RerouteToNameserver, Permanent: true}, backend.FailOpen, marks.RerouteNS, false},
		{backend.Decision{Verdict: backend.Undecided}, backend.FailOpen, marks.Accept, false},
		{backend.Decision{Verdict: backend.Undeterminable}, backend.FailClosed, marks.Drop, false},
		{backend.Decision{Verdict: backend.Failed, Permanent: true}, backend.FailClosed, marks.Drop, false},
		{backend.Decision{Verdict: backend.Block, Permanent: true, Final: true}, backend.FailClosed, marks.Drop, true},
		{backend.Decision{Verdict: 99}, backend.FailOpen, marks.Accept, true},
	}
	for _, tt := range tests {
		got, err := markFor(tt.d, tt.fm)
		if got != tt.want || (err != nil) != tt.wantErr {
			t.Errorf("markFor(%v, %v) = %d, %v; want %d, error %v", tt.d, tt.fm, got, err, tt.want, tt.wantErr)
		}
	}
	// Every verdict, permanent or not, maps to a mark the rules know.
	known := map[uint32]bool{}
	for _, m := range []uint32{marks.Accept, marks.Block, marks.Drop, marks.AcceptFinal, marks.AcceptAlways,
		marks.BlockAlways, marks.DropAlways, marks.RerouteTunnel, marks.RerouteSplit, marks.RerouteNS} {
		known[m] = true
	}
	for v := range backend.Verdict(backend.NumVerdicts + 1) {
		for _, perm := range []bool{false, true} {
			for _, fm := range []backend.FailMode{backend.FailOpen, backend.FailClosed} {
				if m, _ := markFor(backend.Decision{Verdict: v, Permanent: perm}, fm); !known[m] {
					t.Errorf("verdict %v permanent=%v yields unknown mark %d", v, perm, m)
				}
			}
		}
	}
}

// fakeQueue records verdicts.
type fakeQueue struct {
	mu       sync.Mutex
	verdicts map[uint32]uint32
	fail     error
}

func (q *fakeQueue) verdict(id, mark uint32) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.verdicts == nil {
		q.verdicts = map[uint32]uint32{}
	}
	if _, dup := q.verdicts[id]; dup {
		panic("second verdict for one packet")
	}
	q.verdicts[id] = mark
	return q.fail
}

func (q *fakeQueue) get() map[uint32]uint32 {
	q.mu.Lock()
	defer q.mu.Unlock()
	out := map[uint32]uint32{}
	for k, v := range q.verdicts {
		out[k] = v
	}
	return out
}

var tcpSYN = ipv4Packet(6, "10.0.0.1", "1.2.3.4", 5, 0, ports(40000, 443))

func TestPacketApplyOnce(t *testing.T) {
	q := &fakeQueue{}
	var got []backend.Packet
	e := newEngine(slog.New(slog.DiscardHandler), backend.FailClosed, time.Hour,
		backend.HandlerFunc(func(p backend.Packet) { got = append(got, p) }))
	e.receive(q, &meta{id: 7, out: true, uid: 1000, mark: 5, ifIndex: 3}, tcpSYN)
	if len(got) != 1 {
		t.Fatalf("handler got %d packets", len(got))
	}
	p := got[0]
	want := backend.Info{Protocol: backend.TCP, Local: mustAP("10.0.0.1:40000"), Remote: mustAP("1.2.3.4:443"),
		IfIndex: 3, PID: backend.Unknown, UID: 1000, Mark: 5}
	if diff := cmp.Diff(want, *p.Info(), cmp.Comparer(func(a, b netip.AddrPort) bool { return a == b })); diff != "" {
		t.Errorf("info (-want +got):\n%s", diff)
	}
	if err := p.Apply(backend.Decision{Verdict: backend.Block, Permanent: true}); err != nil {
		t.Fatal(err)
	}
	if err := p.Apply(backend.Decision{Verdict: backend.Accept}); !errors.Is(err, backend.ErrAlreadyApplied) {
		t.Errorf("second Apply: %v, want ErrAlreadyApplied", err)
	}
	if diff := cmp.Diff(map[uint32]uint32{7: marks.BlockAlways}, q.get()); diff != "" {
		t.Errorf("verdicts (-want +got):\n%s", diff)
	}
}

func TestPacketParseErrorGetsFailMode(t *testing.T) {
	q := &fakeQueue{}
	called := false
	e := newEngine(slog.New(slog.DiscardHandler), backend.FailClosed, time.Hour,
		backend.HandlerFunc(func(p backend.Packet) { called = true }))
	e.receive(q, &meta{id: 1}, []byte{0x45, 0})
	if called {
		t.Error("handler saw an unparsable packet")
	}
	if diff := cmp.Diff(map[uint32]uint32{1: marks.Drop}, q.get()); diff != "" {
		t.Errorf("verdicts (-want +got):\n%s", diff)
	}
	if st := e.stats(); st.ParseErrors != 1 || st.Packets != 1 {
		t.Errorf("stats %+v", st)
	}
}

// A packet nobody answers gets the fail-mode verdict after the timeout from the one deadline goroutine; a
// late Apply then reports ErrAlreadyApplied.
func TestVerdictTimeout(t *testing.T) {
	q := &fakeQueue{}
	held := make(chan backend.Packet, 10)
	e := newEngine(slog.New(slog.DiscardHandler), backend.FailOpen, 50*time.Millisecond,
		backend.HandlerFunc(func(p backend.Packet) {
			if p.Info().Remote.Port() == 443 {
				held <- p // never answered in time
				return
			}
			_ = p.Apply(backend.Decision{Verdict: backend.Drop})
		}))
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() { e.dl.run(stop); close(done) }()
	defer func() { close(stop); <-done }()

	e.receive(q, &meta{id: 1, out: true}, tcpSYN)
	e.receive(q, &meta{id: 2, out: true}, ipv4Packet(6, "10.0.0.1", "1.2.3.4", 5, 0, ports(40000, 80)))
	deadline := time.Now().Add(5 * time.Second)
	for len(q.get()) < 2 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if diff := cmp.Diff(map[uint32]uint32{1: marks.Accept, 2: marks.Drop}, q.get()); diff != "" {
		t.Errorf("verdicts (-want +got):\n%s", diff)
	}
	if err := (<-held).Apply(backend.Decision{Verdict: backend.Block}); !errors.Is(err, backend.ErrAlreadyApplied) {
		t.Errorf("Apply after timeout: %v, want ErrAlreadyApplied", err)
	}
	if st := e.stats(); st.VerdictTimeouts != 1 {
		t.Errorf("timeouts %d, want 1", st.VerdictTimeouts)
	}
}

// drain answers pending packets, not answered ones, and later packets are answered at once.
func TestDrain(t *testing.T) {
	q := &fakeQueue{}
	var held []backend.Packet
	e := newEngine(slog.New(slog.DiscardHandler), backend.FailClosed, time.Hour,
		backend.HandlerFunc(func(p backend.Packet) { held = append(held, p) }))
	e.receive(q, &meta{id: 1, out: true}, tcpSYN)
	e.receive(q, &meta{id: 2, out: true}, tcpSYN)
	if err := held[1].Apply(backend.Decision{Verdict: backend.Accept}); err != nil {
		t.Fatal(err)
	}
	e.stopping.Store(true)
	e.drain()
	e.receive(q, &meta{id: 3, out: true}, tcpSYN)
	if diff := cmp.Diff(map[uint32]uint32{1: marks.Drop, 2: marks.Accept, 3: marks.Drop}, q.get()); diff != "" {
		t.Errorf("verdicts (-want +got):\n%s", diff)
	}
	if len(held) != 2 {
		t.Errorf("handler got %d packets, want 2 (none after stop)", len(held))
	}
	if e.stats().VerdictTimeouts != 0 {
		t.Error("drain counted as timeouts")
	}
}

// The deadline ring keeps order across growth.
func TestDeadlinesGrow(t *testing.T) {
	var got []uint32
	d := newDeadlines(0, func(p *packet) { got = append(got, p.id) })
	for i := range uint32(3000) {
		d.push(&packet{id: i})
	}
	for {
		d.mu.Lock()
		p, _ := d.popExpiredLocked(time.Since(d.epoch) + time.Second)
		d.mu.Unlock()
		if p == nil {
			break
		}
		d.expire(p)
	}
	if len(got) != 3000 {
		t.Fatalf("expired %d, want 3000", len(got))
	}
	for i, id := range got {
		if id != uint32(i) {
			t.Fatalf("entry %d is packet %d", i, id)
		}
	}
}

func mustAP(s string) netip.AddrPort { return netip.MustParseAddrPort(s) }

// The hot path, from queued bytes to a verdict, does not allocate once the pool is warm.
func TestReceiveApplyNoAllocs(t *testing.T) {
	q := nopQueue{}
	e := newEngine(slog.New(slog.DiscardHandler), backend.FailOpen, time.Hour,
		backend.HandlerFunc(func(p backend.Packet) { _ = p.Apply(backend.Decision{Verdict: backend.Accept, Permanent: true}) }))
	m := &meta{id: 1, out: true}
	warm := make([]*packet, 0, 64)
	for range 64 {
		warm = append(warm, new(packet))
	}
	for _, p := range warm {
		e.pool.Put(p)
	}
	n := testing.AllocsPerRun(1000, func() {
		e.receive(q, m, tcpSYN)
		// What the deadline goroutine does when the packet's entry expires.
		e.dl.mu.Lock()
		p, _ := e.dl.popExpiredLocked(time.Since(e.dl.epoch) + 2*time.Hour)
		e.dl.mu.Unlock()
		e.expire(p)
	})
	if n != 0 {
		t.Errorf("receive+apply allocates %v times per packet, want 0", n)
	}
}

type nopQueue struct{}

func (nopQueue) verdict(id, mark uint32) error { return nil }

func BenchmarkReceiveApply(b *testing.B) {
	q := nopQueue{}
	e := newEngine(slog.New(slog.DiscardHandler), backend.FailOpen, time.Hour,
		backend.HandlerFunc(func(p backend.Packet) { _ = p.Apply(backend.Decision{Verdict: backend.Accept, Permanent: true}) }))
	m := &meta{id: 1, out: true}
	pkt := ipv6Packet(6, "fd00::1", "2001:db8::2", ports(40000, 443))
	b.ReportAllocs()
	for b.Loop() {
		e.receive(q, m, pkt)
		e.dl.mu.Lock()
		p, _ := e.dl.popExpiredLocked(time.Since(e.dl.epoch) + 2*time.Hour)
		e.dl.mu.Unlock()
		e.expire(p)
	}
}

// Answered packets leave the deadline ring once they are recycleGrace old, as new packets arrive, so the ring
// (and everything it keeps alive) holds the last moments' packets, not the whole verdict timeout's; a packet
// still pending, and every one behind it, stays until answered or expired; within the grace a second Apply
// still reports ErrAlreadyApplied.
func TestAnsweredPacketsRecycledAfterGrace(t *testing.T) {
	q := &fakeQueue{}
	var held []backend.Packet
	e := newEngine(slog.New(slog.DiscardHandler), backend.FailOpen, time.Hour,
		backend.HandlerFunc(func(p backend.Packet) {
			if p.Info().Remote.Port() == 443 {
				held = append(held, p)
				return
			}
			_ = p.Apply(backend.Decision{Verdict: backend.Accept, Permanent: true})
		}))
	var now time.Duration
	e.dl.now = func() time.Duration { return now }
	var recycled int
	e.dl.recycle = func(p *packet) { recycled++; e.recycle(p) }
	syn := func(port uint16) []byte { return ipv4Packet(6, "10.0.0.1", "1.2.3.4", 5, 0, ports(40000, port)) }

	for i := range 1000 {
		e.receive(q, &meta{id: uint32(i), out: true}, syn(80))
	}
	first := e.dl.ring[e.dl.head].p
	if err := first.Apply(backend.Decision{Verdict: backend.Drop}); !errors.Is(err, backend.ErrAlreadyApplied) {
		t.Errorf("second Apply within the grace: %v, want ErrAlreadyApplied", err)
	}
	if recycled != 0 || e.dl.n != 1000 {
		t.Fatalf("within the grace: %d recycled, %d in the ring; want 0 and 1000", recycled, e.dl.n)
	}
	now += recycleGrace
	e.receive(q, &meta{id: 5000, out: true}, syn(443)) // held: pending
	if recycled != 1000 || e.dl.n != 1 {
		t.Errorf("after the grace: %d recycled, %d in the ring; want 1000 and 1", recycled, e.dl.n)
	}
	now += recycleGrace
	e.receive(q, &meta{id: 5001, out: true}, syn(80))
	now += recycleGrace
	e.receive(q, &meta{id: 5002, out: true}, syn(80))
	if recycled != 1000 || e.dl.n != 3 {
		t.Errorf("behind a pending packet: %d recycled, %d in the ring; want 1000 and 3", recycled, e.dl.n)
	}
	if err := held[0].Apply(backend.Decision{Verdict: backend.Accept}); err != nil {
		t.Fatal(err)
	}
	now += recycleGrace
	e.receive(q, &meta{id: 5003, out: true}, syn(80))
	if recycled != 1003 || e.dl.n != 1 {
		t.Errorf("once answered: %d recycled, %d in the ring; want 1003 and 1", recycled, e.dl.n)
	}
	if len(q.get()) != 1004 {
		t.Errorf("%d verdicts, want one per packet answered (1004)", len(q.get()))
	}
}
