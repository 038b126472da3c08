package firewall

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"strings"
	"testing"

	"github.com/warden-fw/warden/backend"
	"github.com/warden-fw/warden/config"
)

func mustPolicy(t testing.TB, yaml string) *Policy {
	t.Helper()
	cfg, err := config.LoadBytes([]byte(yaml), ".yaml", nil)
	if err != nil {
		t.Fatalf("config: %v", err)
	}
	p, err := Compile(cfg)
	if err != nil {
		t.Fatalf("compile: %v", err)
	}
	return p
}

func q(dir backend.Direction, proto backend.Protocol, remote string, port uint16) Query {
	return Query{Direction: dir, Protocol: proto, Remote: netip.MustParseAddr(remote), ServicePort: port, UID: -1}
}

func TestPolicyFields(t *testing.T) {
	p := mustPolicy(t, `
default_action: allow
inbound_default: drop
rules:
  - {name: telnet, action: block, protocol: tcp, ports: [23]}
  - {name: range, action: drop, protocol: udp, ports: ["8000-8100"]}
  - {name: net10, action: block, remote: [10.0.0.0/8]}
  - {name: v6doc, action: drop, remote: ["2001:db8::/32"]}
  - {name: host, action: allow, remote: [10.1.2.3]}
  - {name: curl, action: block, app: /usr/bin/curl}
  - {name: pybin, action: drop, app: "/opt/**/bin/python*"}
  - {name: root-icmp, action: block, protocol: icmp, user: "0"}
  - {name: on-wg, action: drop, interface: wg0}
  - {name: dom, action: block, remote: ["*.ads.example", exact.example]}
  - {name: ssh-in, action: allow, direction: inbound, protocol: tcp, ports: [22]}
  - {name: any-dir, action: block, direction: any, remote: [192.0.2.0/24]}
  - {name: split-web, action: split, protocol: tcp, ports: [443], via: eth1}
`)
	tests := []struct {
		name string
		q    Query
		want string // rule name or "default:<action>"
	}{
		{"tcp telnet", q(0, backend.TCP, "1.1.1.1", 23), "telnet"},
		{"udp telnet port is not tcp", q(0, backend.UDP, "1.1.1.1", 23), "default:allow"},
		{"udp range low", q(0, backend.UDP, "1.1.1.1", 8000), "range"},
		{"udp range high", q(0, backend.UDP, "1.1.1.1", 8100), "range"},
		{"udp range past", q(0, backend.UDP, "1.1.1.1", 8101), "default:allow"},
		{"cidr v4", q(0, backend.TCP, "10.200.0.1", 80), "net10"},
		{"cidr first match beats host", q(0, backend.TCP, "10.1.2.3", 80), "net10"},
		{"cidr v6", q(0, backend.UDP, "2001:db8:1::5", 53), "v6doc"},
		{"v6 outside", q(0, backend.UDP, "2001:db9::5", 53), "default:allow"},
		{"v4-mapped v6 is not v4 rule", q(0, backend.TCP, "::ffff:10.0.0.1", 80), "default:allow"},
		{"telnet before net10", q(0, backend.TCP, "10.0.0.1", 23), "telnet"},
		{"app exact", Query{Protocol: backend.TCP, Remote: netip.MustParseAddr("8.8.8.8"), ServicePort: 80, App: "/usr/bin/curl", UID: -1}, "curl"},
		{"app other", Query{Protocol: backend.TCP, Remote: netip.MustParseAddr("8.8.8.8"), ServicePort: 80, App: "/usr/bin/wget", UID: -1}, "default:allow"},
		{"app glob deep", Query{Protocol: backend.TCP, Remote: netip.MustParseAddr("8.8.8.8"), ServicePort: 80, App: "/opt/venv/x/bin/python3.12", UID: -1}, "pybin"},
		{"app glob shallow", Query{Protocol: backend.TCP, Remote: netip.MustParseAddr("8.8.8.8"), ServicePort: 80, App: "/opt/bin/python", UID: -1}, "pybin"},
		{"app unknown", Query{Protocol: backend.TCP, Remote: netip.MustParseAddr("8.8.8.8"), ServicePort: 80, UID: -1}, "default:allow"},
		{"uid icmp", Query{Protocol: backend.ICMP, Remote: netip.MustParseAddr("8.8.8.8"), UID: 0}, "root-icmp"},
		{"uid icmpv6", Query{Protocol: backend.ICMPv6, Remote: netip.MustParseAddr("2001::1"), UID: 0}, "root-icmp"},
		{"uid other", Query{Protocol: backend.ICMP, Remote: netip.MustParseAddr("8.8.8.8"), UID: 1000}, "default:allow"},
		{"interface", Query{Protocol: backend.UDP, Remote: netip.MustParseAddr("8.8.8.8"), ServicePort: 5, UID: -1, Interface: "wg0"}, "on-wg"},
		{"domain suffix", Query{Protocol: backend.TCP, Remote: netip.MustParseAddr("8.8.4.4"), ServicePort: 80, UID: -1, Domain: "x.y.ads.example"}, "dom"},
		{"domain apex", Query{Protocol: backend.TCP, Remote: netip.MustParseAddr("8.8.4.4"), ServicePort: 80, UID: -1, Domain: "ads.example"}, "dom"},
		{"domain exact", Query{Protocol: backend.TCP, Remote: netip.MustParseAddr("8.8.4.4"), ServicePort: 80, UID: -1, Domain: "exact.example"}, "dom"},
		{"domain exact no sub", Query{Protocol: backend.TCP, Remote: netip.MustParseAddr("8.8.4.4"), ServicePort: 80, UID: -1, Domain: "a.exact.example"}, "default:allow"},
		{"inbound rule", q(1, backend.TCP, "8.8.8.8", 22), "ssh-in"},
		{"inbound default", q(1, backend.TCP, "8.8.8.8", 80), "default:drop"},
		{"outbound ignores inbound rule", q(0, backend.TCP, "8.8.8.8", 22), "default:allow"},
		{"direction any out", q(0, backend.UDP, "192.0.2.7", 1), "any-dir"},
		{"direction any in", q(1, backend.UDP, "192.0.2.7", 1), "any-dir"},
		{"split", q(0, backend.TCP, "8.8.8.8", 443), "split-web"},
		{"split never loopback", q(0, backend.TCP, "127.0.0.1", 443), "default:allow"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := p.Decide(&tt.q)
			got := m.Name
			if m.Rule < 0 {
				got = "default:" + m.Action.String()
			}
			if got != tt.want {
				t.Errorf("Decide = %s, want %s", got, tt.want)
			}
			if lin := p.decideLinear(&tt.q); lin != m {
				t.Errorf("linear %+v != indexed %+v", lin, m)
			}
		})
	}
	if m := p.Decide(&Query{Direction: 0, Protocol: backend.TCP, Remote: netip.MustParseAddr("8.8.8.8"), ServicePort: 443, UID: -1}); m.Via != "eth1" || m.Action != config.Split {
		t.Errorf("split match %+v", m)
	}
}

