// Package netif chooses the network interface split-tunnelled traffic leaves through. A choice ("spec") is an
// interface name, one of its IP addresses, its MAC address, or "auto": the interface of the lowest-metric default
// route that is not a tunnel (so split traffic bypasses a VPN that holds a more specific or policy route).
//
// Selection is a pure function of a link and route snapshot (Select), so its logic is tested without a kernel;
// a Source supplies the snapshot (netlink on Linux) and a Resolver caches the result per spec and re-resolves
// when the system's links, addresses or routes change.
package netif

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"
)

// Auto is the spec that picks the interface of the best non-tunnel default route.
const Auto = "auto"

// Addr is one address of a link.
type Addr struct {
	Prefix netip.Prefix
	// Unusable reports whether the address may not be used as a source (IPv6 tentative, deprecated or failed
	// duplicate address detection).
	Unusable bool
}

// Link is what Select needs to know about one network interface.
type Link struct {
	Index int
	Name  string
	// Kind is the driver kind where the OS tells it (Linux: "veth", "wireguard", "tuntap", "gre", ...).
	Kind string
	// Encap is the link-layer type where the OS tells it (Linux: "ether", "none", "ppp", "ipip", ...).
	Encap        string
	MAC          net.HardwareAddr
	Up           bool // administratively up and with carrier
	Loopback     bool
	PointToPoint bool
	Addrs        []Addr
}

// Route is a default route (0.0.0.0/0 or ::/0) through one link. A multipath route is one Route per next hop.
type Route struct {
	LinkIndex int
	Metric    int
	V6        bool
	Table     int
}

// Source gives snapshots of the system's links and default routes.
type Source interface {
	Links() ([]Link, error)
	DefaultRoutes() ([]Route, error)
}

// Watcher is implemented by sources that can tell when links, addresses or routes change. Watch calls notify
// (possibly in bursts) until ctx is done.
type Watcher interface {
	Watch(ctx context.Context, notify func()) error
}

// Interface is a resolved interface: what an upstream socket binds to.
type Interface struct {
	Name  string     `json:"name"`
	Index int        `json:"index"`
	MAC   string     `json:"mac,omitempty"`
	V4    netip.Addr `json:"v4,omitzero"` // source address for IPv4 upstreams; invalid when the link has none
	V6    netip.Addr `json:"v6,omitzero"` // source address for IPv6 upstreams; invalid when the link has none
}

// Source returns the interface's source address for dst's family, or an invalid Addr.
func (i *Interface) Source(dst netip.Addr) netip.Addr {
	if dst.Unmap().Is4() {
		return i.V4
	}
	return i.V6
}

// State is the current resolution of one spec.
type State struct {
	Spec string `json:"spec"`
	// Up reports whether the spec resolved to an existing link that is up.
	Up        bool      `json:"up"`
	Interface Interface `json:"interface"`
	// Err says why the spec did not resolve, or why the link counts as down.
	Err   string    `json:"error,omitempty"`
	Since time.Time `json:"since"` // when Up or the interface last changed
}

// tunnelPrefixes are name prefixes of VPN and tunnel interfaces on the platforms Warden runs on.
var tunnelPrefixes = []string{
	"wg", "tun", "tap", "ppp", "tailscale", "utun", "ipsec", "vti", "gre", "ipip", "sit", "ip6tnl", "ip6gre",
	"zt", "nordlynx", "proton", "mullvad", "wintun", "xfrm", "erspan", "vxlan", "geneve",
}

var tunnelKinds = map[string]bool{
	"wireguard": true, "tuntap": true, "tun": true, "gre": true, "gretap": true, "ip6gre": true, "ip6gretap": true,
	"vti": true, "vti6": true, "ipip": true, "sit": true, "ip6tnl": true, "xfrm": true, "ppp": true,
	"vxlan": true, "geneve": true, "erspan": true, "ip6erspan": true,
}

var tunnelEncaps = map[string]bool{
	"none": true, "ppp": true, "ipip": true, "tunnel6": true, "sit": true, "ipgre": true, "ip6gre": true,
	"void": true,
}

// IsTunnel reports whether l looks like a VPN or tunnel interface: by name prefix, driver kind, link-layer type
// or the point-to-point flag.
func IsTunnel(l *Link) bool {
	name := strings.ToLower(l.Name)
	for _, p := range tunnelPrefixes {
		if strings.HasPrefix(name, p) {
			return true
		}
	}
	return tunnelKinds[l.Kind] || tunnelEncaps[l.Encap] || l.PointToPoint
}

// ErrNotFound is returned (wrapped) by Select when no link matches the spec.
var ErrNotFound = errors.New("no matching interface")

