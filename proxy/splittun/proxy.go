// Package splittun is Warden's split-tunnel proxy, shared by every backend. The pipeline records a split
// connection's original destination in a redirect.Table and the kernel redirects the connection here (Linux:
// DNAT to 127.0.0.17:719 / [::1]:719). The proxy confirms the destination with the OS, dials it through the
// configured interface as Warden's own traffic (never intercepted again), and relays: TCP with half-close and
// zero-copy splicing, UDP as one session per (client, original destination) with idle expiry.
//
// The OS-specific parts sit behind Platform; interface choice is proxy/netif.
package splittun

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/warden-fw/warden/backend"
	"github.com/warden-fw/warden/proxy/netif"
	"github.com/warden-fw/warden/proxy/redirect"
	"github.com/warden-fw/warden/proxy/splittun/handoff"
)

// Options carries the proxy's collaborators. Every field is optional.
type Options struct {
	// Logger receives the proxy's logs; nil discards.
	Logger *slog.Logger
	// Platform overrides this OS's default (NewPlatform). The proxy does not close a platform it was given.
	Platform Platform
	// Resolver overrides the interface resolver (default: netif.NewResolver(netif.SystemSource(), ...)).
	// The proxy keeps a resolver it creates current itself; one passed in must be kept current by its owner.
	Resolver *netif.Resolver
	// OnInterfaceChange, when set, is called after the proxy has followed a split interface's change (up,
	// down, another address), on the resolver's goroutine. Decisions made while it was in the other state
	// (blocked while down, routed while up) are the caller's to revisit.
	OnInterfaceChange func(netif.State)
	// Handoff, when set, carries TCP downloads into the application's socket in the kernel (Linux,
	// split_tunnel.kernel_handoff). The owner expects connections on it and closes it after the proxy.
	Handoff *handoff.Handoff
}

// Stats is a snapshot of the proxy's state and counters.
type Stats struct {
	// Listen lists the addresses the proxy listens on (TCP and UDP alike, unless the platform chose port 0).
	Listen []string `json:"listen"`
	// Interface is the state of the default split interface.
	Interface netif.State `json:"interface"`
	// Interfaces lists the state of every interface spec in use (the default and those table entries named).
	Interfaces []netif.State `json:"interfaces,omitempty"`
	// Mode is how split connections are carried: "route" (kernel routing, the relay as fallback) or "proxy".
	Mode            string `json:"mode"`
	OnInterfaceDown string `json:"on_interface_down"`
	// TableEntries is the number of unconsumed redirect table entries.
	TableEntries int        `json:"table_entries"`
	TCP          ProtoStats `json:"tcp"`
	UDP          ProtoStats `json:"udp"`
	// InterfaceChanges counts the interface changes the proxy has followed completely (routes, sessions, and
	// Options.OnInterfaceChange: the daemon's re-evaluation of live connections).
	InterfaceChanges uint64 `json:"interface_changes"`
}

// ProtoStats are one protocol's counters. For TCP a session is a connection; for UDP a flow.
type ProtoStats struct {
	Active int64  `json:"active"`
	Total  uint64 `json:"total"` // sessions relayed since start
	// Rejected counts connections (TCP) or packets of new flows (UDP) refused because the session bound was hit.
	Rejected uint64 `json:"rejected"`
	// Refused counts those refused because the interface was down and on_interface_down is block.
	Refused uint64 `json:"refused_interface_down"`
	// Direct counts sessions dialled unbound because the interface was down and on_interface_down is direct.
	Direct uint64 `json:"direct"`
	// Routed counts connections (TCP) or flows (UDP) carried by kernel routing instead of the relay.
	Routed uint64 `json:"routed"`
	// Unresolved counts those whose original destination or table entry could not be found.
	Unresolved uint64 `json:"unresolved"`
	// Remapped counts TCP connections whose client port NAT changed on the way to the proxy (a clash with an
	// earlier redirected connection), found through conntrack.
	Remapped uint64 `json:"remapped"`
	// HandedOff counts TCP connections whose downloads went into the application's socket in the kernel.
	HandedOff uint64 `json:"handed_off,omitempty"`
	// HandoffWaits counts the times a handed-off download waited for its application to read (a full window).
	HandoffWaits uint64 `json:"handoff_waits,omitempty"`
	// BulkGathers counts the times a TCP relay direction started gathering a bulk flow (waking once per large
	// piece; see the split tunnel's bulk gathering in docs/design.md).
	BulkGathers uint64 `json:"bulk_gathers,omitempty"`
	DialErrors  uint64 `json:"dial_errors"`
	IdleExpired uint64 `json:"idle_expired"`
	BytesOut    uint64 `json:"bytes_out"` // client → destination
	BytesIn     uint64 `json:"bytes_in"`  // destination → client
}

