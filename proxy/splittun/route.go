package splittun

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"sync"

	"github.com/warden-fw/warden/backend"
	"github.com/warden-fw/warden/proxy/netif"
)

// KernelRouter is implemented by platforms that can carry split connections by kernel routing instead of the
// relay (Linux: policy routing on a packet mark, see backend/nfqueue/splitroute). Route n is 1..
// backend.MaxSplitRoutes; the backend turns a decision's Route into the matching mark.
type KernelRouter interface {
	// ResetRoutes removes every route a previous run may have left.
	ResetRoutes() error
	// InstallRoute makes route n leave through ifc (replacing what it did before). With failClosed, packets
	// of route n fail while ifc's route is gone instead of taking the normal route.
	InstallRoute(n uint8, ifc *netif.Interface, failClosed bool) error
	// RemoveRoute removes route n.
	RemoveRoute(n uint8) error
	// RouteIntact reports whether the parts of route n whose loss would let its packets take the normal route
	// are still in place (on Linux: its ip rules, and with failClosed its unreachable defaults).
	RouteIntact(n uint8, failClosed bool) (bool, error)
	// WatchRoutes calls notify after every change to the kernel's routing policy until ctx ends, or fails at
	// once when it cannot; the guard then polls alone.
	WatchRoutes(ctx context.Context, notify func()) error
}

// routeSlot is one interface spec's kernel route.
type routeSlot struct {
	n    uint8
	spec string
	// ifIndex is the link the route was last installed for; 0 while it must be (re)installed.
	ifIndex int
	ifc     netif.Interface // that link
}

// routes assigns kernel routes to interface specs and keeps them installed.
type routes struct {
	kr KernelRouter

	mu     sync.Mutex
	slots  map[string]*routeSlot
	failed bool // a failure was logged; log the next only after a success
}

// RouteSplit implements the pipeline's split router (firewall.SplitRouter) in route mode: a connection to
// remote split via spec leaves through a kernel route while the interface is up and has an address of
// remote's family; otherwise on_interface_down blocks or accepts it. Should a route be impossible (more than
// backend.MaxSplitRoutes interfaces in use, or the kernel refuses), the connection goes to the relay as in
// proxy mode.
func (p *Proxy) RouteSplit(proto backend.Protocol, remote netip.Addr, via string, fresh bool) backend.Decision {
	c := &p.tcp
	if proto == backend.UDP {
		c = &p.udp
	}
	spec := via
	if spec == "" {
		spec = p.cfg.Interface
	}
	st := p.res.Get(spec)
	// Without an address of the destination's family the interface cannot carry the connection (MASQUERADE
	// would have no source): as good as down for it.
	if !st.Up || !st.Interface.Source(remote).IsValid() {
		if p.cfg.OnInterfaceDown == DownDirect {
			if fresh {
				c.direct.Add(1)
			}
			return backend.Decision{Verdict: backend.Accept, Permanent: true}
		}
		if fresh {
			c.refused.Add(1)
		}
		return backend.Decision{Verdict: backend.Block, Permanent: true}
	}
	if p.routes == nil {
		return backend.Decision{Verdict: backend.RerouteToSplitTun, Permanent: true}
	}
	n, err := p.routes.route(st, p.cfg.OnInterfaceDown != DownDirect)
	if err != nil {
		p.routes.mu.Lock()
		first := !p.routes.failed
		p.routes.failed = true
		p.routes.mu.Unlock()
		if first {
			p.log.Error("split tunnel: kernel route unavailable; relaying through the proxy instead", "interface", spec, "err", err)
		}
		return backend.Decision{Verdict: backend.RerouteToSplitTun, Permanent: true}
	}
	if fresh {
		c.routed.Add(1)
	}
	return backend.Decision{Verdict: backend.RerouteToSplitTun, Permanent: true, Route: n}
}

