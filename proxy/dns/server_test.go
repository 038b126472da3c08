package dns

import (
	"context"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	mdns "github.com/miekg/dns"
)

var blockAds = blockList{"doubleclick.net"}

func TestBlockedAndAllowed(t *testing.T) {
	up := startUpstream(t, defaultZone(t))
	_, _, nxAddr := newTestServer(t, blockAds, []string{up.addr})
	_, _, zeroAddr := newTestServer(t, blockAds, []string{up.addr}, func(c *Config) { c.BlockResponse = BlockZero })

	tests := []struct {
		name   string
		addr   string
		netw   string
		qname  string
		qtype  uint16
		rcode  int
		answer []string // without TTLs
	}{
		{"allowed A", nxAddr, "udp", "example.com.", mdns.TypeA, mdns.RcodeSuccess,
			[]string{"example.com.\t0\tIN\tA\t192.0.2.1"}},
		{"allowed AAAA", nxAddr, "udp", "example.com.", mdns.TypeAAAA, mdns.RcodeSuccess,
			[]string{"example.com.\t0\tIN\tAAAA\t2001:db8::1"}},
		{"allowed over tcp", nxAddr, "tcp", "example.com.", mdns.TypeA, mdns.RcodeSuccess,
			[]string{"example.com.\t0\tIN\tA\t192.0.2.1"}},
		{"blocked nxdomain", nxAddr, "udp", "ads.doubleclick.net.", mdns.TypeA, mdns.RcodeNameError, nil},
		{"blocked nxdomain tcp", nxAddr, "tcp", "ads.doubleclick.net.", mdns.TypeAAAA, mdns.RcodeNameError, nil},
		{"blocked mixed case", nxAddr, "udp", "ADS.DoubleClick.NET.", mdns.TypeA, mdns.RcodeNameError, nil},
		{"blocked zero A", zeroAddr, "udp", "ads.doubleclick.net.", mdns.TypeA, mdns.RcodeSuccess,
			[]string{"ads.doubleclick.net.\t0\tIN\tA\t0.0.0.0"}},
		{"blocked zero AAAA", zeroAddr, "tcp", "ads.doubleclick.net.", mdns.TypeAAAA, mdns.RcodeSuccess,
			[]string{"ads.doubleclick.net.\t0\tIN\tAAAA\t::"}},
		{"blocked zero TXT is NODATA", zeroAddr, "udp", "ads.doubleclick.net.", mdns.TypeTXT, mdns.RcodeSuccess, nil},
		{"blocked by CNAME chain", nxAddr, "udp", "cloaked.example.com.", mdns.TypeA, mdns.RcodeNameError, nil},
		{"unknown name", nxAddr, "udp", "nope.example.com.", mdns.TypeA, mdns.RcodeNameError, nil},
		{"allowed CNAME chain", zeroAddr, "udp", "www.example.com.", mdns.TypeA, mdns.RcodeSuccess, []string{
			"www.example.com.\t0\tIN\tCNAME\tcdn.example.net.",
			"cdn.example.net.\t0\tIN\tA\t192.0.2.10",
			"cdn.example.net.\t0\tIN\tA\t192.0.2.11"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			for i := range 2 { // the second round is served from the cache where cacheable
				r := ask(t, tc.addr, tc.netw, tc.qname, tc.qtype, i == 1)
				if r.Rcode != tc.rcode {
					t.Fatalf("round %d: rcode %s, want %s", i, mdns.RcodeToString[r.Rcode], mdns.RcodeToString[tc.rcode])
				}
				if diff := cmp.Diff(tc.answer, rrStrings(r.Answer, false)); diff != "" {
					t.Errorf("round %d: answer (-want +got):\n%s", i, diff)
				}
				if !r.Response || !r.RecursionAvailable || r.Question[0].Name != tc.qname {
					t.Errorf("round %d: header/question wrong: %v", i, r)
				}
				if (r.IsEdns0() != nil) != (i == 1) {
					t.Errorf("round %d: OPT present %v, want %v", i, r.IsEdns0() != nil, i == 1)
				}
			}
		})
	}
	// Blocked names never reached the upstream.
	for _, qt := range []uint16{mdns.TypeA, mdns.TypeAAAA, mdns.TypeTXT} {
		if n := up.count("ads.doubleclick.net.", qt); n != 0 {
			t.Errorf("blocked name %s reached the upstream %d times", mdns.TypeToString[qt], n)
		}
	}
}

