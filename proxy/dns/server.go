// Package dns is Warden's local nameserver. The pipeline reroutes applications' DNS to it (Linux: DNAT of
// outbound port-53 traffic to 127.0.0.17:53 / [::1]:53; Windows: the driver's redirect to loopback port 53),
// so domain rules hold whichever resolver an application picks. It answers blocked names itself
// (NXDOMAIN or 0.0.0.0 / ::), forwards the rest to the configured upstreams as Warden's own traffic, caches
// answers for their TTL, and remembers which name each answered address came from, for the pipeline to
// match domain rules against new connections (DomainOf).
//
// Cached answers are kept packed: a cache hit copies bytes and patches the ID, the question's case, the
// flags and the TTLs in place, so it allocates nothing beyond what the DNS library does to read the request
// and write the reply.
package dns

import (
	"context"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	mdns "github.com/miekg/dns"
)

// Policy decides which names are answered as blocked. Domain rules whose action is block or drop should
// block at DNS level, so blocked applications fail fast. The name is in lower case without the trailing dot
// (e.g. "ads.example.com"). It is called for the query name and for every name of the CNAME chain the
// answer leads through, on every query, so it should be cheap and must be safe for concurrent use.
type Policy interface {
	BlockDomain(name string) bool
}

// Stats is a snapshot of the nameserver's counters and state.
type Stats struct {
	// Listen lists the addresses the server answers on (UDP and TCP).
	Listen []string `json:"listen"`
	// Upstreams lists the upstreams in use, in the form Config.Upstreams takes.
	Upstreams []string `json:"upstreams"`
	Queries   uint64   `json:"queries"`
	CacheHits uint64   `json:"cache_hits"`
	// CacheMisses counts queries that went upstream (or joined an identical query already on its way).
	CacheMisses uint64 `json:"cache_misses"`
	// Blocked counts queries answered with the block response, by query name or by CNAME chain.
	Blocked uint64 `json:"blocked"`
	// UpstreamQueries counts attempts at an upstream; UpstreamFailures those that failed (no answer in time,
	// a network error, a bad reply, SERVFAIL or REFUSED).
	UpstreamQueries  uint64 `json:"upstream_queries"`
	UpstreamFailures uint64 `json:"upstream_failures"`
	// ServFails counts SERVFAIL answers given to clients because no upstream answered.
	ServFails uint64 `json:"servfails"`
	// Rejected counts queries refused or rejected (not a query, not one question, zone transfers).
	Rejected     uint64 `json:"rejected"`
	CacheEntries int    `json:"cache_entries"`
	MapEntries   int    `json:"map_entries"`
}

type counters struct {
	queries, hits, misses, blocked, upQueries, upFailures, servfails, rejected atomic.Uint64
}

type policyBox struct{ p Policy }

// maxFlights bounds the distinct upstream queries in progress at once.
const maxFlights = 1024

// flight is an upstream query in progress; identical queries arriving meanwhile wait for it instead of
// asking again.
type flight struct {
	done chan struct{}
	e    *entry
	err  error
}

// Server is the nameserver. Create it with New, Start it once; Close ends it for good.
type Server struct {
	cfg       Config
	log       *slog.Logger
	policy    atomic.Pointer[policyBox]
	ups       []exchanger
	preferred atomic.Int32 // index of the upstream that answered last
	cache     *cache
	ips       *ipMap
	grace     int64
	blockZero bool
	now       func() time.Time // a fake clock for tests; nil = the monotonic clock
	epoch     time.Time
	// coarse is the clock as of the last tick (every tick while started; 0 otherwise). DomainOf reads it:
	// expiry to a fraction of a second is plenty there, and reading the clock costs ~100 ns on a VM.
	coarse atomic.Int64
	tick   time.Duration
	// bufs holds free reply buffers: a cache hit builds its reply in one, then returns it. A channel rather than
	// a sync.Pool: a pool is emptied by collections and, under the race detector, drops a quarter of what it
	// is given, so how often a hit allocates would depend on the garbage collector.
	bufs     chan *[]byte
	c        counters
	lastWarn atomic.Int64

	ctx    context.Context // cancelled by Close: aborts upstream queries in flight
	cancel context.CancelFunc

	flightMu sync.Mutex
	flights  map[string]*flight

	mu       sync.Mutex
	started  bool
	closed   bool
	servers  []*mdns.Server
	listen   []string
	serveErr chan error
	serving  sync.WaitGroup
	watchers sync.WaitGroup
}