// PrepareRoutes installs, in route mode, the kernel routes of the given interface specs ("" = the default)
// that are up now, so that no new connection waits for the kernel while its route is installed. Routes are
// still installed on first use for specs not prepared, and reinstalled when an interface comes back.
func (p *Proxy) PrepareRoutes(specs []string) error {
	if p.routes == nil {
		return nil
	}
	var errs []error
	for _, spec := range specs {
		if spec == "" {
			spec = p.cfg.Interface
		}
		st := p.res.Get(spec)
		if !st.Up {
			continue
		}
		if _, err := p.routes.route(st, p.cfg.OnInterfaceDown != DownDirect); err != nil {
			errs = append(errs, fmt.Errorf("split route for %s: %w", spec, err))
		}
	}
	return errors.Join(errs...)
}

// route returns the kernel route of an interface that is up, assigning and installing it on first use and
// reinstalling it when the interface changed.
func (r *routes) route(st netif.State, failClosed bool) (uint8, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	s := r.slots[st.Spec]
	if s == nil {
		if len(r.slots) >= backend.MaxSplitRoutes {
			return 0, fmt.Errorf("more than %d split interfaces in use", backend.MaxSplitRoutes)
		}
		s = &routeSlot{n: uint8(len(r.slots) + 1), spec: st.Spec}
		r.slots[st.Spec] = s
	}
	if s.ifIndex != st.Interface.Index {
		if err := r.installLocked(s, st, failClosed); err != nil {
			return 0, err
		}
		r.failed = false
	}
	return s.n, nil
}

// installLocked (re)installs slot s for the interface st names; s remembers the link it now leads to, or that
// it must be installed again.
func (r *routes) installLocked(s *routeSlot, st netif.State, failClosed bool) error {
	ifc := st.Interface
	if err := r.kr.InstallRoute(s.n, &ifc, failClosed); err != nil {
		s.ifIndex = 0
		return err
	}
	s.ifIndex, s.ifc = ifc.Index, ifc
	return nil
}

// verify reinstalls the installed routes another program took apart (an `ip rule flush`, a VPN client
// rewriting the rules): without its ip rule a route's packets would leave through the default interface,
// which is exactly what a split rule is there to prevent. Routes it cannot check are left alone. The kernel is
// asked without the lock, which split decisions on the packet path take.
func (r *routes) verify(failClosed bool, log *slog.Logger) {
	type installed struct {
		n       uint8
		ifIndex int
	}
	r.mu.Lock()
	var check []installed
	for _, s := range r.slots {
		if s.ifIndex != 0 {
			check = append(check, installed{s.n, s.ifIndex})
		}
	}
	r.mu.Unlock()
	for _, c := range check {
		if ok, err := r.kr.RouteIntact(c.n, failClosed); err != nil || ok {
			continue
		}
		r.mu.Lock()
		for _, s := range r.slots {
			if s.n != c.n || s.ifIndex != c.ifIndex {
				continue // reinstalled or gone meanwhile
			}
			log.Warn("split tunnel: kernel route changed by another program; restoring it", "route", s.n,
				"interface", s.spec)
			if err := r.kr.InstallRoute(s.n, &s.ifc, failClosed); err != nil {
				log.Error("split tunnel: restoring a kernel route", "route", s.n, "interface", s.spec, "err", err)
				s.ifIndex = 0 // installed again on the next connection that needs it
			}
		}
		r.mu.Unlock()
	}
}

// changed follows an interface state change. The kernel deletes a link's routes when it goes down, so a
// route whose interface is back (or changed) is installed again at once: live connections on it recover.
func (r *routes) changed(st netif.State, failClosed bool) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	s := r.slots[st.Spec]
	if s == nil {
		return nil
	}
	if !st.Up {
		s.ifIndex = 0
		return nil
	}
	return r.installLocked(s, st, failClosed)
}

// close removes every installed route.
func (r *routes) close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	var errs []error
	for _, s := range r.slots {
		errs = append(errs, r.kr.RemoveRoute(s.n))
	}
	r.slots = map[string]*routeSlot{}
	return errors.Join(errs...)
}