type protoCounters struct {
	active                                                       atomic.Int64
	total, rejected, refused, direct, unresolved, dialErrs, idle atomic.Uint64
	routed, remapped, handedOff, handoffWaits, bulkGathers       atomic.Uint64
	bytesOut, bytesIn                                            atomic.Uint64
}

func (c *protoCounters) snapshot() ProtoStats {
	return ProtoStats{
		Active: c.active.Load(), Total: c.total.Load(), Rejected: c.rejected.Load(), Refused: c.refused.Load(),
		Direct: c.direct.Load(), Routed: c.routed.Load(), Unresolved: c.unresolved.Load(), Remapped: c.remapped.Load(), HandedOff: c.handedOff.Load(), HandoffWaits: c.handoffWaits.Load(), BulkGathers: c.bulkGathers.Load(), DialErrors: c.dialErrs.Load(),
		IdleExpired: c.idle.Load(), BytesOut: c.bytesOut.Load(), BytesIn: c.bytesIn.Load(),
	}
}

// tryAcquire takes a session slot unless max are in use.
func (c *protoCounters) tryAcquire(max int) bool {
	for {
		n := c.active.Load()
		if n >= int64(max) {
			return false
		}
		if c.active.CompareAndSwap(n, n+1) {
			return true
		}
	}
}

// Proxy is the split-tunnel proxy. Create it with New, then Start it once; Close ends it for good (a restart is
// a new Proxy, which purges the table).
type Proxy struct {
	cfg     Config
	log     *slog.Logger
	table   *redirect.Table
	plat    Platform
	ownPlat bool
	res     *netif.Resolver
	ownRes  bool
	self    map[netip.AddrPort]bool // our listen addresses: a flow "originally" going there is a loop
	// onChange is Options.OnInterfaceChange.
	onChange     func(netif.State)
	ifaceChanges atomic.Uint64

	ctx    context.Context // cancelled by Close: aborts dials
	cancel context.CancelFunc

	mu      sync.Mutex
	started bool
	closed  bool
	tcpLns  []*net.TCPListener
	udpLns  []*udpListener
	tcpSess map[*tcpSession]struct{}
	listen  []string

	udpMu   sync.RWMutex
	udpSess map[udpKey]*udpSession

	loops    sync.WaitGroup // accept and read loops, resolver
	sessions sync.WaitGroup // TCP relays and UDP reply loops

	tcp, udp protoCounters

	// routes is non-nil in route mode.
	routes *routes
	// handoff is Options.Handoff, and handoffWindow its sessions' bound (see handoffWindow).
	handoff       *handoff.Handoff
	handoffWindow int
}