func TestTCPForwardedOverTCP(t *testing.T) {
	up := startUpstream(t, defaultZone(t))
	_, _, addr := newTestServer(t, nil, []string{up.addr})
	r := ask(t, addr, "tcp", "example.com.", mdns.TypeAAAA, false)
	if got := rrStrings(r.Answer, false); len(got) != 1 {
		t.Fatalf("answer %v", got)
	}
	if u, c := up.udpQueries.Load(), up.tcpQueries.Load(); u != 0 || c != 1 {
		t.Errorf("upstream saw %d UDP and %d TCP queries, want 0 and 1", u, c)
	}
}

func TestTruncationFallsBackToTCP(t *testing.T) {
	up := startUpstream(t, defaultZone(t))
	up.set(func(u *testUpstream) { u.truncUDP["big.example.com."] = true })
	s, _, addr := newTestServer(t, nil, []string{up.addr})

	// A UDP client with a large EDNS buffer gets the whole answer: we retried upstream over TCP.
	r := ask(t, addr, "udp", "big.example.com.", mdns.TypeTXT, true)
	if len(r.Answer) != 40 || r.Truncated {
		t.Fatalf("got %d records, truncated %v; want 40, false", len(r.Answer), r.Truncated)
	}
	if u, c := up.udpQueries.Load(), up.tcpQueries.Load(); u != 1 || c != 1 {
		t.Errorf("upstream saw %d UDP and %d TCP queries, want 1 and 1", u, c)
	}
	// A client without EDNS (512 bytes) gets a truncated answer from the cache, and the whole one over TCP.
	r = ask(t, addr, "udp", "big.example.com.", mdns.TypeTXT, false)
	if !r.Truncated || len(r.Answer) >= 40 {
		t.Errorf("no-EDNS client: truncated %v with %d records; want truncated", r.Truncated, len(r.Answer))
	}
	r = ask(t, addr, "tcp", "big.example.com.", mdns.TypeTXT, false)
	if r.Truncated || len(r.Answer) != 40 {
		t.Errorf("TCP client: truncated %v with %d records", r.Truncated, len(r.Answer))
	}
	if st := s.Stats(); st.CacheHits != 2 || st.CacheMisses != 1 {
		t.Errorf("stats %+v, want 2 hits and 1 miss", st)
	}
}

