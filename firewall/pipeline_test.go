package firewall

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"

	"github.com/google/go-cmp/cmp"

	"github.com/warden-fw/warden/backend"
	"github.com/warden-fw/warden/config"
)

// testPacket records every Apply call; only the first one counts, like a real backend's packet.
type testPacket struct {
	info    backend.Info
	mu      sync.Mutex
	applied []backend.Decision
	calls   int
	done    chan struct{}
}

func newPacket(proto backend.Protocol, dir backend.Direction, local, remote string) *testPacket {
	return &testPacket{info: backend.Info{Protocol: proto, Direction: dir,
		Local: netip.MustParseAddrPort(local), Remote: netip.MustParseAddrPort(remote), PID: -1, UID: -1},
		done: make(chan struct{})}
}

func (t *testPacket) Info() *backend.Info { return &t.info }
func (t *testPacket) Payload() []byte     { return nil }
func (t *testPacket) Apply(d backend.Decision) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.calls++
	if len(t.applied) > 0 {
		return backend.ErrAlreadyApplied
	}
	t.applied = append(t.applied, d)
	close(t.done)
	return nil
}

// wait returns the packet's decision, failing the test if none comes within a few seconds.
func (t *testPacket) wait(tb testing.TB) backend.Decision {
	tb.Helper()
	select {
	case <-t.done:
	case <-time.After(5 * time.Second):
		tb.Fatalf("packet %s was never answered", t.info.String())
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.applied[0]
}

func newPipeline(t testing.TB, yaml string, o Options) *Pipeline {
	t.Helper()
	p := New(mustPolicy(t, yaml), o)
	t.Cleanup(p.Close)
	return p
}

const basicPolicy = `
default_action: allow
inbound_default: block
rules:
  - {name: no-telnet, action: block, protocol: tcp, ports: [23]}
  - {name: drop-dns, action: drop, protocol: udp, ports: [53]}
  - {name: split-web, action: split, protocol: tcp, ports: [443], via: eth1}
`

var (
	permAccept = backend.Decision{Verdict: backend.Accept, Permanent: true}
	permBlock  = backend.Decision{Verdict: backend.Block, Permanent: true}
	permDrop   = backend.Decision{Verdict: backend.Drop, Permanent: true}
	permSplit  = backend.Decision{Verdict: backend.RerouteToSplitTun, Permanent: true}
)

type splitLog struct {
	mu      sync.Mutex
	entries []string
}

func (s *splitLog) RecordSplit(proto backend.Protocol, client, original netip.AddrPort, via string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.entries = append(s.entries, proto.String()+" "+client.String()+" "+original.String()+" "+via)
}

func TestPipelineDecisions(t *testing.T) {
	splits := &splitLog{}
	p := newPipeline(t, basicPolicy, Options{OwnPID: 4242, Split: splits})
	tests := []struct {
		name string
		pkt  *testPacket
		pid  int32
		want backend.Decision
	}{
		{"allowed", newPacket(backend.TCP, backend.Outbound, "10.0.0.1:40000", "10.0.0.2:80"), -1, permAccept},
		{"blocked", newPacket(backend.TCP, backend.Outbound, "10.0.0.1:40001", "10.0.0.2:23"), -1, permBlock},
		{"dropped", newPacket(backend.UDP, backend.Outbound, "10.0.0.1:40002", "10.0.0.2:53"), -1, permDrop},
		{"inbound default", newPacket(backend.TCP, backend.Inbound, "10.0.0.1:8080", "10.0.0.2:40003"), -1, permBlock},
		{"split", newPacket(backend.TCP, backend.Outbound, "10.0.0.1:40004", "192.0.2.1:443"), -1, permSplit},
		{"own pid beats block", newPacket(backend.TCP, backend.Outbound, "10.0.0.1:40005", "10.0.0.2:23"), 4242, backend.AcceptFinal},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.pkt.info.PID = tt.pid
			p.HandlePacket(tt.pkt)
			if got := tt.pkt.wait(t); got != tt.want {
				t.Errorf("decision %v, want %v", got, tt.want)
			}
			if tt.pkt.calls != 1 {
				t.Errorf("Apply called %d times", tt.pkt.calls)
			}
		})
	}
	if len(splits.entries) != 1 || splits.entries[0] != "tcp 10.0.0.1:40004 192.0.2.1:443 eth1" {
		t.Errorf("split entries %q", splits.entries)
	}
	st := p.Stats()
	if st.Packets != 6 || st.Verdicts["block"] != 2 || st.Verdicts["accept"] != 2 || st.Verdicts["accept-final"] != 1 ||
		st.Verdicts["drop"] != 1 || st.Verdicts["reroute-split"] != 1 || st.Connections != 6 {
		t.Errorf("stats %+v", st)
	}
}