// New returns a proxy that is not yet listening. table is shared with the pipeline and must not be nil.
func New(cfg Config, table *redirect.Table, opts Options) (*Proxy, error) {
	if table == nil {
		return nil, errors.New("split tunnel: nil redirect table")
	}
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("split tunnel config: %w", err)
	}
	cfg = cfg.WithDefaults()
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	p := &Proxy{
		cfg: cfg, log: log, table: table, plat: opts.Platform, res: opts.Resolver, onChange: opts.OnInterfaceChange,
		handoff: opts.Handoff,
		tcpSess: make(map[*tcpSession]struct{}), udpSess: make(map[udpKey]*udpSession),
		self: make(map[netip.AddrPort]bool),
	}
	if p.handoff != nil {
		p.handoffWindow = handoffWindow()
	}
	if p.plat == nil {
		plat, err := NewPlatform(log)
		if err != nil {
			return nil, err
		}
		p.plat, p.ownPlat = plat, true
	}
	if p.res == nil {
		p.res, p.ownRes = netif.NewResolver(netif.SystemSource(), log), true
	}
	kr, canRoute := p.plat.(KernelRouter)
	switch {
	case cfg.Mode == ModeRoute && !canRoute:
		p.closePlatform()
		return nil, fmt.Errorf("split tunnel: mode %q: this platform cannot route split connections in the kernel: %w", ModeRoute, backend.ErrUnsupported)
	case cfg.Mode != ModeProxy && canRoute:
		p.routes = &routes{kr: kr, slots: make(map[string]*routeSlot)}
	}
	p.ctx, p.cancel = context.WithCancel(context.Background())
	return p, nil
}

// Start purges the redirect table (no entry of a previous run survives), opens the listeners and starts
// serving. It fails if the IPv4 address cannot be bound; an unavailable IPv6 loopback (IPv6 disabled) is
// logged and skipped.
func (p *Proxy) Start() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.started || p.closed {
		return errors.New("split tunnel: Start called twice or after Close")
	}
	p.started = true
	p.table.Purge()
	if p.routes != nil {
		if err := p.routes.kr.ResetRoutes(); err != nil {
			return fmt.Errorf("split tunnel: removing a previous run's routes: %w", err)
		}
	}

	var errs []error
	for _, a := range p.plat.ListenAddrs(p.cfg.Port) {
		if err := p.listenLocked(a); err != nil {
			if a.Addr().Is6() && len(p.tcpLns) > 0 {
				p.log.Warn("split tunnel: IPv6 listener unavailable", "addr", a, "err", err)
				continue
			}
			errs = append(errs, err)
		}
	}
	if len(errs) > 0 || len(p.tcpLns) == 0 {
		p.closeListenersLocked()
		return fmt.Errorf("split tunnel: starting listeners: %w", errors.Join(append(errs, errors.New("no listener"))...))
	}

	p.res.OnChange(p.interfaceChanged)
	p.res.Get(p.cfg.Interface) // resolve the default now, so status shows it from the start
	if p.ownRes {
		p.loops.Add(1)
		go func() {
			defer p.loops.Done()
			_ = p.res.Run(p.ctx, p.cfg.InterfacePoll)
		}()
	}
	if p.routes != nil {
		p.loops.Add(1)
		go p.guardRoutes()
	}
	for _, ln := range p.tcpLns {
		p.loops.Add(1)
		go p.acceptLoop(ln)
	}
	for _, ln := range p.udpLns {
		p.loops.Add(1)
		go p.readLoop(ln)
	}
	p.log.Info("split-tunnel proxy listening", "mode", p.Mode(), "addrs", p.listen, "interface", p.cfg.Interface,
		"on_interface_down", p.cfg.OnInterfaceDown)
	return nil
}

func (p *Proxy) listenLocked(a netip.AddrPort) error {
	fam := "4"
	if a.Addr().Is6() {
		fam = "6"
	}
	tl, err := net.ListenTCP("tcp"+fam, net.TCPAddrFromAddrPort(a))
	if err != nil {
		return fmt.Errorf("listening on tcp %s: %w", a, err)
	}
	// Bound to the exact address, never a wildcard: UDP replies must leave from the address the client's packet
	// was DNATed to, or conntrack cannot map them back to the original peer.
	ua := a
	if a.Port() == 0 {
		ua = netip.AddrPortFrom(a.Addr(), 0)
	}
	uc, err := net.ListenUDP("udp"+fam, net.UDPAddrFromAddrPort(ua))
	if err != nil {
		tl.Close()
		return fmt.Errorf("listening on udp %s: %w", a, err)
	}
	tap := tl.Addr().(*net.TCPAddr).AddrPort()
	uap := uc.LocalAddr().(*net.UDPAddr).AddrPort()
	p.self[unmap(tap)] = true
	p.self[unmap(uap)] = true
	p.tcpLns = append(p.tcpLns, tl)
	p.udpLns = append(p.udpLns, &udpListener{conn: uc, local: unmap(uap), idx: len(p.udpLns)})
	p.listen = append(p.listen, "tcp "+tap.String(), "udp "+uap.String())
	return nil
}