func TestCacheHonoursTTL(t *testing.T) {
	up := startUpstream(t, defaultZone(t))
	s, clk, addr := newTestServer(t, nil, []string{up.addr})

	ttlOf := func(r *mdns.Msg) []uint32 {
		var out []uint32
		for _, rr := range r.Answer {
			out = append(out, rr.Header().Ttl)
		}
		return out
	}
	// www.example.com: CNAME TTL 600, A TTL 60: cached for the minimum, 60 s.
	r := ask(t, addr, "udp", "www.example.com.", mdns.TypeA, false)
	if diff := cmp.Diff([]uint32{600, 60, 60}, ttlOf(r)); diff != "" {
		t.Fatalf("fresh TTLs (-want +got):\n%s", diff)
	}
	clk.Advance(25 * time.Second)
	r = ask(t, addr, "udp", "WWW.example.COM.", mdns.TypeA, false) // case does not matter to the cache
	if diff := cmp.Diff([]uint32{575, 35, 35}, ttlOf(r)); diff != "" {
		t.Errorf("TTLs after 25 s (-want +got):\n%s", diff)
	}
	if r.Question[0].Name != "WWW.example.COM." {
		t.Errorf("question not echoed in the client's case: %q", r.Question[0].Name)
	}
	if n := up.count("www.example.com.", mdns.TypeA); n != 1 {
		t.Fatalf("upstream asked %d times within the TTL, want 1", n)
	}
	clk.Advance(35 * time.Second) // exactly 60 s: expired
	r = ask(t, addr, "udp", "www.example.com.", mdns.TypeA, false)
	if n := up.count("www.example.com.", mdns.TypeA); n != 2 {
		t.Errorf("upstream asked %d times after the TTL, want 2", n)
	}
	if diff := cmp.Diff([]uint32{600, 60, 60}, ttlOf(r)); diff != "" {
		t.Errorf("refetched TTLs (-want +got):\n%s", diff)
	}

	// A TTL of 0 is never cached.
	ask(t, addr, "udp", "zero.example.com.", mdns.TypeA, false)
	ask(t, addr, "udp", "zero.example.com.", mdns.TypeA, false)
	if n := up.count("zero.example.com.", mdns.TypeA); n != 2 {
		t.Errorf("TTL 0 answer: upstream asked %d times, want 2", n)
	}
	if st := s.Stats(); st.CacheHits != 1 {
		t.Errorf("cache hits %d, want 1", st.CacheHits)
	}
}

func TestNegativeCaching(t *testing.T) {
	up := startUpstream(t, defaultZone(t))
	up.set(func(u *testUpstream) { u.nxTTL = 30 })
	_, clk, addr := newTestServer(t, nil, []string{up.addr})
	tests := []struct {
		name    string
		qname   string
		qtype   uint16
		rcode   int
		cachedS int // seconds the answer is cached; 0 = not cached
	}{
		{"nxdomain with SOA", "missing.example.com.", mdns.TypeA, mdns.RcodeNameError, 30},
		{"nodata with SOA", "nodata.example.com.", mdns.TypeA, mdns.RcodeSuccess, 30},
		{"nodata without SOA", "nodata-nosoa.example.com.", mdns.TypeA, mdns.RcodeSuccess, 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := ask(t, addr, "udp", tc.qname, tc.qtype, false)
			if r.Rcode != tc.rcode || len(r.Answer) != 0 {
				t.Fatalf("rcode %s, %d answers", mdns.RcodeToString[r.Rcode], len(r.Answer))
			}
			want := int64(2)
			if tc.cachedS > 0 {
				clk.Advance(time.Duration(tc.cachedS-1) * time.Second)
				ask(t, addr, "udp", tc.qname, tc.qtype, false)
				want = 1
			} else {
				ask(t, addr, "udp", tc.qname, tc.qtype, false)
			}
			if n := up.count(tc.qname, tc.qtype); n != want {
				t.Fatalf("upstream asked %d times, want %d", n, want)
			}
			if tc.cachedS > 0 {
				clk.Advance(time.Second)
				ask(t, addr, "udp", tc.qname, tc.qtype, false)
				if n := up.count(tc.qname, tc.qtype); n != 2 {
					t.Errorf("after expiry upstream asked %d times, want 2", n)
				}
			}
		})
	}
}

func TestNegativeTTLIsBounded(t *testing.T) {
	up := startUpstream(t, defaultZone(t))
	up.set(func(u *testUpstream) { u.nxTTL = 7 * 24 * 3600 })
	_, clk, addr := newTestServer(t, nil, []string{up.addr})
	ask(t, addr, "udp", "missing.example.com.", mdns.TypeA, false)
	clk.Advance(maxNegativeTTL * time.Second)
	ask(t, addr, "udp", "missing.example.com.", mdns.TypeA, false)
	if n := up.count("missing.example.com.", mdns.TypeA); n != 2 {
		t.Errorf("negative answer outlived the %d s bound: upstream asked %d times", maxNegativeTTL, n)
	}
}