func TestSplitWithoutProxyFallsBackToAllow(t *testing.T) {
	p := newPipeline(t, basicPolicy, Options{})
	pkt := newPacket(backend.TCP, backend.Outbound, "10.0.0.1:40004", "192.0.2.1:443")
	p.HandlePacket(pkt)
	if got := pkt.wait(t); got != permAccept {
		t.Errorf("split without a proxy decided %v", got)
	}
}

func TestKnownConnectionSameAnswer(t *testing.T) {
	p := newPipeline(t, basicPolicy, Options{})
	first := newPacket(backend.TCP, backend.Outbound, "10.0.0.1:40001", "10.0.0.2:23")
	p.HandlePacket(first)
	first.wait(t)
	again := newPacket(backend.TCP, backend.Outbound, "10.0.0.1:40001", "10.0.0.2:23")
	p.HandlePacket(again)
	if got := again.wait(t); got != permBlock {
		t.Errorf("retransmission decided %v", got)
	}
	if st := p.Stats(); st.KnownPackets != 1 || st.Connections != 1 {
		t.Errorf("stats %+v", st)
	}
}

// reusablePacket answers without allocating, for the allocation test.
type reusablePacket struct {
	info backend.Info
	n    atomic.Int64
}

func (r *reusablePacket) Info() *backend.Info { return &r.info }
func (r *reusablePacket) Payload() []byte     { return nil }
func (r *reusablePacket) Apply(backend.Decision) error {
	r.n.Add(1)
	return nil
}

func TestKnownConnectionNoAllocs(t *testing.T) {
	p := newPipeline(t, basicPolicy, Options{})
	pkt := &reusablePacket{info: backend.Info{Protocol: backend.TCP, Local: netip.MustParseAddrPort("10.0.0.1:1"),
		Remote: netip.MustParseAddrPort("10.0.0.2:80"), PID: -1, UID: -1}}
	p.HandlePacket(pkt)
	allocs := testing.AllocsPerRun(1000, func() { p.HandlePacket(pkt) })
	if allocs != 0 {
		t.Errorf("known-connection packet allocates %v times", allocs)
	}
	if pkt.n.Load() != 1001+1 { // AllocsPerRun runs the function once more to warm up
		t.Errorf("applied %d times", pkt.n.Load())
	}
}

func TestHookSetOnceAndHonoured(t *testing.T) {
	p := newPipeline(t, basicPolicy, Options{})
	calls := 0
	hook := func(info *backend.Info, _ backend.Process) (backend.Verdict, bool) {
		calls++
		switch info.Remote.Port() {
		case 80:
			return backend.Block, true
		case 23:
			return backend.Accept, true
		case 81:
			return backend.Drop, true // not honoured: the policy decides
		}
		return 0, false
	}
	if err := p.SetVerdictHook(hook); err != nil {
		t.Fatal(err)
	}
	if err := p.SetVerdictHook(hook); !errors.Is(err, ErrHookInstalled) {
		t.Errorf("second install: %v", err)
	}
	if err := p.SetVerdictHook(nil); err == nil {
		t.Error("nil hook accepted")
	}
	cases := map[uint16]backend.Decision{80: permBlock, 23: permAccept, 81: permAccept, 53: permAccept}
	port := 41000
	for rp, want := range cases {
		port++
		pkt := newPacket(backend.TCP, backend.Outbound, netip.AddrPortFrom(netip.MustParseAddr("10.0.0.1"), uint16(port)).String(),
			netip.AddrPortFrom(netip.MustParseAddr("10.0.0.2"), rp).String())
		p.HandlePacket(pkt)
		if got := pkt.wait(t); got != want {
			t.Errorf("port %d: %v, want %v", rp, got, want)
		}
	}
	if calls != len(cases) {
		t.Errorf("hook called %d times", calls)
	}
}