// randomRuleSet builds a config with n random rules drawn from small value pools, so that rules overlap
// and queries hit them often.
func randomRuleSet(r *rand.Rand, n int) string {
	var b strings.Builder
	b.WriteString("default_action: allow\ninbound_default: block\nrules:\n")
	apps := []string{"/usr/bin/curl", "/usr/bin/wget", "/usr/bin/*", "/opt/**/bin/x", "/usr/lib/**", "/bin/?h"}
	prefixes := []string{"10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "10.1.2.3", "192.0.2.0/24", "0.0.0.0/0",
		"2001:db8::/32", "2001:db8:1::/48", "::/0", "2001:db8:1::1", "10.128.0.0/9", "172.16.0.0/12"}
	doms := []string{"a.example", "*.example", "*.b.example", "c.b.example"}
	for i := 0; i < n; i++ {
		fmt.Fprintf(&b, "  - name: r%d\n    action: %s\n", i, []string{"allow", "block", "drop"}[r.IntN(3)])
		if r.IntN(4) == 0 {
			fmt.Fprintf(&b, "    direction: %s\n", []string{"inbound", "any", "outbound"}[r.IntN(3)])
		}
		proto := ""
		if r.IntN(3) == 0 {
			proto = []string{"tcp", "udp", "icmp", "any"}[r.IntN(4)]
			fmt.Fprintf(&b, "    protocol: %s\n", proto)
		}
		if r.IntN(3) == 0 {
			fmt.Fprintf(&b, "    app: %q\n", apps[r.IntN(len(apps))])
		}
		if r.IntN(5) == 0 {
			fmt.Fprintf(&b, "    user: %q\n", fmt.Sprint(r.IntN(3)))
		}
		if r.IntN(2) == 0 {
			var rem []string
			for k := r.IntN(3) + 1; k > 0; k-- {
				if r.IntN(4) == 0 {
					rem = append(rem, fmt.Sprintf("%q", doms[r.IntN(len(doms))]))
				} else {
					rem = append(rem, fmt.Sprintf("%q", prefixes[r.IntN(len(prefixes))]))
				}
			}
			if r.IntN(10) == 0 { // a long list, to exercise the range sets
				for k := 0; k < 12; k++ {
					rem = append(rem, fmt.Sprintf("\"10.9.%d.0/24\"", r.IntN(8)))
				}
			}
			fmt.Fprintf(&b, "    remote: [%s]\n", strings.Join(rem, ", "))
		}
		if proto != "icmp" && r.IntN(2) == 0 {
			var ps []string
			for k := r.IntN(2) + 1; k > 0; k-- {
				lo := 20 + r.IntN(10)
				if r.IntN(3) == 0 {
					ps = append(ps, fmt.Sprintf("\"%d-%d\"", lo, lo+r.IntN(8)))
				} else if r.IntN(10) == 0 {
					ps = append(ps, "\"1-65535\"")
				} else {
					ps = append(ps, fmt.Sprint(lo))
				}
			}
			fmt.Fprintf(&b, "    ports: [%s]\n", strings.Join(ps, ", "))
		}
		if r.IntN(8) == 0 {
			fmt.Fprintf(&b, "    interface: %s\n", []string{"eth0", "wg0"}[r.IntN(2)])
		}
	}
	return b.String()
}

