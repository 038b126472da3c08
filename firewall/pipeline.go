// Package firewall is the one place where Warden decides verdicts. Backends hand it packets (through the
// backend.Handler interface); it recognises Warden's own traffic, runs the external verdict hook, evaluates
// the compiled policy, records split-tunnel destinations, tracks connections and re-evaluates them when the
// policy changes. It knows nothing of iptables or drivers.
package firewall

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	"github.com/warden-fw/warden/backend"
	"github.com/warden-fw/warden/config"
)

// VerdictHook lets an embedding program decide connections before the policy. Only Accept and Block are
// honoured; any other verdict (or ok=false) leaves the decision to the policy.
type VerdictHook func(info *backend.Info, proc backend.Process) (v backend.Verdict, ok bool)

// ErrHookInstalled is returned when a verdict hook is installed twice.
var ErrHookInstalled = errors.New("a verdict hook is already installed")

// SplitRecorder receives the original destination of every connection the pipeline splits, before the
// packet's verdict is applied, so the split-tunnel proxy can find it.
type SplitRecorder interface {
	RecordSplit(proto backend.Protocol, client, original netip.AddrPort, via string)
}

// SplitRouter is implemented by split carriers that can route split connections in the kernel (Linux policy
// routing) or must refuse them (their interface is down). RouteSplit returns the decision for a connection to
// remote that a rule splits via the interface spec via ("" = the default): reroute-split with a Route, or
// what on_interface_down says, or plain reroute-split (Route 0) to use the proxy. fresh is false when a live
// connection is re-evaluated, so counters count each connection once.
type SplitRouter interface {
	RouteSplit(proto backend.Protocol, remote netip.Addr, via string, fresh bool) backend.Decision
}

// Options configures a pipeline. Zero values are sensible defaults.
type Options struct {
	Logger   *slog.Logger
	FailMode backend.FailMode
	// OwnPID is the daemon's PID: its connections are accepted as final. 0 means this process.
	OwnPID int
	// MaxConnections bounds the connection table (default 262144).
	MaxConnections int
	// Processes finds the process behind a connection when the policy needs it; optional.
	Processes backend.ProcessResolver
	// Split receives split connections' destinations; without it split rules fall back to allow.
	Split SplitRecorder
	// InterfaceName resolves an interface index; default: the OS's table, cached.
	InterfaceName func(index int) string
	// OnDecision is called once per newly decided connection, after the verdict was applied, with how long
	// the decision took. It runs on the deciding goroutine and must be quick.
	OnDecision func(c Conn, took time.Duration)
	// ProcessWorkers bounds concurrent process lookups (default 8).
	ProcessWorkers int
	// Names tells which domain name an address was resolved from (the local nameserver); optional.
	Names DomainResolver
	// Nameserver lists the local nameserver's addresses. When set, applications' outbound DNS (UDP and TCP to
	// port 53) anywhere else is rerouted to it, unless a rule blocks or drops it.
	Nameserver []netip.AddrPort
	// LiveConnections lists the connections the kernel still tracks (backend.LiveReporter); optional. With
	// it the pipeline forgets accepted connections that two listings in a row left out (they ended), and
	// counts a listed connection as seen, so that a long-lived one is neither expired as idle nor evicted
	// before connections that are gone.
	LiveConnections func(live func(backend.ConnKey)) error
	// LiveInterval is the least time between two listings (default 30 s). A listing that takes long
	// stretches it (see listingInterval).
	LiveInterval time.Duration
}

// DomainResolver maps an address to the domain name an application looked it up by.
type DomainResolver interface {
	DomainOf(netip.Addr) (string, bool)
}