func TestPanicsStillAnswer(t *testing.T) {
	for _, mode := range []backend.FailMode{backend.FailOpen, backend.FailClosed} {
		p := newPipeline(t, basicPolicy, Options{FailMode: mode})
		if err := p.SetVerdictHook(func(*backend.Info, backend.Process) (backend.Verdict, bool) { panic("boom") }); err != nil {
			t.Fatal(err)
		}
		pkt := newPacket(backend.TCP, backend.Outbound, "10.0.0.1:40000", "10.0.0.2:80")
		p.HandlePacket(pkt)
		if got := pkt.wait(t); got != mode.Decision() {
			t.Errorf("%s: panic answered %v", mode, got)
		}
		if st := p.Stats(); st.Panics != 1 || st.Failures != 1 || st.Verdicts["failed"] != 1 {
			t.Errorf("%s: stats %+v", mode, st)
		}
		if pkt.calls != 1 {
			t.Errorf("%s: Apply called %d times", mode, pkt.calls)
		}
	}
}

// slowResolver answers process lookups from a table, optionally panicking or blocking.
type slowResolver struct {
	procs   map[uint16]backend.Process // by local port
	release chan struct{}
}

func (r *slowResolver) ResolveProcess(info *backend.Info) (backend.Process, bool) {
	if r.release != nil {
		<-r.release
	}
	if info.Local.Port() == 666 {
		panic("resolver bug")
	}
	p, ok := r.procs[info.Local.Port()]
	return p, ok
}

func TestProcessRules(t *testing.T) {
	res := &slowResolver{procs: map[uint16]backend.Process{
		1000: {PID: 10, Path: "/usr/bin/curl", UID: 1000},
		1001: {PID: 11, Path: "/usr/bin/wget", UID: 1000},
		1002: {PID: 4242, Path: "/usr/bin/warden", UID: 0},
	}}
	p := newPipeline(t, `
rules:
  - {name: no-curl, action: block, app: /usr/bin/curl}
`, Options{Processes: res, OwnPID: 4242})
	tests := []struct {
		port uint16
		want backend.Decision
	}{
		{1000, permBlock},
		{1001, permAccept},
		{1002, backend.AcceptFinal}, // own process found by lookup
		{1003, permAccept},          // unknown process: app rules do not match
		{666, permAccept},           // resolver panics: decided without the process
	}
	for _, tt := range tests {
		pkt := newPacket(backend.TCP, backend.Outbound, netip.AddrPortFrom(netip.MustParseAddr("10.0.0.1"), tt.port).String(), "10.0.0.2:80")
		p.HandlePacket(pkt)
		if got := pkt.wait(t); got != tt.want {
			t.Errorf("port %d: %v, want %v", tt.port, got, tt.want)
		}
	}
	var found bool
	for _, c := range p.Connections() {
		if c.App == "/usr/bin/curl" {
			found = c.Rule == "no-curl" && c.Verdict == "block-permanent" && c.PID == 10
		}
	}
	if !found {
		t.Errorf("connections %+v", p.Connections())
	}
}

// TestSlowLookupDoesNotBlockOthers checks that a process lookup that hangs holds only its own connection.
func TestSlowLookupDoesNotBlockOthers(t *testing.T) {
	res := &slowResolver{release: make(chan struct{})}
	p := newPipeline(t, "rules: [{name: x, action: block, app: /bin/x}]", Options{Processes: res, ProcessWorkers: 1})
	stuck := newPacket(backend.TCP, backend.Outbound, "10.0.0.1:1", "10.0.0.2:80")
	p.HandlePacket(stuck) // occupies the only worker
	// The handler returned; a packet of another connection is still taken and queued without blocking.
	other := newPacket(backend.TCP, backend.Outbound, "10.0.0.1:2", "10.0.0.2:80")
	p.HandlePacket(other)
	close(res.release)
	if got := stuck.wait(t); got != permAccept {
		t.Errorf("stuck: %v", got)
	}
	if got := other.wait(t); got != permAccept {
		t.Errorf("other: %v", got)
	}
}

// immediateResolver answers the ports in now at once and leaves the rest to its slowResolver.
type immediateResolver struct {
	slowResolver
	now map[uint16]backend.Process
}