func (p *Proxy) closeListenersLocked() {
	for _, l := range p.tcpLns {
		l.Close()
	}
	for _, l := range p.udpLns {
		l.conn.Close()
	}
}

// Addrs returns the bound TCP and UDP listen addresses (useful when the platform asked for port 0).
func (p *Proxy) Addrs() (tcp, udp []netip.AddrPort) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, l := range p.tcpLns {
		tcp = append(tcp, unmap(l.Addr().(*net.TCPAddr).AddrPort()))
	}
	for _, l := range p.udpLns {
		udp = append(udp, l.local)
	}
	return tcp, udp
}

// Close shuts the proxy down, giving TCP relays Config.ShutdownTimeout to finish.
func (p *Proxy) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), p.cfg.ShutdownTimeout)
	defer cancel()
	return p.Shutdown(ctx)
}

// Shutdown stops the listeners, ends every UDP session, waits for TCP relays until ctx is done and then cuts
// the rest, and purges the redirect table. It is safe to call more than once.
func (p *Proxy) Shutdown(ctx context.Context) error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.closed = true
	p.closeListenersLocked()
	p.mu.Unlock()

	p.udpMu.Lock()
	sessions := make([]*udpSession, 0, len(p.udpSess))
	for _, s := range p.udpSess {
		sessions = append(sessions, s)
	}
	p.udpMu.Unlock()
	for _, s := range sessions {
		p.endUDP(s, false)
	}

	done := make(chan struct{})
	go func() {
		p.sessions.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-ctx.Done():
		p.mu.Lock()
		n := len(p.tcpSess)
		for s := range p.tcpSess {
			s.abort()
		}
		p.mu.Unlock()
		p.log.Warn("split tunnel: cut relays still running at shutdown", "count", n)
		<-done
	}
	p.cancel()
	p.loops.Wait()
	p.table.Purge()
	var errs []error
	if p.routes != nil {
		errs = append(errs, p.routes.close())
	}
	return errors.Join(append(errs, p.closePlatform())...)
}

// closePlatform closes the platform if the proxy created it.
func (p *Proxy) closePlatform() error {
	if p.ownPlat {
		return p.plat.Close()
	}
	return nil
}

// Mode returns the mode in force: ModeRoute or ModeProxy.
func (p *Proxy) Mode() string {
	if p.routes != nil {
		return ModeRoute
	}
	return ModeProxy
}

// Stats returns a snapshot of the proxy's state and counters.
func (p *Proxy) Stats() Stats {
	p.mu.Lock()
	listen := append([]string(nil), p.listen...)
	p.mu.Unlock()
	return Stats{
		Listen:           listen,
		Interface:        p.res.Get(p.cfg.Interface),
		Interfaces:       p.res.States(),
		Mode:             p.Mode(),
		OnInterfaceDown:  p.cfg.OnInterfaceDown,
		TableEntries:     p.table.Len(),
		TCP:              p.tcp.snapshot(),
		UDP:              p.udp.snapshot(),
		InterfaceChanges: p.ifaceChanges.Load(),
	}
}

// errRefused marks a session refused because its interface is down and the config says block.
var errRefused = errors.New("split interface down; blocking")