// New returns a nameserver that is not yet listening. policy may be nil (nothing is blocked); SetPolicy
// replaces it later. When cfg.Upstreams is empty, the system's resolvers are used (SystemUpstreams).
func New(cfg Config, policy Policy, logger *slog.Logger) (*Server, error) {
	return newServer(cfg, policy, logger, nil)
}

// newServer is New with a pool of trusted roots for DNS over TLS (tests; nil = the system's).
func newServer(cfg Config, policy Policy, logger *slog.Logger, roots *x509.CertPool) (*Server, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("nameserver config: %w", err)
	}
	cfg = cfg.WithDefaults()
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	self := make([]netip.AddrPort, 0, len(cfg.Listen))
	for _, l := range cfg.Listen {
		ap, _ := parseListen(l) // validated
		self = append(self, ap)
	}
	ups := cfg.Upstreams
	if len(ups) == 0 {
		var err error
		if ups, err = SystemUpstreams(self, logger); err != nil {
			return nil, fmt.Errorf("nameserver: no upstreams configured and %w", err)
		}
	}
	s := &Server{
		cfg: cfg, log: logger, cache: newCache(cfg.CacheSize), ips: newIPMap(cfg.MapSize),
		grace: int64(cfg.MapGrace), blockZero: cfg.BlockResponse == BlockZero,
		epoch: time.Now(), tick: 250 * time.Millisecond, flights: make(map[string]*flight),
	}
	s.bufs = make(chan *[]byte, 64)
	for _, us := range ups {
		up, err := ParseUpstream(us)
		if err != nil {
			return nil, fmt.Errorf("nameserver upstream: %w", err)
		}
		for _, a := range self {
			// Forwarding to ourselves would loop until every query times out.
			if a.Port() != 0 && a == up.Addr {
				return nil, fmt.Errorf("nameserver upstream %s is one of our own listen addresses", up)
			}
		}
		s.ups = append(s.ups, newNetUpstream(up, cfg.Timeout, cfg.Control, roots))
	}
	s.cfg.Upstreams = ups
	s.SetPolicy(policy)
	s.ctx, s.cancel = context.WithCancel(context.Background())
	return s, nil
}

// SetPolicy replaces the blocking policy; nil blocks nothing. Queries already past their policy check are
// not affected. Cached answers are not flushed: blocking is decided per query, before the cache.
func (s *Server) SetPolicy(p Policy) {
	s.policy.Store(&policyBox{p: p})
}

// Start opens the listeners and starts serving. It fails if no listen address can be bound; an unavailable
// IPv6 loopback (IPv6 disabled) is logged and skipped when another address works. When ctx is cancelled the
// server closes as by Close.
func (s *Server) Start(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.started || s.closed {
		return errors.New("nameserver: Start called twice or after Close")
	}
	s.started = true
	type pair struct {
		pc net.PacketConn
		ln net.Listener
	}
	var pairs []pair
	var fatal, v6 []error
	for _, l := range s.cfg.Listen {
		ap, _ := parseListen(l)
		pc, ln, err := listenPair(ctx, ap)
		switch {
		case err == nil:
			pairs = append(pairs, pair{pc, ln})
		case ap.Addr().Is6() && !ap.Addr().Is4In6():
			v6 = append(v6, err)
		default:
			fatal = append(fatal, err)
		}
	}
	if len(pairs) == 0 || len(fatal) > 0 {
		for _, p := range pairs {
			p.pc.Close()
			p.ln.Close()
		}
		return fmt.Errorf("nameserver: starting listeners: %w", errors.Join(append(fatal, v6...)...))
	}
	for _, err := range v6 {
		s.log.Warn("nameserver: IPv6 listener unavailable", "err", err)
	}

	h := handler{s}
	s.serveErr = make(chan error, 2*len(pairs))
	for _, p := range pairs {
		s.listen = append(s.listen, p.pc.LocalAddr().String())
		for _, srv := range []*mdns.Server{
			// UDPSize is the read buffer for requests: EDNS requests with cookies or padding exceed 512.
			{PacketConn: p.pc, Handler: h, UDPSize: 4096},
			{Listener: p.ln, Handler: h},
		} {
			started := make(chan struct{})
			srv.NotifyStartedFunc = func() { close(started) }
			s.servers = append(s.servers, srv)
			s.serving.Add(1)
			go func() {
				defer s.serving.Done()
				if err := srv.ActivateAndServe(); err != nil {
					s.serveErr <- err
				}
			}()
			// Wait until the library counts the server as started, so Close can shut it down.
			select {
			case <-started:
			case err := <-s.serveErr:
				s.closeLocked()
				return fmt.Errorf("nameserver: serving: %w", err)
			}
		}
	}
	if s.tick > 0 {
		s.coarse.Store(max(1, s.clock()))
		s.watchers.Add(1)
		go s.ticker()
	}
	s.watchers.Add(1)
	go func() {
		defer s.watchers.Done()
		select {
		case <-ctx.Done():
			_ = s.Close()
		case <-s.ctx.Done():
		case err := <-s.serveErr:
			s.log.Error("nameserver: stopped serving", "err", err)
		}
	}()
	s.log.Info("nameserver: listening", "addrs", s.listen, "upstreams", s.cfg.Upstreams)
	return nil
}