func randomQuery(r *rand.Rand) Query {
	addrs := []string{"10.1.2.3", "10.1.2.4", "10.1.9.9", "10.200.0.1", "192.0.2.1", "8.8.8.8", "172.20.0.1",
		"10.9.3.1", "2001:db8:1::1", "2001:db8:1::2", "2001:db8:2::1", "2002::1", "127.0.0.1", "10.128.0.5"}
	apps := []string{"", "/usr/bin/curl", "/usr/bin/wget", "/usr/bin/ls", "/opt/a/b/bin/x", "/usr/lib/x/y", "/bin/sh", "/bin/zsh"}
	doms := []string{"", "a.example", "example", "x.b.example", "c.b.example", "other.test"}
	return Query{
		Direction:   backend.Direction(r.IntN(2)),
		Protocol:    []backend.Protocol{backend.TCP, backend.UDP, backend.ICMP, backend.ICMPv6}[r.IntN(4)],
		Remote:      netip.MustParseAddr(addrs[r.IntN(len(addrs))]),
		ServicePort: uint16(18 + r.IntN(22)),
		App:         apps[r.IntN(len(apps))],
		UID:         int32(r.IntN(4)) - 1,
		Interface:   []string{"", "eth0", "wg0"}[r.IntN(3)],
		Domain:      doms[r.IntN(len(doms))],
	}
}