// blackhole is a UDP socket that reads queries and never answers: an upstream that is down.
func blackhole(t *testing.T) string {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	go func() {
		buf := make([]byte, 2048)
		for {
			if _, _, err := pc.ReadFrom(buf); err != nil {
				return
			}
		}
	}()
	return pc.LocalAddr().String()
}

// closedPort returns a loopback UDP address nobody listens on.
func closedPort(t *testing.T) string {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	a := pc.LocalAddr().String()
	pc.Close()
	return a
}

func TestDeadUpstreamServFailsQuickly(t *testing.T) {
	const timeout = 200 * time.Millisecond
	tests := []struct {
		name    string
		ups     func(t *testing.T) []string
		netw    string
		maxTime time.Duration
	}{
		{"silent udp", func(t *testing.T) []string { return []string{blackhole(t)} }, "udp", 5 * timeout},
		{"silent udp, client over tcp", func(t *testing.T) []string { return []string{blackhole(t)} }, "tcp", 5 * timeout},
		{"refused port", func(t *testing.T) []string { return []string{closedPort(t)} }, "udp", 5 * timeout},
		{"two silent", func(t *testing.T) []string { return []string{blackhole(t), blackhole(t)} }, "udp", 8 * timeout},
		{"dead tls", func(t *testing.T) []string { return []string{"tls://" + closedPort(t)} }, "udp", 5 * timeout},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s, _, addr := newTestServer(t, nil, tc.ups(t), func(c *Config) { c.Timeout = timeout })
			start := time.Now()
			r := ask(t, addr, tc.netw, "example.com.", mdns.TypeA, false)
			took := time.Since(start)
			if r.Rcode != mdns.RcodeServerFailure {
				t.Errorf("rcode %s, want SERVFAIL", mdns.RcodeToString[r.Rcode])
			}
			if took > tc.maxTime {
				t.Errorf("SERVFAIL took %s, want under %s", took, tc.maxTime)
			}
			if st := s.Stats(); st.ServFails != 1 || st.UpstreamFailures == 0 {
				t.Errorf("stats %+v", st)
			}
		})
	}
}

func TestFailoverToLiveUpstream(t *testing.T) {
	up := startUpstream(t, defaultZone(t))
	s, _, addr := newTestServer(t, nil, []string{blackhole(t), up.addr}, func(c *Config) { c.Timeout = 200 * time.Millisecond })
	r := ask(t, addr, "udp", "example.com.", mdns.TypeA, false)
	if len(r.Answer) != 1 {
		t.Fatalf("answer %v", r.Answer)
	}
	// The live upstream is preferred from now on: the next miss does not try the dead one (the counters show
	// it; no timing assertion needed).
	ask(t, addr, "udp", "example.com.", mdns.TypeAAAA, false)
	if st := s.Stats(); st.UpstreamFailures != 1 || st.UpstreamQueries != 3 {
		t.Errorf("stats %+v, want 1 failure of 3 attempts", st)
	}
}