// Pipeline decides verdicts. It implements backend.Handler.
type Pipeline struct {
	log  *slog.Logger
	opts Options
	own  int32

	policy atomic.Pointer[Policy]
	hook   atomic.Pointer[VerdictHook]
	conns  *connTable
	stats  counters
	clock  atomic.Int64 // Unix seconds, advanced by the janitor; coarse on purpose (it is read per packet)
	ifaces ifaceCache

	// immediate is Processes when it can answer some lookups at once (nil otherwise).
	immediate backend.ImmediateProcessResolver
	jobs      chan backend.Packet
	stop      chan struct{}

	// prevListing is when (Unix seconds) the last successful listing of live connections started; only the
	// janitor touches it.
	prevListing int64
	wg          sync.WaitGroup
	stopOnce    sync.Once
}

var _ backend.Handler = (*Pipeline)(nil)

// New returns a running pipeline with the given policy. Close stops its goroutines.
func New(pol *Policy, o Options) *Pipeline {
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.OwnPID == 0 {
		o.OwnPID = osGetpid()
	}
	if o.MaxConnections <= 0 {
		o.MaxConnections = 262144
	}
	if o.ProcessWorkers <= 0 {
		o.ProcessWorkers = 8
	}
	if o.LiveInterval <= 0 {
		o.LiveInterval = 30 * time.Second
	}
	p := &Pipeline{
		log:   o.Logger,
		opts:  o,
		own:   int32(o.OwnPID),
		conns: newConnTable(o.MaxConnections),
		jobs:  make(chan backend.Packet, 1024),
		stop:  make(chan struct{}),
	}
	p.ifaces.lookup = o.InterfaceName
	p.immediate, _ = o.Processes.(backend.ImmediateProcessResolver)
	p.policy.Store(pol)
	p.clock.Store(time.Now().Unix())
	p.wg.Add(1)
	go p.janitor()
	if o.Processes != nil {
		for i := 0; i < o.ProcessWorkers; i++ {
			p.wg.Add(1)
			go p.processWorker()
		}
	}
	return p
}

// Close stops the pipeline's goroutines. Packets still waiting for a process lookup get the fail-mode
// verdict. The pipeline must not receive packets afterwards.
func (p *Pipeline) Close() {
	p.stopOnce.Do(func() {
		close(p.stop)
		p.wg.Wait()
		for {
			select {
			case pkt := <-p.jobs:
				p.applyFailed(pkt, errors.New("pipeline closed"))
			default:
				return
			}
		}
	})
}

// Policy returns the policy in force.
func (p *Pipeline) Policy() *Policy { return p.policy.Load() }

// SetVerdictHook installs the external verdict hook. It can be installed once; a second call fails.
func (p *Pipeline) SetVerdictHook(h VerdictHook) error {
	if h == nil {
		return errors.New("nil verdict hook")
	}
	if !p.hook.CompareAndSwap(nil, &h) {
		return ErrHookInstalled
	}
	return nil
}

// HandlePacket decides one packet and answers it. Every packet is answered exactly once, on every path.
func (p *Pipeline) HandlePacket(pkt backend.Packet) {
	p.stats.packets.Add(1)
	info := pkt.Info()
	key := info.Key()
	if d, ok := p.conns.touch(&key, p.clock.Load()); ok {
		// A packet of a connection already decided (a retransmitted SYN, or a backend that asks per packet):
		// the same answer, without allocating or deciding again.
		p.stats.known.Add(1)
		p.apply(pkt, d)
		return
	}
	pol := p.policy.Load()
	if pol.NeedsProcess && p.opts.Processes != nil && info.PID != p.own {
		if p.immediate != nil {
			start := time.Now()
			if proc, ok := p.resolveNow(info); ok {
				p.decide(pkt, pol, proc, start)
				return
			}
		}
		select {
		case p.jobs <- pkt:
			return
		default:
			// Too many lookups in flight: decide now with what the kernel told us rather than stall.
			p.stats.lookupsSkipped.Add(1)
		}
	}
	p.decide(pkt, pol, backend.Process{PID: info.PID, UID: info.UID}, time.Now())
}