func (r *immediateResolver) ResolveProcessNow(info *backend.Info) (backend.Process, bool) {
	if info.Local.Port() == 666 {
		panic("resolver bug")
	}
	p, ok := r.now[info.Local.Port()]
	return p, ok
}

// TestImmediateLookupDecidesInline checks that a lookup the resolver answers at once is decided before
// HandlePacket returns, while one it cannot answer still goes to a worker (which here waits for release).
func TestImmediateLookupDecidesInline(t *testing.T) {
	res := &immediateResolver{
		slowResolver: slowResolver{release: make(chan struct{}), procs: map[uint16]backend.Process{
			2000: {PID: 20, Path: "/usr/bin/curl", UID: 1000},
			666:  {PID: 21, Path: "/usr/bin/curl", UID: 1000},
		}},
		now: map[uint16]backend.Process{1000: {PID: 10, Path: "/usr/bin/curl", UID: -1}},
	}
	p := newPipeline(t, "rules: [{name: no-curl, action: block, app: /usr/bin/curl}]", Options{Processes: res})
	inline := newPacket(backend.TCP, backend.Outbound, "10.0.0.1:1000", "10.0.0.2:80")
	inline.info.UID = 1000
	p.HandlePacket(inline)
	select {
	case <-inline.done:
	default:
		t.Fatal("an immediate answer was not decided before HandlePacket returned")
	}
	if got := inline.wait(t); got != permBlock {
		t.Errorf("inline: %v, want %v", got, permBlock)
	}
	deferred := newPacket(backend.TCP, backend.Outbound, "10.0.0.1:2000", "10.0.0.2:80")
	p.HandlePacket(deferred)
	panicky := newPacket(backend.TCP, backend.Outbound, "10.0.0.1:666", "10.0.0.2:80")
	p.HandlePacket(panicky) // the immediate lookup panics: the worker's lookup still runs
	select {
	case <-deferred.done:
		t.Fatal("a lookup the resolver could not answer at once was decided without the worker")
	default:
	}
	close(res.release)
	if got := deferred.wait(t); got != permBlock {
		t.Errorf("deferred: %v, want %v", got, permBlock)
	}
	if got := panicky.wait(t); got != permAccept { // the slow resolver panics on 666 too
		t.Errorf("after a panicking immediate lookup: %v, want %v", got, permAccept)
	}
	st := p.Stats()
	if st.ProcessInline != 1 || st.ProcessLookups != 3 {
		t.Errorf("stats: %d inline of %d lookups, want 1 of 3", st.ProcessInline, st.ProcessLookups)
	}
	for _, c := range p.Connections() {
		if c.Key.Local.Port() == 1000 && (c.PID != 10 || c.UID != 1000) {
			t.Errorf("inline connection %+v: want pid 10, the packet's uid 1000", c)
		}
	}
}

func TestReevaluationReportsExactlyChanged(t *testing.T) {
	p := newPipeline(t, basicPolicy, Options{OwnPID: 4242})
	pkts := []*testPacket{
		newPacket(backend.TCP, backend.Outbound, "10.0.0.1:40000", "10.0.0.2:80"),   // accept -> block
		newPacket(backend.TCP, backend.Outbound, "10.0.0.1:40001", "10.0.0.2:23"),   // block -> accept
		newPacket(backend.UDP, backend.Outbound, "10.0.0.1:40002", "10.0.0.2:53"),   // drop stays
		newPacket(backend.TCP, backend.Outbound, "10.0.0.1:40003", "10.0.0.3:80"),   // accept stays
		newPacket(backend.TCP, backend.Outbound, "10.0.0.1:40004", "10.0.0.2:8080"), // own: never re-evaluated
	}
	pkts[4].info.PID = 4242
	for _, pk := range pkts {
		p.HandlePacket(pk)
		pk.wait(t)
	}
	changes := p.SetPolicy(mustPolicy(t, `
rules:
  - {name: drop-dns, action: drop, protocol: udp, ports: [53]}
  - {name: block-host, action: block, remote: [10.0.0.2]}
  - {name: allow-telnet, action: allow, ports: [23]}
`))
	got := map[string]string{}
	for _, c := range changes {
		got[c.Key.String()] = c.Old.String() + ">" + c.New.String()
	}
	// block-host precedes allow-telnet, so 40001 keeps its block (now by another rule, which is no change
	// for the kernel); 40003 and the DNS drop keep theirs; the own connection is never touched.
	want := map[string]string{
		"tcp 10.0.0.1:40000 10.0.0.2:80": "accept-permanent>block-permanent",
	}
	if len(got) != len(want) {
		t.Fatalf("changes %v, want %v", got, want)
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s: %q, want %q", k, got[k], v)
		}
	}
	c := p.Lookup(pkts[0].info.Key())
	if name, _, _ := c.Rule(); name != "block-host" || c.Decision() != permBlock {
		t.Errorf("stored conn after reload: %s %v", name, c.Decision())
	}
	// The next packet of a changed connection gets the new decision.
	again := newPacket(backend.TCP, backend.Outbound, "10.0.0.1:40000", "10.0.0.2:80")
	p.HandlePacket(again)
	if d := again.wait(t); d != permBlock {
		t.Errorf("after reload: %v", d)
	}
}

