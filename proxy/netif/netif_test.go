package netif

import (
	"errors"
	"net"
	"net/netip"
	"sync"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
)

func mac(s string) net.HardwareAddr {
	m, err := net.ParseMAC(s)
	if err != nil {
		panic(err)
	}
	return m
}

func addrs(ss ...string) []Addr {
	var out []Addr
	for _, s := range ss {
		out = append(out, Addr{Prefix: netip.MustParsePrefix(s)})
	}
	return out
}

// testLinks is a laptop with Wi-Fi and Ethernet, a WireGuard tunnel holding the best default route, a tun
// device named innocently, and a second Ethernet that is down.
func testLinks() []Link {
	return []Link{
		{Index: 1, Name: "lo", Kind: "device", Encap: "loopback", Up: true, Loopback: true, Addrs: addrs("127.0.0.1/8", "::1/128")},
		{Index: 2, Name: "eth0", Kind: "device", Encap: "ether", MAC: mac("02:00:00:00:00:02"), Up: true,
			Addrs: append(addrs("fe80::2/64", "10.0.0.2/24", "2001:db8::2/64"), Addr{Prefix: netip.MustParsePrefix("2001:db8::99/64"), Unusable: true})},
		{Index: 3, Name: "wlan0", Kind: "device", Encap: "ether", MAC: mac("02:00:00:00:00:03"), Up: true, Addrs: addrs("192.168.1.3/24")},
		{Index: 4, Name: "wg0", Kind: "wireguard", Encap: "none", Up: true, Addrs: addrs("10.64.0.1/32")},
		{Index: 5, Name: "office", Kind: "tuntap", Encap: "none", Up: true, Addrs: addrs("10.8.0.2/24")},
		{Index: 6, Name: "eth1", Kind: "device", Encap: "ether", MAC: mac("02:00:00:00:00:06"), Up: false, Addrs: addrs("172.16.0.2/24")},
		{Index: 7, Name: "eth0.100", Kind: "vlan", Encap: "ether", MAC: mac("02:00:00:00:00:02"), Up: false},
		{Index: 8, Name: "ppp0", Kind: "ppp", Encap: "ppp", Up: true, PointToPoint: true},
	}
}

func TestSelect(t *testing.T) {
	links := testLinks()
	tests := []struct {
		name   string
		spec   string
		routes []Route
		want   string // link name, "" for an error
	}{
		{"auto skips wireguard", "auto", []Route{{LinkIndex: 4, Metric: 0}, {LinkIndex: 3, Metric: 600}, {LinkIndex: 2, Metric: 100}}, "eth0"},
		{"auto skips tun by kind", "", []Route{{LinkIndex: 5, Metric: 0}, {LinkIndex: 3, Metric: 600}}, "wlan0"},
		{"auto skips ppp", "AUTO", []Route{{LinkIndex: 8, Metric: 0}, {LinkIndex: 3, Metric: 5}}, "wlan0"},
		{"auto skips down links", "auto", []Route{{LinkIndex: 6, Metric: 0}, {LinkIndex: 3, Metric: 5}}, "wlan0"},
		{"auto v4 before v6 at equal metric", "auto", []Route{{LinkIndex: 2, Metric: 100, V6: true}, {LinkIndex: 3, Metric: 100}}, "wlan0"},
		{"auto v6 only", "auto", []Route{{LinkIndex: 2, Metric: 1024, V6: true}}, "eth0"},
		{"auto unknown link index", "auto", []Route{{LinkIndex: 99}, {LinkIndex: 2, Metric: 9}}, "eth0"},
		{"auto nothing suitable", "auto", []Route{{LinkIndex: 4}, {LinkIndex: 1}}, ""},
		{"auto no routes", "auto", nil, ""},
		{"by name", "wlan0", nil, "wlan0"},
		{"by name even if tunnel", "wg0", nil, "wg0"},
		{"by name down", "eth1", nil, "eth1"},
		{"by IPv4", "192.168.1.3", nil, "wlan0"},
		{"by IPv6", "2001:db8::2", nil, "eth0"},
		{"by mapped IPv4", "::ffff:172.16.0.2", nil, "eth1"},
		{"by MAC prefers the up link", "02:00:00:00:00:02", nil, "eth0"},
		{"by MAC dashes", "02-00-00-00-00-03", nil, "wlan0"},
		{"unknown name", "eth9", nil, ""},
		{"unknown IP", "10.9.9.9", nil, ""},
		{"unknown MAC", "02:00:00:00:00:99", nil, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l, err := Select(tt.spec, links, tt.routes)
			if tt.want == "" {
				if err == nil || !errors.Is(err, ErrNotFound) {
					t.Fatalf("Select(%q) = %v, %v; want ErrNotFound", tt.spec, l, err)
				}
				return
			}
			if err != nil {
				t.Fatalf("Select(%q): %v", tt.spec, err)
			}
			if l.Name != tt.want {
				t.Fatalf("Select(%q) = %s, want %s", tt.spec, l.Name, tt.want)
			}
		})
	}
}