func TestDomainOf(t *testing.T) {
	up := startUpstream(t, defaultZone(t))
	s, clk, addr := newTestServer(t, blockAds, []string{up.addr})

	ask(t, addr, "udp", "www.example.com.", mdns.TypeA, false)
	ask(t, addr, "tcp", "Example.COM.", mdns.TypeAAAA, false)
	ask(t, addr, "udp", "ads.doubleclick.net.", mdns.TypeA, false) // blocked: nothing recorded
	tests := []struct {
		ip    string
		want  string
		chain []string
	}{
		{"192.0.2.10", "www.example.com", []string{"www.example.com", "cdn.example.net"}},
		{"192.0.2.11", "www.example.com", []string{"www.example.com", "cdn.example.net"}},
		{"::ffff:192.0.2.11", "www.example.com", []string{"www.example.com", "cdn.example.net"}},
		{"2001:db8::1", "example.com", []string{"example.com"}},
		{"192.0.2.66", "", nil},
		{"192.0.2.99", "", nil},
	}
	for _, tc := range tests {
		ip := netip.MustParseAddr(tc.ip)
		got, ok := s.DomainOf(ip)
		if got != tc.want || ok != (tc.want != "") {
			t.Errorf("DomainOf(%s) = %q, %v; want %q", tc.ip, got, ok, tc.want)
		}
		if diff := cmp.Diff(tc.chain, s.DomainsOf(ip)); diff != "" {
			t.Errorf("DomainsOf(%s) (-want +got):\n%s", tc.ip, diff)
		}
	}

	// The A records live 60 s; the map keeps them for TTL + grace (5 min by default), so a connection opened
	// after the TTL is still attributed.
	ip := netip.MustParseAddr("192.0.2.10")
	clk.Advance(60*time.Second + DefaultMapGrace - time.Second)
	if _, ok := s.DomainOf(ip); !ok {
		t.Error("forgotten before TTL + grace")
	}
	clk.Advance(time.Second)
	if d, ok := s.DomainOf(ip); ok {
		t.Errorf("still known after TTL + grace: %q", d)
	}

	// The latest answer wins when two names share an address; serving from the cache counts as answering.
	up.set(func(u *testUpstream) {
		u.records["shared.example.org./A"] = rrs(t, "shared.example.org. 300 IN A 192.0.2.1")
	})
	ask(t, addr, "udp", "shared.example.org.", mdns.TypeA, false)
	ask(t, addr, "udp", "example.com.", mdns.TypeA, false)
	if d, _ := s.DomainOf(netip.MustParseAddr("192.0.2.1")); d != "example.com" {
		t.Errorf("shared address: %q, want example.com", d)
	}
	ask(t, addr, "udp", "shared.example.org.", mdns.TypeA, false) // cache hit
	if d, _ := s.DomainOf(netip.MustParseAddr("192.0.2.1")); d != "shared.example.org" {
		t.Errorf("shared address after cache hit: %q, want shared.example.org", d)
	}
}

func TestPolicyChangeTakesEffectDespiteCache(t *testing.T) {
	up := startUpstream(t, defaultZone(t))
	s, _, addr := newTestServer(t, nil, []string{up.addr})
	if r := ask(t, addr, "udp", "ads.doubleclick.net.", mdns.TypeA, false); len(r.Answer) != 1 {
		t.Fatalf("unblocked: %v", r)
	}
	s.SetPolicy(blockAds)
	if r := ask(t, addr, "udp", "ads.doubleclick.net.", mdns.TypeA, false); r.Rcode != mdns.RcodeNameError {
		t.Errorf("after SetPolicy: rcode %s, want NXDOMAIN", mdns.RcodeToString[r.Rcode])
	}
	s.SetPolicy(nil)
	if r := ask(t, addr, "udp", "ads.doubleclick.net.", mdns.TypeA, false); len(r.Answer) != 1 {
		t.Errorf("unblocked again: %v", r)
	}
	if n := up.count("ads.doubleclick.net.", mdns.TypeA); n != 1 {
		t.Errorf("upstream asked %d times, want 1 (the cache outlives policy changes)", n)
	}
}

func TestIdenticalQueriesShareOneUpstreamQuery(t *testing.T) {
	up := startUpstream(t, defaultZone(t))
	gate := make(chan struct{})
	up.set(func(u *testUpstream) { u.gate = gate })
	s, _, addr := newTestServer(t, nil, []string{up.addr})
	const n = 8
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for range n {
		wg.Go(func() {
			r, err := exchange(addr, "udp", "example.com.", mdns.TypeA, false)
			if err == nil && len(r.Answer) != 1 {
				err = &net.DNSError{Err: "no answer"}
			}
			errs <- err
		})
	}
	// Wait (bounded) until every query has arrived and all are waiting on the one upstream query.
	deadline := time.Now().Add(5 * time.Second)
	for s.Stats().CacheMisses < n && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	close(gate)
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	if c := up.count("example.com.", mdns.TypeA); c != 1 {
		t.Errorf("upstream asked %d times for %d identical concurrent queries, want 1", c, n)
	}
}