// TestPolicyAgainstLinear checks the indexed policy against the first-match loop on random rule sets.
func TestPolicyAgainstLinear(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	sets := 3000
	if testing.Short() {
		sets = 300
	}
	for s := 0; s < sets; s++ {
		n := 1 + r.IntN(40)
		yaml := randomRuleSet(r, n)
		p := mustPolicy(t, yaml)
		for k := 0; k < 50; k++ {
			qu := randomQuery(r)
			got, want := p.Decide(&qu), p.decideLinear(&qu)
			if got != want {
				t.Fatalf("set %d query %+v: indexed %+v, linear %+v\nrules:\n%s", s, qu, got, want, yaml)
			}
		}
	}
}

func TestPrefixTreeNesting(t *testing.T) {
	entries := map[netip.Prefix][]int32{
		netip.MustParsePrefix("10.0.0.0/8"):    {0},
		netip.MustParsePrefix("10.0.0.0/16"):   {1},
		netip.MustParsePrefix("10.1.0.0/16"):   {2},
		netip.MustParsePrefix("10.1.2.0/24"):   {3},
		netip.MustParsePrefix("0.0.0.0/0"):     {4},
		netip.MustParsePrefix("255.0.0.0/8"):   {5},
		netip.MustParsePrefix("10.255.0.0/16"): {6},
	}
	tr := buildPrefixTree(entries)
	chain := func(a string) []int32 {
		var out []int32
		for n := tr.lookup(addrKey(netip.MustParseAddr(a))); n >= 0; n = tr.nodes[n].parent {
			out = append(out, tr.nodes[n].rules...)
		}
		return out
	}
	tests := map[string][]int32{
		"10.0.5.5":        {1, 0, 4},
		"10.1.2.200":      {3, 2, 0, 4},
		"10.1.3.1":        {2, 0, 4},
		"10.2.0.0":        {0, 4},
		"10.255.255.255":  {6, 0, 4},
		"11.0.0.0":        {4},
		"9.255.255.255":   {4},
		"255.255.255.255": {5, 4},
		"0.0.0.0":         {4},
	}
	for a, want := range tests {
		if got := chain(a); fmt.Sprint(got) != fmt.Sprint(want) {
			t.Errorf("%s: chain %v, want %v", a, got, want)
		}
	}
}

// realisticRules builds n rules of a realistic mix: per-application rules, destination block lists
// (hosts and networks) and port block lists, plus a few broad rules.
func realisticRules(n int) string {
	r := rand.New(rand.NewPCG(7, 7))
	var b strings.Builder
	b.WriteString("default_action: allow\nrules:\n")
	for i := 0; i < n; i++ {
		switch k := i % 10; {
		case k < 3:
			fmt.Fprintf(&b, "  - {name: app%d, action: block, app: /usr/lib/app%d/bin/app%d}\n", i, i, i)
		case k < 8:
			a := r.Uint32()
			if k == 7 {
				fmt.Fprintf(&b, "  - {name: net%d, action: drop, remote: [%d.%d.%d.0/24]}\n", i, a>>24, a>>16&255, a>>8&255)
			} else {
				fmt.Fprintf(&b, "  - {name: host%d, action: block, remote: [%d.%d.%d.%d]}\n", i, a>>24, a>>16&255, a>>8&255, a&255)
			}
		case k == 8:
			fmt.Fprintf(&b, "  - {name: port%d, action: block, protocol: tcp, ports: [%d]}\n", i, 1024+r.IntN(60000))
		default:
			fmt.Fprintf(&b, "  - {name: dom%d, action: block, remote: [\"*.d%d.example\"]}\n", i, i)
		}
	}
	return b.String()
}

func BenchmarkDecide(b *testing.B) {
	for _, n := range []int{10, 1000, 10000, 100000} {
		b.Run(fmt.Sprintf("rules=%d", n), func(b *testing.B) {
			p := mustPolicy(b, realisticRules(n))
			// Many distinct queries, so the benchmark pays the cache misses a large rule set causes.
			qs := make([]Query, 1<<14)
			r := rand.New(rand.NewPCG(3, 3))
			for i := range qs {
				a := r.Uint32()
				qs[i] = Query{Direction: backend.Outbound, Protocol: backend.TCP,
					Remote:      netip.AddrFrom4([4]byte{byte(a >> 24), byte(a >> 16), byte(a >> 8), byte(a)}),
					ServicePort: uint16(1024 + r.IntN(60000)), App: fmt.Sprintf("/usr/lib/app%d/bin/app%d", r.IntN(n), r.IntN(n)),
					UID: 1000, Domain: fmt.Sprintf("www.d%d.example", r.IntN(n))}
			}
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				p.Decide(&qs[i&(len(qs)-1)])
			}
		})
	}
}