// upstream decides how a session to original leaves: bound to its interface, unbound (interface down, direct),
// or not at all (errRefused). It returns the dialer and the interface spec the session depends on.
func (p *Proxy) upstream(c *protoCounters, e *redirect.Entry, udp bool) (*net.Dialer, string, error) {
	spec := e.Interface
	if spec == "" {
		spec = p.cfg.Interface
	}
	st := p.res.Get(spec)
	d := &net.Dialer{Timeout: p.cfg.DialTimeout}
	if !st.Up {
		if p.cfg.OnInterfaceDown != DownDirect {
			c.refused.Add(1)
			return nil, spec, errRefused
		}
		c.direct.Add(1)
		d.Control = p.plat.UpstreamControl(nil)
		return d, spec, nil
	}
	ifc := st.Interface
	src := ifc.Source(e.Original.Addr())
	if !src.IsValid() {
		return nil, spec, fmt.Errorf("interface %s has no usable address of the destination's family", ifc.Name)
	}
	if udp {
		d.LocalAddr = &net.UDPAddr{IP: src.AsSlice()}
	} else {
		d.LocalAddr = &net.TCPAddr{IP: src.AsSlice()}
	}
	d.Control = p.plat.UpstreamControl(&ifc)
	return d, spec, nil
}

// interfaceChanged ends the UDP sessions of a spec whose interface went down or changed, so the flows' next
// packets get a session that follows the new state (bound elsewhere, direct, or refused). TCP relays are left
// alone: a short link flap need not kill them, and a dead path makes them fail on their own.
func (p *Proxy) interfaceChanged(st netif.State) {
	if p.routes != nil {
		if err := p.routes.changed(st, p.cfg.OnInterfaceDown != DownDirect); err != nil {
			p.log.Error("split tunnel: reinstalling a kernel route", "interface", st.Spec, "err", err)
		}
	}
	p.udpMu.RLock()
	var stale []*udpSession
	for _, s := range p.udpSess {
		if s.spec == st.Spec && (!st.Up || s.ifIndex != st.Interface.Index) {
			stale = append(stale, s)
		}
	}
	p.udpMu.RUnlock()
	for _, s := range stale {
		p.endUDP(s, false)
	}
	if p.onChange != nil {
		p.onChange(st)
	}
	p.ifaceChanges.Add(1)
}

func (p *Proxy) isSelf(a netip.AddrPort) bool { return p.self[unmap(a)] }

func unmap(a netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(a.Addr().Unmap().WithZone(""), a.Port())
}

func family(a netip.AddrPort) string {
	if a.Addr().Unmap().Is4() {
		return "4"
	}
	return "6"
}

// isUnsupported reports whether err says the platform cannot tell (so the table alone decides).
func isUnsupported(err error) bool { return errors.Is(err, backend.ErrUnsupported) }

// routeCheckInterval is how often route mode checks that its kernel routes are still in place when it cannot
// watch the routing policy; while it can, it checks at every change and ten times less often besides.
var routeCheckInterval = 2 * time.Second

// guardRoutes puts back, until Close, the kernel routes another program took apart (see routes.verify).
func (p *Proxy) guardRoutes() {
	defer p.loops.Done()
	wake := make(chan struct{}, 1)
	watching := make(chan error, 1)
	p.loops.Add(1)
	go func() {
		defer p.loops.Done()
		watching <- p.routes.kr.WatchRoutes(p.ctx, func() {
			select {
			case wake <- struct{}{}:
			default:
			}
		})
	}()
	interval := routeCheckInterval * 10
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-p.ctx.Done():
			return
		case err := <-watching:
			if err != nil && p.ctx.Err() == nil {
				p.log.Debug("split tunnel: watching the routing policy failed; polling", "err", err)
			}
			t.Reset(routeCheckInterval)
			watching = nil
			continue
		case <-t.C:
		case <-wake:
		}
		p.routes.verify(p.cfg.OnInterfaceDown != DownDirect, p.log)
	}
}

// retryDelay backs off accept/read loops on unexpected errors (e.g. EMFILE) without spinning.
func retryDelay(attempt int) time.Duration {
	d := time.Duration(attempt) * 5 * time.Millisecond
	if d > time.Second {
		d = time.Second
	}
	return d
}