func (p *Pipeline) processWorker() {
	defer p.wg.Done()
	for {
		select {
		case <-p.stop:
			return
		case pkt := <-p.jobs:
			start := time.Now()
			proc := p.resolve(pkt)
			p.decide(pkt, p.policy.Load(), proc, start)
		}
	}
}

// resolveNow asks the immediate resolver; false sends the lookup to a worker.
func (p *Pipeline) resolveNow(info *backend.Info) (proc backend.Process, ok bool) {
	defer func() {
		if r := recover(); r != nil {
			p.log.Error("process lookup panicked", "conn", info.String(), "panic", r)
			ok = false
		}
	}()
	got, ok := p.immediate.ResolveProcessNow(info)
	if !ok {
		return backend.Process{}, false
	}
	p.stats.lookups.Add(1)
	p.stats.lookupsInline.Add(1)
	if got.UID < 0 {
		got.UID = info.UID
	}
	return got, true
}

func (p *Pipeline) resolve(pkt backend.Packet) (proc backend.Process) {
	info := pkt.Info()
	proc = backend.Process{PID: info.PID, UID: info.UID}
	defer func() {
		if r := recover(); r != nil {
			p.log.Error("process lookup panicked", "conn", info.String(), "panic", r)
		}
	}()
	p.stats.lookups.Add(1)
	if got, ok := p.opts.Processes.ResolveProcess(info); ok {
		if got.UID < 0 {
			got.UID = info.UID
		}
		return got
	}
	p.stats.lookupsUnknown.Add(1)
	return proc
}

// decide evaluates and applies a decision for a new connection. A panic anywhere in it still answers the
// packet (with the fail-mode verdict).
func (p *Pipeline) decide(pkt backend.Packet, pol *Policy, proc backend.Process, start time.Time) {
	defer func() {
		if r := recover(); r != nil {
			p.stats.panics.Add(1)
			p.applyFailed(pkt, fmt.Errorf("panic while deciding: %v\n%s", r, debug.Stack()))
		}
	}()
	info := pkt.Info()
	if info.Interface == "" && info.IfIndex > 0 {
		// Always, not only when a rule names interfaces: a reload may add one, and re-evaluation then needs
		// the interface of connections decided before. The cache makes this a map read.
		info.Interface = p.ifaces.name(info.IfIndex)
	}
	c := Conn{
		Key: info.Key(), Direction: info.Direction, PID: proc.PID, UID: proc.UID, App: proc.Path,
		Interface: info.Interface, Created: start.UnixNano(),
	}
	if p.opts.Names != nil {
		// Looked up even when no rule names domains: a reload may add one, and re-evaluating this live
		// connection then needs its domain (and conns shows it). The lookup is a read-locked map access.
		c.Domain, _ = p.opts.Names.DomainOf(info.Remote.Addr().Unmap())
	}
	d, ref, via := p.evaluate(info, &c, pol, true)
	c.Own = ref.Source == "own"
	c.decision, c.rule = d, ref
	if existing, inserted := p.conns.insert(&c, p.clock.Load()); !inserted {
		// Another packet of this connection was decided meanwhile: give the same answer.
		d = existing
		if got, ok := p.conns.get(c.Key); ok {
			c = got
		}
	} else if d.Verdict == backend.RerouteToSplitTun && d.Route == 0 {
		p.opts.Split.RecordSplit(info.Protocol, info.Local, info.Remote, via)
	}
	p.apply(pkt, d)
	if p.opts.OnDecision != nil {
		p.opts.OnDecision(c, time.Since(start)) // by value: a pointer through a func value would put c on the heap
	}
}

