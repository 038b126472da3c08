package dns

import (
	"context"
	"net"
	"net/netip"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	mdns "github.com/miekg/dns"
)

// testUpstream is a real DNS server (UDP and TCP on one loopback port) serving a small zone.
type testUpstream struct {
	t    *testing.T
	addr string
	// records maps "name./TYPE" to answers; names missing get NXDOMAIN with a SOA (minimum nxTTL).
	mu      sync.Mutex
	records map[string][]mdns.RR
	nxTTL   uint32
	// truncUDP names are answered with TC over UDP, forcing a retry over TCP.
	truncUDP map[string]bool
	// gate, when set, holds every answer until it is closed.
	gate chan struct{}

	udpQueries, tcpQueries atomic.Int64
	perName                sync.Map // "name./TYPE" → *atomic.Int64
	lastQuery              atomic.Pointer[mdns.Msg]
}

func rrs(t testing.TB, lines ...string) []mdns.RR {
	t.Helper()
	var out []mdns.RR
	for _, l := range lines {
		rr, err := mdns.NewRR(l)
		if err != nil {
			t.Fatalf("parsing %q: %v", l, err)
		}
		out = append(out, rr)
	}
	return out
}

// defaultZone serves several names: plain A/AAAA, a CNAME chain, a large TXT set and a blocked-looking name.
func defaultZone(t testing.TB) map[string][]mdns.RR {
	big := make([]string, 0, 40)
	for i := range 40 {
		big = append(big, "big.example.com. 300 IN TXT \""+strings.Repeat("x", 60)+string(rune('a'+i%26))+"\"")
	}
	return map[string][]mdns.RR{
		"example.com./A":             rrs(t, "example.com. 300 IN A 192.0.2.1"),
		"example.com./AAAA":          rrs(t, "example.com. 300 IN AAAA 2001:db8::1"),
		"ads.doubleclick.net./A":     rrs(t, "ads.doubleclick.net. 300 IN A 192.0.2.66"),
		"ads.doubleclick.net./AAAA":  rrs(t, "ads.doubleclick.net. 300 IN AAAA 2001:db8::66"),
		"ads.doubleclick.net./TXT":   rrs(t, "ads.doubleclick.net. 300 IN TXT \"hello\""),
		"www.example.com./A":         rrs(t, "www.example.com. 600 IN CNAME cdn.example.net.", "cdn.example.net. 60 IN A 192.0.2.10", "cdn.example.net. 60 IN A 192.0.2.11"),
		"cloaked.example.com./A":     rrs(t, "cloaked.example.com. 300 IN CNAME tracker.doubleclick.net.", "tracker.doubleclick.net. 300 IN A 192.0.2.99"),
		"big.example.com./TXT":       rrs(t, big...),
		"short.example.com./A":       rrs(t, "short.example.com. 5 IN A 192.0.2.5"),
		"zero.example.com./A":        rrs(t, "zero.example.com. 0 IN A 192.0.2.7"),
		"nodata.example.com./AAAA":   rrs(t, "nodata.example.com. 300 IN AAAA 2001:db8::7"),
		"nodata-nosoa.example.com./": nil,
	}
}

func startUpstream(t testing.TB, records map[string][]mdns.RR) *testUpstream {
	t.Helper()
	tt, _ := t.(*testing.T)
	u := &testUpstream{t: tt, records: records, nxTTL: 60, truncUDP: map[string]bool{}}
	pc, ln, err := listenPair(context.Background(), mustAddrPort(t, "127.0.0.1:0"))
	if err != nil {
		t.Fatal(err)
	}
	u.addr = pc.LocalAddr().String()
	startMDNS(t, &mdns.Server{PacketConn: pc, Handler: mdns.HandlerFunc(u.serve)})
	startMDNS(t, &mdns.Server{Listener: ln, Handler: mdns.HandlerFunc(u.serve)})
	return u
}

// startMDNS runs a library server until the test ends.
func startMDNS(t testing.TB, srv *mdns.Server) {
	t.Helper()
	started := make(chan struct{})
	srv.NotifyStartedFunc = func() { close(started) }
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = srv.ActivateAndServe()
	}()
	<-started
	t.Cleanup(func() {
		_ = srv.Shutdown()
		<-done
	})
}

// set changes the upstream's behaviour under its lock.
func (u *testUpstream) set(f func(u *testUpstream)) {
	u.mu.Lock()
	defer u.mu.Unlock()
	f(u)
}

func (u *testUpstream) count(name string, qtype uint16) int64 {
	v, ok := u.perName.Load(name + "/" + mdns.TypeToString[qtype])
	if !ok {
		return 0
	}
	return v.(*atomic.Int64).Load()
}