// Select picks the link a spec names from a snapshot. routes are only needed for Auto. A named link is
// returned even when it is down (the caller checks Link.Up); Auto only considers links that are up.
func Select(spec string, links []Link, routes []Route) (*Link, error) {
	spec = strings.TrimSpace(spec)
	if spec == "" || strings.EqualFold(spec, Auto) {
		return selectAuto(links, routes)
	}
	if ip, err := netip.ParseAddr(spec); err == nil {
		ip = ip.Unmap().WithZone("")
		for i := range links {
			for _, a := range links[i].Addrs {
				if a.Prefix.Addr().Unmap() == ip {
					return &links[i], nil
				}
			}
		}
		return nil, fmt.Errorf("interface with address %s: %w", ip, ErrNotFound)
	}
	for i := range links {
		if links[i].Name == spec {
			return &links[i], nil
		}
	}
	if mac, err := net.ParseMAC(spec); err == nil {
		// Several links may share a MAC (VLANs, bridges, bonds): prefer one that is up, then the lowest index.
		var best *Link
		for i := range links {
			l := &links[i]
			if !slices.Equal(l.MAC, mac) {
				continue
			}
			if best == nil || (l.Up && !best.Up) || (l.Up == best.Up && l.Index < best.Index) {
				best = l
			}
		}
		if best != nil {
			return best, nil
		}
		return nil, fmt.Errorf("interface with MAC %s: %w", mac, ErrNotFound)
	}
	return nil, fmt.Errorf("interface %q: %w", spec, ErrNotFound)
}

func selectAuto(links []Link, routes []Route) (*Link, error) {
	byIndex := make(map[int]*Link, len(links))
	for i := range links {
		byIndex[links[i].Index] = &links[i]
	}
	rs := slices.Clone(routes)
	// Lowest metric first; at equal metric IPv4 before IPv6, then the lower link index, so the choice is stable.
	slices.SortStableFunc(rs, func(a, b Route) int {
		if c := cmp.Compare(a.Metric, b.Metric); c != 0 {
			return c
		}
		if a.V6 != b.V6 {
			if !a.V6 {
				return -1
			}
			return 1
		}
		return cmp.Compare(a.LinkIndex, b.LinkIndex)
	})
	for _, r := range rs {
		l := byIndex[r.LinkIndex]
		if l == nil || !l.Up || l.Loopback || IsTunnel(l) {
			continue
		}
		return l, nil
	}
	return nil, fmt.Errorf("no default route through a non-tunnel interface that is up: %w", ErrNotFound)
}

// Resolve turns a selected link into the Interface an upstream socket binds to.
func Resolve(l *Link) Interface {
	ifc := Interface{Name: l.Name, Index: l.Index}
	if len(l.MAC) > 0 {
		ifc.MAC = l.MAC.String()
	}
	ifc.V4 = pickSource(l.Addrs, true)
	ifc.V6 = pickSource(l.Addrs, false)
	return ifc
}

// pickSource prefers a global address. Link-local IPv4 and loopback addresses are last resorts; IPv6
// link-local ones are never used (they would need a zone and cannot reach beyond the link).
func pickSource(addrs []Addr, v4 bool) netip.Addr {
	var fallback netip.Addr
	for _, a := range addrs {
		ip := a.Prefix.Addr().Unmap().WithZone("")
		if ip.Is4() != v4 || a.Unusable || ip.IsMulticast() || ip.IsUnspecified() {
			continue
		}
		if ip.IsLoopback() || (v4 && ip.IsLinkLocalUnicast()) {
			if !fallback.IsValid() {
				fallback = ip
			}
			continue
		}
		if ip.IsLinkLocalUnicast() {
			continue
		}
		return ip
	}
	return fallback
}

// maxSpecs bounds the Resolver's cache; specs come from the configuration, so this is never reached in practice.
const maxSpecs = 256

// Resolver resolves specs against a Source, caches the result and re-resolves on change. It is safe for
// concurrent use.
type Resolver struct {
	src Source
	log *slog.Logger
	now func() time.Time

	mu       sync.Mutex
	states   map[string]State
	onChange func(State)
}

// NewResolver returns a resolver over src. A nil logger discards.
func NewResolver(src Source, log *slog.Logger) *Resolver {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Resolver{src: src, log: log, now: time.Now, states: make(map[string]State)}
}

// OnChange sets a function called (without locks held) with each state that changed on a refresh.
func (r *Resolver) OnChange(f func(State)) {
	r.mu.Lock()
	r.onChange = f
	r.mu.Unlock()
}

// canonical maps the spellings of Auto onto one cache key.
func canonical(spec string) string {
	spec = strings.TrimSpace(spec)
	if spec == "" || strings.EqualFold(spec, Auto) {
		return Auto
	}
	return spec
}