// evaluate runs the decision order: own traffic, hook, policy, default. fresh is true for a new connection,
// false when a live one is re-evaluated.
func (p *Pipeline) evaluate(info *backend.Info, c *Conn, pol *Policy, fresh bool) (backend.Decision, *ruleRef, string) {
	if c.PID == p.own || info.PID == p.own {
		return backend.AcceptFinal, refOwn, ""
	}
	if h := p.hook.Load(); h != nil {
		switch v, ok := (*h)(info, backend.Process{PID: c.PID, Path: c.App, UID: c.UID}); {
		case ok && v == backend.Accept:
			return backend.Decision{Verdict: backend.Accept, Permanent: true}, refHook, ""
		case ok && v == backend.Block:
			return backend.Decision{Verdict: backend.Block, Permanent: true}, refHook, ""
		}
	}
	q := Query{Direction: c.Direction, Protocol: c.Key.Protocol, Remote: c.Key.Remote.Addr().Unmap(),
		App: c.App, UID: c.UID, Interface: c.Interface, Domain: c.Domain}
	if c.Direction == backend.Inbound {
		q.ServicePort = c.Key.Local.Port()
	} else {
		q.ServicePort = c.Key.Remote.Port()
	}
	m := pol.Decide(&q)
	ref := pol.ref(m)
	if p.isForeignDNS(c) && !(m.Rule >= 0 && (m.Action == config.BlockAction || m.Action == config.DropAction)) {
		// Applications' DNS goes to Warden's nameserver, whatever resolver they chose, so that domain rules
		// hold. Only a rule that blocks or drops the query outright takes precedence.
		return backend.Decision{Verdict: backend.RerouteToNameserver, Permanent: true}, refDNS, ""
	}
	switch m.Action {
	case config.BlockAction:
		return backend.Decision{Verdict: backend.Block, Permanent: true}, ref, ""
	case config.DropAction:
		return backend.Decision{Verdict: backend.Drop, Permanent: true}, ref, ""
	case config.Split:
		if r, ok := p.opts.Split.(SplitRouter); ok {
			return r.RouteSplit(c.Key.Protocol, c.Key.Remote.Addr().Unmap(), m.Via, fresh), ref, m.Via
		}
		if p.opts.Split != nil {
			return backend.Decision{Verdict: backend.RerouteToSplitTun, Permanent: true}, ref, m.Via
		}
	}
	return backend.Decision{Verdict: backend.Accept, Permanent: true}, ref, ""
}

var (
	refOwn  = &ruleRef{Index: -1, Source: "own"}
	refHook = &ruleRef{Name: "hook", Index: -1, Source: "hook"}
	refDNS  = &ruleRef{Name: "nameserver", Index: -1, Source: "nameserver"}
)

// isForeignDNS reports whether c is an application's outbound DNS query to somewhere other than Warden's own
// nameserver.
func (p *Pipeline) isForeignDNS(c *Conn) bool {
	if len(p.opts.Nameserver) == 0 || c.Direction != backend.Outbound || !c.Key.Protocol.HasPorts() ||
		c.Key.Remote.Port() != 53 {
		return false
	}
	remote := netip.AddrPortFrom(c.Key.Remote.Addr().Unmap(), c.Key.Remote.Port())
	for _, ns := range p.opts.Nameserver {
		if remote == ns {
			return false
		}
	}
	return true
}

func (p *Pipeline) apply(pkt backend.Packet, d backend.Decision) {
	// Taken before Apply: once answered, the handle belongs to the backend again (it may recycle it).
	key := pkt.Info().Key()
	if err := pkt.Apply(d); err != nil {
		if errors.Is(err, backend.ErrAlreadyApplied) {
			// The backend's verdict timeout answered first; the late decision has nowhere to go.
			p.stats.late.Add(1)
			return
		}
		p.stats.applyErrors.Add(1)
		p.log.Warn("applying verdict failed", "conn", key.String(), "decision", d.String(), "err", err)
		return
	}
	p.stats.count(d)
}