func TestTableBound(t *testing.T) {
	p := newPipeline(t, "", Options{MaxConnections: connShards * 2})
	for i := 0; i < 1000; i++ {
		pkt := &reusablePacket{info: backend.Info{Protocol: backend.UDP,
			Local:  netip.AddrPortFrom(netip.MustParseAddr("10.0.0.1"), uint16(1000+i)),
			Remote: netip.MustParseAddrPort("10.0.0.2:80"), PID: -1, UID: -1}}
		p.HandlePacket(pkt)
		if pkt.n.Load() != 1 {
			t.Fatalf("packet %d answered %d times", i, pkt.n.Load())
		}
	}
	st := p.Stats()
	if st.Connections > connShards*2 || st.Evicted != uint64(1000-st.Connections) {
		t.Errorf("connections %d, evicted %d", st.Connections, st.Evicted)
	}
}

func TestConcurrentPacketsOneAnswerEach(t *testing.T) {
	p := newPipeline(t, basicPolicy, Options{})
	var wg sync.WaitGroup
	pkts := make([]*testPacket, 400)
	for i := range pkts {
		// 4 packets per connection, racing.
		pkts[i] = newPacket(backend.TCP, backend.Outbound,
			netip.AddrPortFrom(netip.MustParseAddr("10.0.0.1"), uint16(2000+i/4)).String(), "10.0.0.2:23")
	}
	for _, pk := range pkts {
		wg.Add(1)
		go func(pk *testPacket) {
			defer wg.Done()
			p.HandlePacket(pk)
		}(pk)
	}
	wg.Wait()
	for _, pk := range pkts {
		if d := pk.wait(t); d != permBlock || pk.calls != 1 {
			t.Fatalf("%s: %v after %d calls", pk.info.String(), d, pk.calls)
		}
	}
	if st := p.Stats(); st.Connections != 100 {
		t.Errorf("connections %d", st.Connections)
	}
}

func TestSweepExpiresIdle(t *testing.T) {
	p := newPipeline(t, "", Options{})
	for i, proto := range []backend.Protocol{backend.TCP, backend.UDP, backend.ICMP} {
		pk := newPacket(proto, backend.Outbound, netip.AddrPortFrom(netip.MustParseAddr("10.0.0.1"), uint16(i+1)).String(), "10.0.0.2:1")
		p.HandlePacket(pk)
		pk.wait(t)
	}
	now := time.Unix(p.clock.Load(), 0)
	if n := p.sweep(now.Add(time.Minute)); n != 1 { // ICMP only
		t.Errorf("after a minute %d expired", n)
	}
	if n := p.sweep(now.Add(time.Hour)); n != 1 { // UDP
		t.Errorf("after an hour %d expired", n)
	}
	if n := p.sweep(now.Add(7 * time.Hour)); n != 1 { // TCP
		t.Errorf("after 7 hours %d expired", n)
	}
}

func TestExplain(t *testing.T) {
	p := newPipeline(t, basicPolicy, Options{})
	m := p.Explain(Query{Protocol: backend.TCP, Remote: netip.MustParseAddr("1.2.3.4"), ServicePort: 443, UID: -1})
	if m.Action != config.Split || m.Name != "split-web" || m.Via != "eth1" {
		t.Errorf("explain %+v", m)
	}
}

