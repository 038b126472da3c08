package splittun

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/warden-fw/warden/backend"
	"github.com/warden-fw/warden/proxy/netif"
	"github.com/warden-fw/warden/proxy/redirect"
)

var v4dst = netip.MustParseAddr("192.0.2.1")

// routingPlatform is fakePlatform plus a kernel router that records what it was asked to do.
type routingPlatform struct {
	fakePlatform
	mu      sync.Mutex
	calls   []string
	failing bool
	broken  map[uint8]bool // routes RouteIntact says were taken apart
}

func (r *routingPlatform) log(format string, args ...any) {
	r.mu.Lock()
	r.calls = append(r.calls, fmt.Sprintf(format, args...))
	r.mu.Unlock()
}

func (r *routingPlatform) ResetRoutes() error { r.log("reset"); return nil }

func (r *routingPlatform) InstallRoute(n uint8, ifc *netif.Interface, failClosed bool) error {
	r.mu.Lock()
	failing := r.failing
	r.mu.Unlock()
	if failing {
		return errors.New("kernel says no")
	}
	r.log("install %d %s/%d closed=%v", n, ifc.Name, ifc.Index, failClosed)
	return nil
}

func (r *routingPlatform) RemoveRoute(n uint8) error { r.log("remove %d", n); return nil }

func (r *routingPlatform) WatchRoutes(context.Context, func()) error {
	return errors.New("not watched here")
}

func (r *routingPlatform) RouteIntact(n uint8, failClosed bool) (bool, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return !r.broken[n], nil
}

func (r *routingPlatform) took() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := r.calls
	r.calls = nil
	return out
}

// twoLinks is a netif.Source with links up0 (index 7) and up1 (index 8); up0 can be taken down.
type twoLinks struct{ loSource }

func (s *twoLinks) Links() ([]netif.Link, error) {
	l, _ := s.loSource.Links()
	return append(l, netif.Link{Index: 8, Name: "up1", Up: true, Addrs: []netif.Addr{{Prefix: netip.MustParsePrefix("10.9.0.2/24")}}}), nil
}

func newRouteProxy(t *testing.T, cfg Config) (*Proxy, *routingPlatform, *twoLinks, *netif.Resolver) {
	t.Helper()
	plat, src := &routingPlatform{}, &twoLinks{}
	res := netif.NewResolver(src, nil)
	cfg.Interface = "up0"
	p, err := New(cfg, redirect.NewTable(time.Minute, 16), Options{Platform: plat, Resolver: res, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p, plat, src, res
}

func TestRouteModeDecisions(t *testing.T) {
	p, plat, src, res := newRouteProxy(t, Config{})
	if p.Mode() != ModeRoute {
		t.Fatalf("mode %q with a platform that routes, want %q", p.Mode(), ModeRoute)
	}
	split := func(n uint8) backend.Decision {
		return backend.Decision{Verdict: backend.RerouteToSplitTun, Permanent: true, Route: n}
	}
	steps := []struct {
		what  string
		proto backend.Protocol
		via   string
		fresh bool
		want  backend.Decision
		calls []string
	}{
		{"first use of the default installs route 1", backend.TCP, "", true, split(1), []string{"reset", "install 1 up0/7 closed=true"}},
		{"the same interface again: no kernel work", backend.UDP, "up0", true, split(1), nil},
		{"another interface gets route 2", backend.TCP, "up1", true, split(2), []string{"install 2 up1/8 closed=true"}},
		{"re-evaluation is not counted", backend.TCP, "up1", false, split(2), nil},
	}
	for _, s := range steps {
		if got := p.RouteSplit(s.proto, v4dst, s.via, s.fresh); got != s.want {
			t.Errorf("%s: %v, want %v", s.what, got, s.want)
		}
		if diff := cmp.Diff(s.calls, plat.took()); diff != "" {
			t.Errorf("%s: kernel calls (-want +got):\n%s", s.what, diff)
		}
	}
	// up1 has no IPv6 address: an IPv6 connection split through it is refused (block), not routed.
	if got, want := p.RouteSplit(backend.TCP, netip.MustParseAddr("2001:db8::1"), "up1", true), (backend.Decision{Verdict: backend.Block, Permanent: true}); got != want {
		t.Errorf("IPv6 through an interface without IPv6: %v, want %v", got, want)
	}
	if p.Stats().TCP.Refused != 1 {
		t.Errorf("refused counter %d, want 1", p.Stats().TCP.Refused)
	}
	st := p.Stats()
	if st.TCP.Routed != 2 || st.UDP.Routed != 1 || st.TCP.Total != 0 || st.Mode != ModeRoute {
		t.Errorf("stats: mode %s, tcp %+v, udp %+v; want 2 and 1 routed, nothing relayed", st.Mode, st.TCP, st.UDP)
	}

	// up0 goes down: block (the default) refuses; coming back reinstalls the route at once (the kernel
	// deleted it), so live connections recover without waiting for a new one.
	src.setDown(true)
	res.Refresh()
	if got, want := p.RouteSplit(backend.TCP, v4dst, "", true), (backend.Decision{Verdict: backend.Block, Permanent: true}); got != want {
		t.Errorf("interface down, block: %v, want %v", got, want)
	}
	if p.Stats().TCP.Refused != 2 {
		t.Errorf("refused counter %d, want 2 (IPv6 earlier, and now)", p.Stats().TCP.Refused)
	}
	src.setDown(false)
	res.Refresh()
	if diff := cmp.Diff([]string{"install 1 up0/7 closed=true"}, plat.took()); diff != "" {
		t.Errorf("interface back: kernel calls (-want +got):\n%s", diff)
	}
	if got := p.RouteSplit(backend.TCP, v4dst, "", true); got != split(1) {
		t.Errorf("interface back: %v", got)
	}

	// Close removes every route it installed.
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	got := plat.took()
	if diff := cmp.Diff([]string{"remove 1", "remove 2"}, slices.Sorted(slices.Values(got))); diff != "" {
		t.Errorf("close: kernel calls (-want +got):\n%s", diff)
	}
}

// Prepared routes are installed before any connection asks, once each; a spec that is down is skipped.
func TestPrepareRoutes(t *testing.T) {
	p, plat, _, _ := newRouteProxy(t, Config{})
	if err := p.PrepareRoutes([]string{"", "up1", "up0", "nosuch"}); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]string{"reset", "install 1 up0/7 closed=true", "install 2 up1/8 closed=true"}, plat.took()); diff != "" {
		t.Errorf("prepare: kernel calls (-want +got):\n%s", diff)
	}
	if got := p.RouteSplit(backend.TCP, v4dst, "up1", true); got.Route != 2 {
		t.Errorf("up1 after prepare: %v", got)
	}
	if calls := plat.took(); len(calls) != 0 {
		t.Errorf("a prepared route was installed again: %q", calls)
	}
}