func (p *Pipeline) applyFailed(pkt backend.Packet, cause error) {
	p.stats.failures.Add(1)
	p.log.Error("deciding failed; applying the fail-mode verdict", "conn", pkt.Info().String(), "err", cause)
	d := p.opts.FailMode.Decision()
	if err := pkt.Apply(d); err == nil {
		p.stats.count(backend.Decision{Verdict: backend.Failed})
	}
}

// ConnectionEnded forgets a connection the backend saw end.
func (p *Pipeline) ConnectionEnded(k backend.ConnKey) { p.conns.remove(k) }

// Idle timeouts per protocol. Established flows never reach user space, so "idle" means "not seen by the
// pipeline": these bound how long a connection stays eligible for re-evaluation after its last queued packet.
var idleTimeouts = map[backend.Protocol]time.Duration{
	backend.TCP:    6 * time.Hour,
	backend.UDP:    10 * time.Minute,
	backend.ICMP:   30 * time.Second,
	backend.ICMPv6: 30 * time.Second,
}

const otherIdleTimeout = 10 * time.Minute

func (p *Pipeline) janitor() {
	defer p.wg.Done()
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	lastSweep := time.Now()
	started := lastSweep
	nextListing := started.Add(p.opts.LiveInterval)
	listingFails := false
	for {
		select {
		case <-p.stop:
			return
		case now := <-tick.C:
			p.clock.Store(now.Unix())
			if p.opts.LiveConnections != nil && !now.Before(nextListing) && p.prevListing == 0 {
				nextListing = p.firstListingAt(started)
			}
			if p.opts.LiveConnections != nil && !now.Before(nextListing) {
				ended, err := p.syncLive(now)
				took := time.Since(now)
				switch {
				case err != nil && !listingFails:
					// Once, not every interval; nothing is forgotten while listings fail.
					p.log.Warn("listing live connections failed; ended connections stay tracked until idle", "err", err)
				case err == nil && listingFails:
					p.log.Info("listing live connections works again")
				case err == nil && ended > 0:
					p.log.Debug("forgot connections that ended", "count", ended, "took", took)
				}
				listingFails = err != nil
				nextListing = now.Add(p.listingInterval(took))
			}
			if now.Sub(lastSweep) >= 10*time.Second {
				lastSweep = now
				p.sweep(now)
				p.ifaces.m.Store(nil) // interfaces come and go; indexes get reused
			}
		}
	}
}

// listingCostPerEntry is about what listing one conntrack entry costs (the kernel's dump and the parsing;
// BenchmarkDump measures it): it estimates the first listing's cost.
const listingCostPerEntry = 2500 * time.Nanosecond

// listingInterval is the time from one listing to the next, given what a listing takes: LiveInterval, or longer
// when listing is expensive, so that it costs about 0.05 % of one processor (a table of 100 000 entries, listed
// in about 250 ms, every 8 minutes). A table three quarters full is listed ten times as often: listings are
// then what keeps live connections from being the ones evicted.
func (p *Pipeline) listingInterval(took time.Duration) time.Duration {
	factor := time.Duration(2000)
	if p.conns.len() >= p.opts.MaxConnections*3/4 {
		factor = 200
	}
	return max(p.opts.LiveInterval, factor*took)
}

// firstListingAt is when the first listing is due for a pipeline started at started. Its cost is not known
// yet: it is estimated from the table's size, so that a daemon that starts busy does not list a large table at
// once.
func (p *Pipeline) firstListingAt(started time.Time) time.Time {
	return started.Add(p.listingInterval(time.Duration(p.conns.len()) * listingCostPerEntry))
}

// syncLive asks the kernel which connections still exist (Options.LiveConnections). Each one listed counts as
// seen now. Accepted connections of protocols the kernel tracks by ports that were seen neither at this
// listing nor since the previous one started are forgotten: two listings in a row left them out, so one
// listing that missed an entry (the kernel's table changing under a dump) loses nothing. Blocked and dropped
// connections never get a kernel entry and stay until idle, as before. A failed listing forgets nothing.
func (p *Pipeline) syncLive(now time.Time) (ended int, err error) {
	start := now.Unix()
	if err := p.listLive(start); err != nil {
		p.stats.listingErrors.Add(1)
		return 0, err
	}
	if p.prevListing != 0 {
		ended = p.conns.forgetEnded(p.prevListing)
		p.stats.ended.Add(uint64(ended))
	}
	p.prevListing = start
	return ended, nil
}