func TestRejectsWhatIsNotAQuery(t *testing.T) {
	up := startUpstream(t, defaultZone(t))
	s, _, addr := newTestServer(t, nil, []string{up.addr})
	c := &mdns.Client{Net: "tcp", Timeout: 5 * time.Second}
	tests := []struct {
		name  string
		msg   func() *mdns.Msg
		rcode int
	}{
		{"zone transfer", func() *mdns.Msg { m := new(mdns.Msg); m.SetAxfr("example.com."); return m }, mdns.RcodeRefused},
		{"notify", func() *mdns.Msg { m := new(mdns.Msg); m.SetNotify("example.com."); return m }, mdns.RcodeNotImplemented},
		{"edns version 1", func() *mdns.Msg {
			m := new(mdns.Msg)
			m.SetQuestion("example.com.", mdns.TypeA)
			m.SetEdns0(1232, false)
			m.IsEdns0().SetVersion(1)
			return m
		}, mdns.RcodeBadVers},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r, _, err := c.Exchange(tc.msg(), addr)
			if err != nil {
				t.Fatal(err)
			}
			if r.Rcode != tc.rcode {
				t.Errorf("rcode %s, want %s", mdns.RcodeToString[r.Rcode], mdns.RcodeToString[tc.rcode])
			}
		})
	}
	if st := s.Stats(); st.Rejected != 3 || st.UpstreamQueries != 0 {
		t.Errorf("stats %+v", st)
	}
}

func TestStartClose(t *testing.T) {
	checkNoGoroutineLeak(t)
	up := startUpstream(t, defaultZone(t))
	// IPv6 loopback may be missing; it is then skipped with a warning.
	s, err := New(Config{Listen: []string{"127.0.0.1:0", "[::1]:0"}, Upstreams: []string{up.addr}}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if err := s.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if err := s.Start(ctx); err == nil {
		t.Error("second Start succeeded")
	}
	addrs := s.Addrs()
	if len(addrs) == 0 {
		t.Fatal("no listen address")
	}
	for _, a := range addrs {
		for _, netw := range []string{"udp", "tcp"} {
			if r := ask(t, a.String(), netw, "example.com.", mdns.TypeA, false); len(r.Answer) != 1 {
				t.Errorf("%s %s: %v", netw, a, r)
			}
		}
	}
	// Cancelling the context closes the server.
	cancel()
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		if _, err := exchange(addrs[0].String(), "tcp", "example.com.", mdns.TypeA, false); err != nil {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if _, err := exchange(addrs[0].String(), "tcp", "example.com.", mdns.TypeA, false); err == nil {
		t.Error("still answering after the context ended")
	}
	if err := s.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

func TestStartFailsOnBusyAddress(t *testing.T) {
	ln, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	s, err := New(Config{Listen: []string{ln.LocalAddr().String()}, Upstreams: []string{"192.0.2.53"}}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Start(context.Background()); err == nil {
		t.Error("Start succeeded on a busy address")
	}
	if err := s.Close(); err != nil {
		t.Error(err)
	}
}

func TestNewRejects(t *testing.T) {
	tests := []struct {
		name string
		cfg  Config
	}{
		{"bad block response", Config{BlockResponse: "refuse", Upstreams: []string{"192.0.2.53"}}},
		{"upstream is ourselves", Config{Listen: []string{"127.0.0.17:53"}, Upstreams: []string{"127.0.0.17:53"}}},
		{"upstream name", Config{Upstreams: []string{"dns.google"}}},
	}
	for _, tc := range tests {
		if _, err := New(tc.cfg, nil, nil); err == nil {
			t.Errorf("%s: New succeeded", tc.name)
		}
	}
}