func TestRouteModeDirectAndFallback(t *testing.T) {
	p, plat, src, res := newRouteProxy(t, Config{OnInterfaceDown: DownDirect})
	if got := p.RouteSplit(backend.UDP, v4dst, "", true); got.Route != 1 {
		t.Fatalf("up: %v", got)
	}
	if diff := cmp.Diff([]string{"reset", "install 1 up0/7 closed=false"}, plat.took()); diff != "" {
		t.Errorf("direct mode installs without the fail-closed route (-want +got):\n%s", diff)
	}
	src.setDown(true)
	res.Refresh()
	if got, want := p.RouteSplit(backend.UDP, v4dst, "", true), (backend.Decision{Verdict: backend.Accept, Permanent: true}); got != want {
		t.Errorf("down, direct: %v, want %v", got, want)
	}
	if p.Stats().UDP.Direct != 1 {
		t.Errorf("direct counter %d, want 1", p.Stats().UDP.Direct)
	}
	// A route the kernel refuses: the connection goes to the relay instead of failing.
	plat.mu.Lock()
	plat.failing = true
	plat.mu.Unlock()
	if got, want := p.RouteSplit(backend.TCP, v4dst, "up1", true), (backend.Decision{Verdict: backend.RerouteToSplitTun, Permanent: true}); got != want {
		t.Errorf("kernel refuses: %v, want the relay %v", got, want)
	}
}

func TestRouteModeBoundsRoutes(t *testing.T) {
	p, _, _, _ := newRouteProxy(t, Config{})
	r := p.routes
	for i := range backend.MaxSplitRoutes {
		st := netif.State{Spec: fmt.Sprintf("if%d", i), Up: true, Interface: netif.Interface{Name: "x", Index: 100 + i}}
		if n, err := r.route(st, true); err != nil || int(n) != i+1 {
			t.Fatalf("route %d: %d, %v", i, n, err)
		}
	}
	st := netif.State{Spec: "one-too-many", Up: true, Interface: netif.Interface{Name: "y", Index: 99}}
	if _, err := r.route(st, true); err == nil {
		t.Errorf("route %d assigned; want an error past %d", backend.MaxSplitRoutes+1, backend.MaxSplitRoutes)
	}
}

func TestModeSelection(t *testing.T) {
	table := redirect.NewTable(time.Minute, 16)
	for _, c := range []struct {
		mode string
		plat Platform
		want string
		err  bool
	}{
		{ModeAuto, &routingPlatform{}, ModeRoute, false},
		{ModeAuto, &fakePlatform{}, ModeProxy, false},
		{ModeProxy, &routingPlatform{}, ModeProxy, false},
		{ModeRoute, &fakePlatform{}, "", true},
	} {
		p, err := New(Config{Mode: c.mode}, table, Options{Platform: c.plat})
		switch {
		case c.err:
			if !errors.Is(err, backend.ErrUnsupported) {
				t.Errorf("mode %s without routing: %v, want ErrUnsupported", c.mode, err)
			}
		case err != nil:
			t.Errorf("mode %s: %v", c.mode, err)
		case p.Mode() != c.want:
			t.Errorf("mode %s on %T: %s, want %s", c.mode, c.plat, p.Mode(), c.want)
		}
	}
}

// A route another program took apart is installed again, by the guard's check; a route that is intact, or
// one whose interface is down, is left alone.
func TestRouteGuardRestores(t *testing.T) {
	p, plat, _, _ := newRouteProxy(t, Config{})
	p.RouteSplit(backend.TCP, v4dst, "", true)
	p.RouteSplit(backend.TCP, v4dst, "up1", true)
	plat.took()
	p.routes.verify(true, p.log)
	if calls := plat.took(); len(calls) != 0 {
		t.Errorf("intact routes: kernel calls %v", calls)
	}
	plat.mu.Lock()
	plat.broken = map[uint8]bool{2: true}
	plat.mu.Unlock()
	p.routes.verify(true, p.log)
	if diff := cmp.Diff([]string{"install 2 up1/8 closed=true"}, plat.took()); diff != "" {
		t.Errorf("a broken route (-want +got):\n%s", diff)
	}
	p.routes.mu.Lock()
	p.routes.slots["up1"].ifIndex = 0 // its interface went down
	p.routes.mu.Unlock()
	p.routes.verify(true, p.log)
	if calls := plat.took(); len(calls) != 0 {
		t.Errorf("a route whose interface is down: kernel calls %v", calls)
	}
}