// listenPair binds UDP and TCP on the same address and port. With port 0 the UDP socket picks the port and
// TCP follows it, retrying when that port is taken for TCP.
func listenPair(ctx context.Context, ap netip.AddrPort) (net.PacketConn, net.Listener, error) {
	var lc net.ListenConfig
	var lastErr error
	for range 8 {
		pc, err := lc.ListenPacket(ctx, "udp", ap.String())
		if err != nil {
			return nil, nil, fmt.Errorf("listening on udp %s: %w", ap, err)
		}
		port := pc.LocalAddr().(*net.UDPAddr).Port
		ln, err := lc.Listen(ctx, "tcp", netip.AddrPortFrom(ap.Addr(), uint16(port)).String())
		if err == nil {
			return pc, ln, nil
		}
		pc.Close()
		lastErr = fmt.Errorf("listening on tcp %s: %w", ap, err)
		if ap.Port() != 0 {
			break
		}
	}
	return nil, nil, lastErr
}

// Addrs returns the addresses the server listens on (each for UDP and TCP), once started.
func (s *Server) Addrs() []netip.AddrPort {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]netip.AddrPort, 0, len(s.listen))
	for _, l := range s.listen {
		if ap, err := netip.ParseAddrPort(l); err == nil {
			out = append(out, ap)
		}
	}
	return out
}

// Close stops serving, waits for queries in progress (upstream queries are aborted) and releases every
// socket. It is safe to call more than once.
func (s *Server) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closeLocked()
}