// Get returns the spec's current state, resolving it now if it was never asked for.
func (r *Resolver) Get(spec string) State {
	spec = canonical(spec)
	r.mu.Lock()
	st, ok := r.states[spec]
	r.mu.Unlock()
	if ok {
		return st
	}
	st = r.resolve(spec, nil, nil, nil)
	r.mu.Lock()
	if old, ok := r.states[spec]; ok {
		st = old // a concurrent Get or Refresh got there first
	} else if len(r.states) < maxSpecs {
		r.states[spec] = st
	}
	r.mu.Unlock()
	return st
}

// States returns every cached state, sorted by spec.
func (r *Resolver) States() []State {
	r.mu.Lock()
	out := make([]State, 0, len(r.states))
	for _, st := range r.states {
		out = append(out, st)
	}
	r.mu.Unlock()
	slices.SortFunc(out, func(a, b State) int { return strings.Compare(a.Spec, b.Spec) })
	return out
}

// resolve computes a spec's state from one snapshot (taken now when links is nil). prev, when non-nil, keeps
// Since across refreshes that change nothing.
func (r *Resolver) resolve(spec string, links []Link, routes []Route, prev *State) State {
	st := State{Spec: spec}
	var err error
	if links == nil {
		links, routes, err = r.snapshot(spec)
	}
	if err == nil {
		var l *Link
		if l, err = Select(spec, links, routes); err == nil {
			st.Interface = Resolve(l)
			st.Up = l.Up
			if !l.Up {
				st.Err = "interface " + l.Name + " is down"
			}
		}
	}
	if err != nil {
		st.Err = err.Error()
	}
	st.Since = r.now()
	if prev != nil && prev.Up == st.Up && prev.Interface == st.Interface {
		st.Since = prev.Since
	}
	return st
}

func (r *Resolver) snapshot(spec string) ([]Link, []Route, error) {
	links, err := r.src.Links()
	if err != nil {
		return nil, nil, fmt.Errorf("listing links: %w", err)
	}
	if links == nil {
		links = []Link{}
	}
	var routes []Route
	if canonical(spec) == Auto {
		if routes, err = r.src.DefaultRoutes(); err != nil {
			return nil, nil, fmt.Errorf("listing default routes: %w", err)
		}
	}
	return links, routes, nil
}

// Refresh re-resolves every cached spec from one fresh snapshot and reports those that changed.
func (r *Resolver) Refresh() {
	r.mu.Lock()
	specs := make([]string, 0, len(r.states))
	for s := range r.states {
		specs = append(specs, s)
	}
	r.mu.Unlock()
	slices.Sort(specs) // stable order of change reports
	if len(specs) == 0 {
		return
	}
	links, routes, snapErr := r.snapshot(Auto)

	var changed []State
	r.mu.Lock()
	for _, spec := range specs {
		prev, ok := r.states[spec]
		if !ok {
			continue
		}
		var st State
		if snapErr != nil {
			st = State{Spec: spec, Err: snapErr.Error(), Since: r.now()}
			if !prev.Up {
				st.Since = prev.Since
			}
		} else {
			st = r.resolve(spec, links, routes, &prev)
		}
		if st.Up != prev.Up || st.Interface != prev.Interface || st.Err != prev.Err {
			changed = append(changed, st)
		}
		r.states[spec] = st
	}
	f := r.onChange
	r.mu.Unlock()

	for _, st := range changed {
		if st.Up {
			r.log.Info("split-tunnel interface up", "spec", st.Spec, "interface", st.Interface.Name,
				"v4", st.Interface.V4, "v6", st.Interface.V6)
		} else {
			r.log.Warn("split-tunnel interface down", "spec", st.Spec, "reason", st.Err)
		}
		if f != nil {
			f(st)
		}
	}
}

// Run keeps the cache current until ctx is done: it re-resolves whenever the source reports a change (if it is
// a Watcher) and every poll interval regardless, which also covers missed notifications.
func (r *Resolver) Run(ctx context.Context, poll time.Duration) error {
	if poll <= 0 {
		poll = 5 * time.Second
	}
	kick := make(chan struct{}, 1)
	notify := func() {
		select {
		case kick <- struct{}{}:
		default: // a refresh is already pending; it will see this change too
		}
	}
	var wg sync.WaitGroup
	defer wg.Wait()
	if w, ok := r.src.(Watcher); ok {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := w.Watch(ctx, notify); err != nil && ctx.Err() == nil {
				r.log.Warn("watching interfaces failed; polling only", "err", err)
			}
		}()
	}
	t := time.NewTicker(poll)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-kick:
		case <-t.C:
		}
		r.Refresh()
	}
}