func BenchmarkNewConnection(b *testing.B) {
	p := New(mustPolicy(b, realisticRules(1000)), Options{})
	defer p.Close()
	pkt := &reusablePacket{info: backend.Info{Protocol: backend.TCP, Local: netip.MustParseAddrPort("10.0.0.1:1"),
		Remote: netip.MustParseAddrPort("10.0.0.2:80"), PID: -1, UID: -1}}
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		pkt.info.Local = netip.AddrPortFrom(pkt.info.Local.Addr(), uint16(i))
		pkt.info.Remote = netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}), 80)
		p.HandlePacket(pkt)
	}
}

// BenchmarkNewConnectionFresh is BenchmarkNewConnection in a daemon's first 40 000 connections: every 40 000
// connections the pipeline starts over (not timed), so its table never holds more than a busy machine's first
// seconds bring.
func BenchmarkNewConnectionFresh(b *testing.B) {
	pol := mustPolicy(b, realisticRules(1000))
	pkt := &reusablePacket{info: backend.Info{Protocol: backend.TCP, Local: netip.MustParseAddrPort("10.0.0.1:1"),
		Remote: netip.MustParseAddrPort("10.0.0.2:80"), PID: -1, UID: -1}}
	const perDaemon = 40000
	var p *Pipeline
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		if i%perDaemon == 0 {
			b.StopTimer()
			if p != nil {
				p.Close()
			}
			p = New(pol, Options{})
			b.StartTimer()
		}
		pkt.info.Local = netip.AddrPortFrom(pkt.info.Local.Addr(), uint16(i))
		pkt.info.Remote = netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}), 80)
		p.HandlePacket(pkt)
	}
	b.StopTimer()
	p.Close()
}

func BenchmarkKnownConnection(b *testing.B) {
	p := New(mustPolicy(b, basicPolicy), Options{})
	defer p.Close()
	pkt := &reusablePacket{info: backend.Info{Protocol: backend.TCP, Local: netip.MustParseAddrPort("10.0.0.1:1"),
		Remote: netip.MustParseAddrPort("10.0.0.2:80"), PID: -1, UID: -1}}
	p.HandlePacket(pkt)
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			p.HandlePacket(pkt)
		}
	})
}

type nameMap map[netip.Addr]string

func (m nameMap) DomainOf(a netip.Addr) (string, bool) { s, ok := m[a]; return s, ok }

func TestDNSRerouteAndDomainRules(t *testing.T) {
	ns := []netip.AddrPort{netip.MustParseAddrPort("127.0.0.17:53"), netip.MustParseAddrPort("[::1]:53")}
	names := nameMap{netip.MustParseAddr("192.0.2.7"): "a.example.net", netip.MustParseAddr("192.0.2.8"): "b.example.org"}
	p := newPipeline(t, `
default_action: block
rules:
  - {name: no-example-net, action: block, remote: ["*.example.net"]}
  - {name: no-dns-for-x, action: drop, app: /bin/x, ports: [53]}
  - {name: web, action: allow, protocol: tcp, ports: [80, 443]}
`, Options{Names: names, Nameserver: ns, Processes: &slowResolver{procs: map[uint16]backend.Process{
		5300: {PID: 77, Path: "/bin/x"}}}})
	reroute := backend.Decision{Verdict: backend.RerouteToNameserver, Permanent: true}
	tests := []struct {
		name          string
		proto         backend.Protocol
		local, remote string
		want          backend.Decision
		rule          string
	}{
		{"udp dns to any resolver", backend.UDP, "10.0.0.1:40000", "8.8.8.8:53", reroute, "nameserver"},
		{"tcp dns too", backend.TCP, "10.0.0.1:40001", "[2001:db8::53]:53", reroute, "nameserver"},
		{"already to our nameserver", backend.UDP, "127.0.0.1:40002", "127.0.0.17:53", permBlock, ""},
		{"a rule dropping an app's dns wins", backend.UDP, "10.0.0.1:5300", "8.8.8.8:53", permDrop, "no-dns-for-x"},
		{"domain rule by resolved name", backend.TCP, "10.0.0.1:40003", "192.0.2.7:443", permBlock, "no-example-net"},
		{"other name allowed", backend.TCP, "10.0.0.1:40004", "192.0.2.8:443", permAccept, "web"},
		{"unknown address allowed", backend.TCP, "10.0.0.1:40005", "192.0.2.9:443", permAccept, "web"},
	}
	for _, tt := range tests {
		pkt := newPacket(tt.proto, backend.Outbound, tt.local, tt.remote)
		p.HandlePacket(pkt)
		if got := pkt.wait(t); got != tt.want {
			t.Errorf("%s: %v, want %v", tt.name, got, tt.want)
		}
		c := p.Lookup(pkt.info.Key())
		if name, _, _ := c.Rule(); name != tt.rule {
			t.Errorf("%s: decided by %q, want %q", tt.name, name, tt.rule)
		}
	}
	if c := p.Lookup(backend.ConnKey{Protocol: backend.TCP, Local: netip.MustParseAddrPort("10.0.0.1:40003"),
		Remote: netip.MustParseAddrPort("192.0.2.7:443")}); c.Domain != "a.example.net" {
		t.Errorf("domain recorded %q", c.Domain)
	}
	pol := p.Policy()
	for name, want := range map[string]bool{"a.example.net": true, "example.net": true, "b.example.org": false, "x.test": false} {
		if got := pol.BlockDomain(name); got != want {
			t.Errorf("BlockDomain(%q) = %v, want %v (default block must not block names)", name, got, want)
		}
	}
}