func (u *testUpstream) serve(w mdns.ResponseWriter, req *mdns.Msg) {
	tcp := isTCP(w)
	if tcp {
		u.tcpQueries.Add(1)
	} else {
		u.udpQueries.Add(1)
	}
	u.lastQuery.Store(req.Copy())
	q := req.Question[0]
	key := strings.ToLower(q.Name) + "/" + mdns.TypeToString[q.Qtype]
	v, _ := u.perName.LoadOrStore(key, new(atomic.Int64))
	v.(*atomic.Int64).Add(1)
	u.mu.Lock()
	gate := u.gate
	u.mu.Unlock()
	if gate != nil {
		<-gate
	}
	m := new(mdns.Msg)
	m.SetReply(req)
	m.Authoritative = true
	m.RecursionAvailable = true
	u.mu.Lock()
	ans, ok := u.records[key]
	trunc := u.truncUDP[strings.ToLower(q.Name)]
	nxTTL := u.nxTTL
	known := ok
	if !ok {
		for k := range u.records {
			if strings.HasPrefix(k, strings.ToLower(q.Name)+"/") {
				known = true
			}
		}
	}
	u.mu.Unlock()
	switch {
	case ok:
		m.Answer = ans
	case known && strings.Contains(q.Name, "nosoa"):
		// NODATA without a SOA: not cacheable.
	case known:
		m.Ns = rrs(u.t, "example.com. 3600 IN SOA ns.example.com. host.example.com. 1 7200 900 1209600 "+itoa(nxTTL))
	default:
		m.Rcode = mdns.RcodeNameError
		m.Ns = rrs(u.t, "example.com. 3600 IN SOA ns.example.com. host.example.com. 1 7200 900 1209600 "+itoa(nxTTL))
	}
	if opt := req.IsEdns0(); opt != nil {
		m.SetEdns0(opt.UDPSize(), opt.Do())
	}
	if trunc && !tcp {
		m.Answer = nil
		m.Truncated = true
	}
	_ = w.WriteMsg(m)
}

func itoa(n uint32) string {
	var b [10]byte
	i := len(b)
	for {
		i--
		b[i] = byte('0' + n%10)
		n /= 10
		if n == 0 {
			return string(b[i:])
		}
	}
}

// fakeClock is the injectable clock: tests move time instead of sleeping.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// blockList is a Policy blocking names and everything below them.
type blockList []string

func (b blockList) BlockDomain(name string) bool {
	for _, d := range b {
		if name == d || strings.HasSuffix(name, "."+d) {
			return true
		}
	}
	return false
}

type serverOpt func(*Config)

// newTestServer starts a nameserver on an ephemeral loopback port with a fake clock, forwarding to ups.
func newTestServer(t testing.TB, pol Policy, ups []string, opts ...serverOpt) (*Server, *fakeClock, string) {
	t.Helper()
	cfg := Config{Listen: []string{"127.0.0.1:0"}, Upstreams: ups, Timeout: time.Second}
	for _, o := range opts {
		o(&cfg)
	}
	s, err := New(cfg, pol, nil)
	if err != nil {
		t.Fatal(err)
	}
	clk := &fakeClock{t: s.epoch}
	s.now = clk.Now
	s.tick = 0 // DomainOf reads the fake clock directly
	if err := s.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return s, clk, s.Addrs()[0].String()
}

func ask(t testing.TB, addr, netw, name string, qtype uint16, edns bool) *mdns.Msg {
	t.Helper()
	r, err := exchange(addr, netw, name, qtype, edns)
	if err != nil {
		t.Fatalf("query %s %s over %s: %v", name, mdns.TypeToString[qtype], netw, err)
	}
	return r
}

func exchange(addr, netw, name string, qtype uint16, edns bool) (*mdns.Msg, error) {
	c := &mdns.Client{Net: netw, Timeout: 5 * time.Second}
	m := new(mdns.Msg)
	m.SetQuestion(name, qtype)
	if edns {
		m.SetEdns0(4096, false)
	}
	r, _, err := c.Exchange(m, addr)
	return r, err
}

// rrStrings renders answer records for comparison (the TTL left out when ttl is false).
func rrStrings(list []mdns.RR, ttl bool) []string {
	var out []string
	for _, rr := range list {
		if _, ok := rr.(*mdns.OPT); ok {
			continue
		}
		c := mdns.Copy(rr)
		if !ttl {
			c.Header().Ttl = 0
		}
		out = append(out, c.String())
	}
	return out
}

func mustAddrPort(t testing.TB, s string) netip.AddrPort {
	t.Helper()
	ap, err := parseListen(s)
	if err != nil {
		t.Fatal(err)
	}
	return ap
}

// checkNoGoroutineLeak fails when goroutines started during the test outlive it (bounded wait).
func checkNoGoroutineLeak(t *testing.T) {
	before := runtime.NumGoroutine()
	t.Cleanup(func() {
		deadline := time.Now().Add(5 * time.Second)
		for runtime.NumGoroutine() > before {
			if time.Now().After(deadline) {
				buf := make([]byte, 1<<16)
				n := runtime.Stack(buf, true)
				t.Errorf("goroutines: %d before, %d after\n%s", before, runtime.NumGoroutine(), buf[:n])
				return
			}
			runtime.Gosched()
			time.Sleep(10 * time.Millisecond)
		}
	})
}

// nopWriter is a ResponseWriter that keeps the last reply and allocates nothing.
type nopWriter struct {
	tcp    bool
	last   []byte
	writes int
}

var (
	udpLocal = &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 53}
	tcpLocal = &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 53}
	remote   = &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 40000}
)

func (w *nopWriter) LocalAddr() net.Addr {
	if w.tcp {
		return tcpLocal
	}
	return udpLocal
}
func (w *nopWriter) RemoteAddr() net.Addr { return remote }
func (w *nopWriter) WriteMsg(m *mdns.Msg) error {
	b, err := m.Pack()
	if err != nil {
		return err
	}
	_, err = w.Write(b)
	return err
}
func (w *nopWriter) Write(b []byte) (int, error) {
	w.writes++
	w.last = append(w.last[:0], b...)
	return len(b), nil
}
func (w *nopWriter) Close() error        { return nil }
func (w *nopWriter) TsigStatus() error   { return nil }
func (w *nopWriter) TsigTimersOnly(bool) {}
func (w *nopWriter) Hijack()             {}