// listLive runs one listing, marking what it lists as seen at now. A panic in the listing (a kernel answer the
// parser did not expect) is an error: it must not take the janitor, and the daemon, down.
func (p *Pipeline) listLive(now int64) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("listing live connections panicked: %v", r)
		}
	}()
	return p.opts.LiveConnections(func(k backend.ConnKey) { p.conns.touch(&k, now) })
}

func (p *Pipeline) sweep(now time.Time) int {
	n := now.Unix()
	return p.conns.expire(func(proto backend.Protocol) int64 {
		d, ok := idleTimeouts[proto]
		if !ok {
			d = otherIdleTimeout
		}
		return n - int64(d/time.Second)
	})
}

// SetPolicy makes pol the policy in force and re-evaluates every tracked connection against it. It returns
// exactly the connections whose decision changed (their stored decision is already updated); the caller
// hands them to the backend (backend.Reevaluator) so the kernel feels the change.
func (p *Pipeline) SetPolicy(pol *Policy) []backend.ConnChange {
	p.policy.Store(pol)
	var changes []backend.ConnChange
	var splits []backend.ConnKey
	var info backend.Info // one for all: evaluate takes its address, so one per connection would be an allocation each
	p.conns.update(func(c *Conn) (backend.Decision, *ruleRef) {
		if c.Own {
			return c.decision, c.rule
		}
		old := c.Decision()
		info = backend.Info{Protocol: c.Key.Protocol, Direction: c.Direction, Local: c.Key.Local,
			Remote: c.Key.Remote, Interface: c.Interface, PID: c.PID, UID: c.UID}
		d, ref, _ := p.evaluate(&info, c, pol, false)
		if d != old {
			changes = append(changes, backend.ConnChange{Key: c.Key, Old: old, New: d})
			if d.Verdict == backend.RerouteToSplitTun {
				splits = append(splits, c.Key)
			}
		}
		return d, ref
	})
	for _, k := range splits {
		// A live connection cannot move into the proxy; its next new flow will. Forget it so the kernel's
		// next packet of it is decided afresh.
		p.conns.remove(k)
	}
	if len(changes) > 0 {
		p.log.Info("policy changed live connections", "changed", len(changes))
	}
	return changes
}

// ref returns the shared ruleRef for a match.
func (pol *Policy) ref(m Match) *ruleRef {
	if m.Rule >= 0 {
		return &pol.refs[m.Rule]
	}
	return &pol.defaultRefs[0]
}

// Explain returns what the policy in force decides for q (the external hook and own-traffic checks do not
// apply to hypothetical connections).
func (p *Pipeline) Explain(q Query) Match { return p.policy.Load().Decide(&q) }

// ifaceCache resolves interface indexes to names. The map is replaced, never mutated, so readers need no
// lock.
type ifaceCache struct {
	lookup func(int) string
	m      atomic.Pointer[map[int]string]
	mu     sync.Mutex
}

func (c *ifaceCache) name(index int) string {
	if m := c.m.Load(); m != nil {
		if n, ok := (*m)[index]; ok {
			return n
		}
	}
	var n string
	if c.lookup != nil {
		n = c.lookup(index)
	} else if ifi, err := net.InterfaceByIndex(index); err == nil {
		n = ifi.Name
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	old := c.m.Load()
	next := make(map[int]string, 8)
	if old != nil && len(*old) < 4096 {
		for k, v := range *old {
			next[k] = v
		}
	}
	next[index] = n
	c.m.Store(&next)
	return n
}