func TestShardSize(t *testing.T) {
	if s := unsafe.Sizeof(connShard{}); s != 64 {
		t.Errorf("connShard is %d bytes, want one 64-byte cache line", s)
	}
}

// Every valid decision survives the connection table's packing, including a split route.
func TestPackDecisionRoundTrip(t *testing.T) {
	for v := backend.Verdict(0); v.Valid(); v++ {
		for _, perm := range []bool{false, true} {
			routes := []uint8{0}
			if v == backend.RerouteToSplitTun {
				routes = []uint8{0, 1, 7, backend.MaxSplitRoutes}
			}
			for _, r := range routes {
				d := backend.Decision{Verdict: v, Permanent: perm, Route: r}
				if got := unpackDecision(packDecision(d)); got != d {
					t.Errorf("%+v packed and unpacked is %+v", d, got)
				}
			}
		}
	}
	if got := unpackDecision(packDecision(backend.AcceptFinal)); got != backend.AcceptFinal {
		t.Errorf("accept-final round trip: %+v", got)
	}
}

// splitRouter is a SplitRouter that routes eth1 as route 3 and blocks everything else, recording its calls.
type splitRouter struct {
	splitLog
	calls []string
}

func (s *splitRouter) RouteSplit(proto backend.Protocol, remote netip.Addr, via string, fresh bool) backend.Decision {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.calls = append(s.calls, fmt.Sprintf("%s %s %s fresh=%v", proto, remote, via, fresh))
	if via == "eth1" {
		return backend.Decision{Verdict: backend.RerouteToSplitTun, Permanent: true, Route: 3}
	}
	return permBlock
}

// A split carrier that routes decides how each split connection is carried; a kernel-routed connection is not
// recorded for the proxy; re-evaluation asks again without counting as a new connection.
func TestSplitRouterDecides(t *testing.T) {
	r := &splitRouter{}
	p := newPipeline(t, basicPolicy, Options{Split: r})
	pkt := newPacket(backend.TCP, backend.Outbound, "10.0.0.1:40004", "192.0.2.1:443")
	p.HandlePacket(pkt)
	want := backend.Decision{Verdict: backend.RerouteToSplitTun, Permanent: true, Route: 3}
	if got := pkt.wait(t); got != want {
		t.Fatalf("decision %v (route %d), want route 3", got, got.Route)
	}
	if len(r.entries) != 0 {
		t.Errorf("a kernel-routed connection was recorded for the proxy: %q", r.entries)
	}
	// The rule now splits via eth2, which the router blocks: the live connection's decision changes.
	changes := p.SetPolicy(mustPolicy(t, strings.Replace(basicPolicy, "via: eth1", "via: eth2", 1)))
	if len(changes) != 1 || changes[0].New != permBlock || changes[0].Old != want {
		t.Errorf("changes %+v", changes)
	}
	if diff := cmp.Diff([]string{"tcp 192.0.2.1 eth1 fresh=true", "tcp 192.0.2.1 eth2 fresh=false"}, r.calls); diff != "" {
		t.Errorf("router calls (-want +got):\n%s", diff)
	}
}