func (s *Server) closeLocked() error {
	if s.closed {
		return nil
	}
	s.closed = true
	s.cancel()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var errs []error
	for _, srv := range s.servers {
		if err := srv.ShutdownContext(ctx); err != nil {
			errs = append(errs, err)
		}
	}
	s.serving.Wait()
	// The watcher may itself be calling Close (its ctx ended) and waiting for s.mu: do not wait for it here;
	// it exits on s.ctx, which is cancelled above.
	for _, u := range s.ups {
		if nu, ok := u.(*netUpstream); ok {
			nu.close()
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("nameserver: shutting down: %w", errors.Join(errs...))
	}
	return nil
}

// Stats returns a snapshot of the counters.
func (s *Server) Stats() Stats {
	s.mu.Lock()
	listen := append([]string(nil), s.listen...)
	s.mu.Unlock()
	return Stats{
		Listen: listen, Upstreams: append([]string(nil), s.cfg.Upstreams...),
		Queries: s.c.queries.Load(), CacheHits: s.c.hits.Load(), CacheMisses: s.c.misses.Load(),
		Blocked: s.c.blocked.Load(), UpstreamQueries: s.c.upQueries.Load(),
		UpstreamFailures: s.c.upFailures.Load(), ServFails: s.c.servfails.Load(), Rejected: s.c.rejected.Load(),
		CacheEntries: s.cache.len(), MapEntries: s.ips.len(s.clock()),
	}
}

// DomainOf returns the name an application asked for when it received ip in an answer (the query name, not
// the CNAME target), lower case without the trailing dot. An address stays known for its record's TTL plus
// Config.MapGrace. When several names share an address, the one answered last wins. It does not allocate.
func (s *Server) DomainOf(ip netip.Addr) (string, bool) {
	names := s.ips.lookup(ip, s.coarseClock())
	if len(names) == 0 {
		return "", false
	}
	return names[0], true
}

// DomainsOf returns the query name followed by the CNAME chain that led to ip, or nil when ip is unknown.
// The slice is the caller's.
func (s *Server) DomainsOf(ip netip.Addr) []string {
	names := s.ips.lookup(ip, s.coarseClock())
	if len(names) == 0 {
		return nil
	}
	return append([]string(nil), names...)
}

// clock returns nanoseconds since the server was made, on the monotonic clock.
func (s *Server) clock() int64 {
	if s.now == nil {
		return int64(time.Since(s.epoch)) // monotonic only: cheaper than time.Now
	}
	return int64(s.now().Sub(s.epoch))
}

// coarseClock is clock as of the last tick while the server runs.
func (s *Server) coarseClock() int64 {
	if c := s.coarse.Load(); c != 0 {
		return c
	}
	return s.clock()
}

func (s *Server) ticker() {
	defer s.watchers.Done()
	t := time.NewTicker(s.tick)
	defer t.Stop()
	for {
		select {
		case <-t.C:
			s.coarse.Store(max(1, s.clock()))
		case <-s.ctx.Done():
			s.coarse.Store(0)
			return
		}
	}
}

// handler keeps ServeDNS out of Server's API.
type handler struct{ s *Server }

func (h handler) ServeDNS(w mdns.ResponseWriter, req *mdns.Msg) { h.s.serve(w, req) }

// serve answers one request. The library has parsed it; everything here must hold for any message the
// parser accepts.
func (s *Server) serve(w mdns.ResponseWriter, req *mdns.Msg) {
	s.c.queries.Add(1)
	if req.Response {
		return // never answer an answer: that is how reflection loops start
	}
	if req.Opcode != mdns.OpcodeQuery {
		s.writeRcode(w, req, mdns.RcodeNotImplemented)
		return
	}
	if len(req.Question) != 1 {
		s.writeRcode(w, req, mdns.RcodeFormatError)
		return
	}
	q := &req.Question[0]
	switch q.Qtype {
	case mdns.TypeAXFR, mdns.TypeIXFR, mdns.TypeOPT, mdns.TypeTSIG:
		s.writeRcode(w, req, mdns.RcodeRefused)
		return
	}
	opt := req.IsEdns0()
	if opt != nil && opt.Version() != 0 {
		s.writeRcode(w, req, mdns.RcodeBadVers)
		return
	}
	do := opt != nil && opt.Do()
	tcp := isTCP(w)

	if s.blockedName(q.Name) {
		s.writeBlock(w, req)
		return
	}
	var kb [320]byte
	key := appendKey(kb[:0], q.Name, q.Qtype, q.Qclass, do, req.CheckingDisabled)
	now := s.clock()
	if e := s.cache.get(key, now); e != nil {
		s.c.hits.Add(1)
		s.answer(w, req, e, now, tcp, opt)
		return
	}
	s.c.misses.Add(1)
	e, err := s.resolve(string(key), q, do, req.CheckingDisabled, tcp)
	if err != nil {
		s.c.servfails.Add(1)
		s.warnLimited("nameserver: no upstream answered", "name", q.Name, "err", err)
		s.writeRcode(w, req, mdns.RcodeServerFailure)
		return
	}
	s.answer(w, req, e, e.stored, tcp, opt)
}

// answer serves e unless a name of its CNAME chain is blocked, and records its addresses for DomainOf.
func (s *Server) answer(w mdns.ResponseWriter, req *mdns.Msg, e *entry, now int64, tcp bool, opt *mdns.OPT) {
	if p := s.policy.Load().p; p != nil {
		// Trackers hide behind CNAMEs of innocent names (CNAME cloaking); the chain is checked too.
		for _, n := range e.names[1:] {
			if p.BlockDomain(n) {
				s.writeBlock(w, req)
				return
			}
		}
	}
	if len(e.addrs) > 0 {
		expires := e.stored + int64(e.ttl)*1e9 + s.grace
		for _, ip := range e.addrs {
			s.ips.record(ip, e.names, expires)
		}
	}
	if err := s.writeEntry(w, req, e, now, tcp, opt); err != nil {
		s.log.Debug("nameserver: writing answer", "err", err)
	}
}

// blockedName reports whether the policy blocks the query name (presentation form, as parsed).
func (s *Server) blockedName(name string) bool {
	p := s.policy.Load().p
	if p == nil {
		return false
	}
	for i := 0; i < len(name); i++ {
		if c := name[i]; 'A' <= c && c <= 'Z' {
			name = strings.ToLower(name) // allocates, but only for names sent in mixed case
			break
		}
	}
	return p.BlockDomain(trimDot(name))
}

// writeEntry writes e as the answer to req: the cached bytes with req's ID, question spelling and flags,
// TTLs reduced by the time the answer spent in the cache, an OPT record when req had one, and truncation when
// it does not fit the client's UDP size.
func (s *Server) writeEntry(w mdns.ResponseWriter, req *mdns.Msg, e *entry, now int64, tcp bool, opt *mdns.OPT) error {
	var bp *[]byte
	select {
	case bp = <-s.bufs:
	default:
		b := make([]byte, 0, 1024)
		bp = &b
	}
	defer func() {
		// Reply buffers are reused because every answer needs one and the library's Write copies or sends
		// synchronously; otherwise each cache hit would allocate its reply.
		*bp = (*bp)[:0]
		select {
		case s.bufs <- bp:
		default: // more replies in flight than buffers kept: let this one go
		}
	}()
	b := append((*bp)[:0], e.msg...)
	*bp = b
	binary.BigEndian.PutUint16(b[0:], req.Id)
	flags := binary.BigEndian.Uint16(b[2:])
	flags &^= flagRD | flagCD | flagTC | flagAA
	if req.RecursionDesired {
		flags |= flagRD
	}
	if req.CheckingDisabled {
		flags |= flagCD
	}
	if !req.AuthenticatedData && (opt == nil || !opt.Do()) {
		flags &^= flagAD // RFC 6840 5.8: AD only for clients that asked for it
	}
	binary.BigEndian.PutUint16(b[2:], flags|flagQR|flagRA)
	patchQuestionCase(b, req.Question[0].Name)
	var elapsed uint32
	if d := now - e.stored; d > 0 {
		elapsed = uint32(min(d/1e9, 1<<31))
	}
	for i, off := range e.ttlOff {
		ttl := e.ttls[i]
		if ttl > elapsed {
			ttl -= elapsed
		} else {
			ttl = 0
		}
		binary.BigEndian.PutUint32(b[off:], ttl)
	}
	limit := mdns.MinMsgSize
	if opt != nil {
		b = appendOPT(b, opt.Do())
		*bp = b
		limit = max(limit, int(opt.UDPSize()))
	}
	if !tcp && len(b) > limit {
		return s.writeTruncated(w, b, limit)
	}
	_, err := w.Write(b)
	return err
}

// writeTruncated is the rare path of an answer too large for the client's UDP size: the library drops
// records until it fits and sets TC, so the client retries over TCP.
func (s *Server) writeTruncated(w mdns.ResponseWriter, b []byte, limit int) error {
	m := new(mdns.Msg)
	if err := m.Unpack(b); err != nil {
		return err
	}
	m.Truncate(limit)
	return w.WriteMsg(m)
}

// writeBlock answers req with the configured block response.
func (s *Server) writeBlock(w mdns.ResponseWriter, req *mdns.Msg) {
	s.c.blocked.Add(1)
	m := new(mdns.Msg)
	m.SetReply(req)
	m.RecursionAvailable = true
	q := req.Question[0]
	hdr := mdns.RR_Header{Name: q.Name, Rrtype: q.Qtype, Class: q.Qclass, Ttl: blockTTL}
	switch {
	case !s.blockZero:
		m.Rcode = mdns.RcodeNameError
	case q.Qtype == mdns.TypeA:
		m.Answer = []mdns.RR{&mdns.A{Hdr: hdr, A: net.IPv4zero.To4()}}
	case q.Qtype == mdns.TypeAAAA:
		m.Answer = []mdns.RR{&mdns.AAAA{Hdr: hdr, AAAA: net.IPv6zero}}
	}
	// Other types under "zero" get an empty NOERROR answer (NODATA): nothing to connect to.
	if opt := req.IsEdns0(); opt != nil {
		m.SetEdns0(ednsSize, opt.Do())
	}
	if err := w.WriteMsg(m); err != nil {
		s.log.Debug("nameserver: writing block answer", "err", err)
	}
}

// writeRcode answers req with an empty reply carrying rcode.
func (s *Server) writeRcode(w mdns.ResponseWriter, req *mdns.Msg, rcode int) {
	if rcode != mdns.RcodeServerFailure {
		s.c.rejected.Add(1)
	}
	m := new(mdns.Msg)
	m.SetRcode(req, rcode)
	m.RecursionAvailable = true
	if rcode == mdns.RcodeFormatError || rcode == mdns.RcodeNotImplemented {
		m.Question = nil // a malformed question is not worth echoing
	}
	if opt := req.IsEdns0(); opt != nil || rcode > 0xF {
		// Extended rcodes (BADVERS) live in the OPT record; the library packs them there.
		m.SetEdns0(ednsSize, opt != nil && opt.Do())
	}
	if err := w.WriteMsg(m); err != nil {
		s.log.Debug("nameserver: writing error answer", "rcode", rcode, "err", err)
	}
}

// resolve returns the answer to the question from the upstreams, joining an identical query already in
// flight. key is the cache key; the answer is cached when its TTL allows.
func (s *Server) resolve(key string, q *mdns.Question, do, cd, tcp bool) (*entry, error) {
	s.flightMu.Lock()
	if f := s.flights[key]; f != nil {
		s.flightMu.Unlock()
		select {
		case <-f.done:
			return f.e, f.err
		case <-s.ctx.Done():
			return nil, errors.New("nameserver closed")
		}
	}
	if len(s.flights) >= maxFlights {
		// A flood of distinct uncached names against slow upstreams would otherwise pile up goroutines
		// (the library runs one per packet) until the upstream timeouts drain them.
		s.flightMu.Unlock()
		return nil, errors.New("too many upstream queries in flight")
	}
	f := &flight{done: make(chan struct{})}
	s.flights[key] = f
	s.flightMu.Unlock()

	f.e, f.err = s.query(key, q, do, cd, tcp)
	if f.e != nil && f.e.ttl > 0 {
		s.cache.put(f.e)
	}
	s.flightMu.Lock()
	delete(s.flights, key)
	s.flightMu.Unlock()
	close(f.done)
	return f.e, f.err
}

// query asks the upstreams in turn, starting with the one that answered last. A SERVFAIL or REFUSED answer
// moves on to the next upstream but is passed on if no upstream does better.
func (s *Server) query(key string, q *mdns.Question, do, cd, tcp bool) (*entry, error) {
	lower := strings.ToLower(q.Name)
	m := new(mdns.Msg)
	m.RecursionDesired = true
	m.CheckingDisabled = cd
	m.Question = []mdns.Question{{Name: lower, Qtype: q.Qtype, Qclass: q.Qclass}}
	m.SetEdns0(ednsSize, do)

	n := len(s.ups)
	start := int(s.preferred.Load())
	var errs []error
	var fallback *mdns.Msg
	for i := range n {
		idx := (start + i) % n
		u := s.ups[idx]
		m.Id = mdns.Id()
		s.c.upQueries.Add(1)
		r, err := u.exchange(s.ctx, m, tcp)
		if err == nil {
			err = checkReply(m, r)
		}
		if err != nil {
			s.c.upFailures.Add(1)
			errs = append(errs, fmt.Errorf("%s: %w", u, err))
			if s.ctx.Err() != nil {
				break
			}
			continue
		}
		if r.Rcode == mdns.RcodeServerFailure || r.Rcode == mdns.RcodeRefused {
			s.c.upFailures.Add(1)
			errs = append(errs, fmt.Errorf("%s: %s", u, mdns.RcodeToString[r.Rcode]))
			fallback = r
			continue
		}
		s.preferred.Store(int32(idx))
		return s.entryFrom(key, r, lower, q)
	}
	if fallback != nil {
		return s.entryFrom(key, fallback, lower, q)
	}
	if len(errs) == 0 {
		errs = append(errs, errors.New("no upstreams"))
	}
	return nil, errors.Join(errs...)
}

func (s *Server) entryFrom(key string, r *mdns.Msg, lower string, q *mdns.Question) (*entry, error) {
	e, err := newEntry(key, r, lower, q.Qtype, q.Qclass, s.clock())
	if err != nil {
		s.c.upFailures.Add(1)
		return nil, fmt.Errorf("repacking upstream answer: %w", err)
	}
	return e, nil
}

// warnLimited logs at most one warning every ten seconds, so a dead upstream does not flood the log.
func (s *Server) warnLimited(msg string, args ...any) {
	now := time.Now().UnixNano()
	last := s.lastWarn.Load()
	if now-last < int64(10*time.Second) || !s.lastWarn.CompareAndSwap(last, now) {
		return
	}
	s.log.Warn(msg, args...)
}

func isTCP(w mdns.ResponseWriter) bool {
	_, ok := w.LocalAddr().(*net.TCPAddr)
	return ok
}