func TestIsTunnel(t *testing.T) {
	tests := []struct {
		l    Link
		want bool
	}{
		{Link{Name: "eth0", Kind: "device", Encap: "ether"}, false},
		{Link{Name: "enp3s0", Kind: "veth", Encap: "ether"}, false},
		{Link{Name: "tailscale0", Kind: "tuntap", Encap: "none"}, true},
		{Link{Name: "utun3"}, true},
		{Link{Name: "work", Kind: "wireguard"}, true},
		{Link{Name: "x", Encap: "ipip"}, true},
		{Link{Name: "x", PointToPoint: true}, true},
		{Link{Name: "TUN0"}, true},
	}
	for _, tt := range tests {
		if got := IsTunnel(&tt.l); got != tt.want {
			t.Errorf("IsTunnel(%+v) = %v, want %v", tt.l, got, tt.want)
		}
	}
}

func TestResolveSources(t *testing.T) {
	links := testLinks()
	got := Resolve(&links[1])
	want := Interface{Name: "eth0", Index: 2, MAC: "02:00:00:00:00:02",
		V4: netip.MustParseAddr("10.0.0.2"), V6: netip.MustParseAddr("2001:db8::2")}
	if d := cmp.Diff(want, got, cmpopts.EquateComparable(netip.Addr{})); d != "" {
		t.Fatalf("Resolve (-want +got):\n%s", d)
	}
	// Link-local IPv4 is a last resort; IPv6 link-local and unusable addresses never are.
	l := Link{Name: "x", Addrs: append(addrs("169.254.1.1/16", "fe80::1/64"), Addr{Prefix: netip.MustParsePrefix("2001:db8::5/64"), Unusable: true})}
	got = Resolve(&l)
	if got.V4 != netip.MustParseAddr("169.254.1.1") || got.V6.IsValid() {
		t.Fatalf("Resolve link-local only = %+v", got)
	}
	if s := got.Source(netip.MustParseAddr("::ffff:1.2.3.4")); s != got.V4 {
		t.Fatalf("Source for mapped v4 = %v", s)
	}
}

type fakeSource struct {
	mu     sync.Mutex
	links  []Link
	routes []Route
	err    error
}

func (f *fakeSource) Links() ([]Link, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]Link(nil), f.links...), f.err
}

func (f *fakeSource) DefaultRoutes() ([]Route, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]Route(nil), f.routes...), f.err
}

func (f *fakeSource) set(links []Link, routes []Route, err error) {
	f.mu.Lock()
	f.links, f.routes, f.err = links, routes, err
	f.mu.Unlock()
}

func TestResolverRefreshReportsChanges(t *testing.T) {
	links := testLinks()
	src := &fakeSource{links: links, routes: []Route{{LinkIndex: 2, Metric: 100}, {LinkIndex: 3, Metric: 600}}}
	r := NewResolver(src, nil)
	var changes []string
	r.OnChange(func(st State) {
		changes = append(changes, st.Spec+"="+st.Interface.Name+":"+map[bool]string{true: "up", false: "down"}[st.Up])
	})

	if st := r.Get(""); !st.Up || st.Interface.Name != "eth0" || st.Spec != Auto {
		t.Fatalf("Get(auto) = %+v", st)
	}
	if st := r.Get("wlan0"); !st.Up {
		t.Fatalf("Get(wlan0) = %+v", st)
	}
	r.Refresh()
	if len(changes) != 0 {
		t.Fatalf("refresh without change reported %v", changes)
	}

	// eth0 loses its carrier: auto moves to wlan0; wlan0 itself unchanged.
	down := testLinks()
	down[1].Up = false
	src.set(down, src.routes, nil)
	r.Refresh()
	if d := cmp.Diff([]string{"auto=wlan0:up"}, changes); d != "" {
		t.Fatalf("changes (-want +got):\n%s", d)
	}

	// wlan0 disappears entirely: both specs fail.
	changes = nil
	src.set(append(down[:2:2], down[3:]...), src.routes, nil)
	r.Refresh()
	if d := cmp.Diff([]string{"auto=:down", "wlan0=:down"}, changes); d != "" {
		t.Fatalf("changes (-want +got):\n%s", d)
	}
	if st := r.Get("wlan0"); st.Up || st.Err == "" {
		t.Fatalf("Get(wlan0) after removal = %+v", st)
	}

	// Everything returns.
	changes = nil
	src.set(links, src.routes, nil)
	r.Refresh()
	if d := cmp.Diff([]string{"auto=eth0:up", "wlan0=wlan0:up"}, changes); d != "" {
		t.Fatalf("changes (-want +got):\n%s", d)
	}

	// A source failure marks everything down with the error.
	changes = nil
	src.set(links, src.routes, errors.New("netlink gone"))
	r.Refresh()
	if len(changes) != 2 {
		t.Fatalf("changes = %v", changes)
	}
	states := r.States()
	if len(states) != 2 || states[0].Up || states[0].Err == "" {
		t.Fatalf("States = %+v", states)
	}
}