// TestLargePolicyAgainstLinear exercises the structures that only large rule sets build (prefix buckets,
// hashed string indexes with filters) against the linear loop.
func TestLargePolicyAgainstLinear(t *testing.T) {
	r := rand.New(rand.NewPCG(5, 9))
	var b strings.Builder
	b.WriteString("rules:\n")
	addr4 := func() string {
		return fmt.Sprintf("10.%d.%d.%d", r.IntN(4), r.IntN(256), r.IntN(256))
	}
	addr6 := func() string { return fmt.Sprintf("2001:db8:%x::%x", r.IntN(4), r.IntN(4096)) }
	for i := 0; i < 4000; i++ {
		switch i % 6 {
		case 0:
			fmt.Fprintf(&b, "  - {name: h%d, action: block, remote: [%s]}\n", i, addr4())
		case 1:
			fmt.Fprintf(&b, "  - {name: n%d, action: drop, remote: [\"10.%d.%d.0/%d\"]}\n", i, r.IntN(4), r.IntN(256), 20+r.IntN(5))
		case 2:
			fmt.Fprintf(&b, "  - {name: v%d, action: block, remote: [\"%s\", \"2001:db8:%x::/%d\"]}\n", i, addr6(), r.IntN(4), 40+r.IntN(40))
		case 3:
			fmt.Fprintf(&b, "  - {name: a%d, action: block, app: /opt/a%d/bin/x}\n", i, r.IntN(3000))
		case 4:
			fmt.Fprintf(&b, "  - {name: d%d, action: block, remote: [\"*.s%d.test\", e%d.test]}\n", i, r.IntN(3000), r.IntN(3000))
		default:
			fmt.Fprintf(&b, "  - {name: p%d, action: drop, protocol: udp, ports: [%d]}\n", i, 1+r.IntN(3000))
		}
	}
	p := mustPolicy(t, b.String())
	if p.dirs[0].ipTree[0].bucket == nil || p.dirs[0].ipTree[1].bucket == nil || p.dirs[0].portDirect == nil {
		t.Fatal("test rule set too small to build prefix buckets")
	}
	for k := 0; k < 20000; k++ {
		qu := Query{Protocol: backend.UDP, ServicePort: uint16(1 + r.IntN(3000)), UID: -1,
			App: fmt.Sprintf("/opt/a%d/bin/x", r.IntN(3000)), Domain: fmt.Sprintf("w.s%d.test", r.IntN(3000))}
		if r.IntN(2) == 0 {
			qu.Remote = netip.MustParseAddr(addr4())
			qu.Domain = fmt.Sprintf("e%d.test", r.IntN(3000))
		} else {
			qu.Remote = netip.MustParseAddr(addr6())
		}
		if r.IntN(3) == 0 {
			qu.Protocol = backend.TCP
		}
		if got, want := p.Decide(&qu), p.decideLinear(&qu); got != want {
			t.Fatalf("query %+v: indexed %+v, linear %+v", qu, got, want)
		}
	}
}

// HasSplit tells the daemon whether routed split connections need the backend's source NAT.
func TestPolicyHasSplit(t *testing.T) {
	if mustPolicy(t, "rules:\n  - {name: web, action: block, ports: [80]}\n").HasSplit {
		t.Error("HasSplit without a split rule")
	}
	if !mustPolicy(t, "rules:\n  - {name: web, action: block, ports: [80]}\n  - {name: s, action: split, ports: [8080], via: eth1}\n").HasSplit {
		t.Error("no HasSplit with a split rule")
	}
}
