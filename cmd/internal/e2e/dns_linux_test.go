package e2e

import (
	"encoding/json"
	"fmt"
	"maps"
	"net/netip"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/warden-fw/warden/cmd/internal/control"
	"github.com/warden-fw/warden/cmd/internal/sandbox"
	"github.com/warden-fw/warden/proxy/dns"
)

// The DNS world of TestNameserver. The real nameserver runs in server namespace A on A's gateway addresses,
// which the daemon is configured with as its upstream. The addresses an application believes are resolvers
// are elsewhere: the service addresses, where a fake nameserver answers every name with a different address
// (on A and on B), and an address where nothing answers at all.
var (
	realDNS4 = netip.AddrPortFrom(sandbox.GatewayA4, 53)
	realDNS6 = netip.AddrPortFrom(sandbox.GatewayA6, 53)
	fakeDNS4 = netip.AddrPortFrom(sandbox.ServiceV4, 53)
	fakeDNS6 = netip.AddrPortFrom(sandbox.ServiceV6, 53)
	noDNS4   = netip.MustParseAddrPort("192.0.2.99:53")
	noDNS6   = netip.MustParseAddrPort("[2001:db8:5::99]:53")

	// Extra service addresses, so every name of the zone has addresses of its own (DomainOf answers with the
	// name an address was answered for last).
	serviceV4C = netip.MustParseAddr("192.0.2.12")
	serviceV6C = netip.MustParseAddr("2001:db8:5::12")
	serviceV4D = netip.MustParseAddr("192.0.2.13")
	serviceV6D = netip.MustParseAddr("2001:db8:5::13")
	fakeV4     = netip.MustParseAddr("192.0.2.66")
	fakeV6     = netip.MustParseAddr("2001:db8:5::66")
)

// realZone is what the real nameserver answers. ads.example.com has an address, so a blocked answer cannot
// come from the upstream; cloak.example.com hides it behind a CNAME.
func realZone() []sandbox.DNSRecord {
	rec := func(name, typ string, v any, ttl uint32) sandbox.DNSRecord {
		return sandbox.DNSRecord{Name: name, Type: typ, Value: fmt.Sprint(v), TTL: ttl}
	}
	return []sandbox.DNSRecord{
		rec("a.example.net", "A", sandbox.ServiceV4, 300), rec("a.example.net", "AAAA", sandbox.ServiceV6, 300),
		rec("example.net", "A", serviceV4C, 300), rec("example.net", "AAAA", serviceV6C, 300),
		rec("b.example.org", "A", sandbox.ServiceV4Alt, 300), rec("b.example.org", "AAAA", sandbox.ServiceV6Alt, 300),
		rec("c.example.com", "A", serviceV4D, 300), rec("c.example.com", "AAAA", serviceV6D, 300),
		rec("ads.example.com", "A", "192.0.2.14", 300),
		rec("cloak.example.com", "CNAME", "ads.example.com", 300),
		rec("ttl.example.com", "A", "192.0.2.15", 1),
	}
}

// fakeZone answers every name of the real zone with an address no server owns.
func fakeZone() []sandbox.DNSRecord {
	var out []sandbox.DNSRecord
	seen := map[string]bool{}
	for _, r := range realZone() {
		if seen[r.Name] {
			continue
		}
		seen[r.Name] = true
		out = append(out, sandbox.DNSRecord{Name: r.Name, Type: "A", Value: fakeV4.String(), TTL: 300},
			sandbox.DNSRecord{Name: r.Name, Type: "AAAA", Value: fakeV6.String(), TTL: 300})
	}
	return out
}

// dnsConfig: a domain-only block rule (answered at DNS level), a domain rule restricted to TCP port 80 (so DNS
// still answers and the connection itself is matched), a rule blocking UDP DNS to one address, and a split
// rule by domain.
const dnsConfig = `
rules:
  - name: no-ads
    action: block
    remote: [ads.example.com]
  - name: example-net-web
    action: block
    remote: ["*.example.net"]
    protocol: tcp
    ports: [80]
  - name: no-udp-dns-to-11
    action: block
    protocol: udp
    remote: [192.0.2.11]
    ports: [53]
  - name: example-org-via-b
    action: split
    remote: ["*.example.org"]
    via: ub
split_tunnel:
  interface: ub
nameserver:
  upstreams: ["%UPSTREAM%"]
  timeout: 500ms
log:
  level: debug
`

// nameserverStatus returns status.nameserver.
func nameserverStatus(t *testing.T, st control.Status) dns.Stats {
	t.Helper()
	if st.Nameserver == nil {
		t.Fatal("status has no nameserver section")
	}
	return *st.Nameserver
}

// domainConn is the part of `warden conns --json` the DNS tests read.
type domainConn struct {
	Protocol string `json:"protocol"`
	Local    string `json:"local"`
	Remote   string `json:"remote"`
	Domain   string `json:"domain"`
	Verdict  string `json:"verdict"`
	Rule     string `json:"rule"`
}

// dnsEnv is TestNameserver's world on top of env: the DNS servers and a tally of what the client asked, to
// compare with the daemon's counters.
type dnsEnv struct {
	*env
	n *dnsTally
}

type dnsTally struct {
	flows   int // client DNS flows (each query is its own socket, so its own connection)
	answers int // queries Warden's nameserver answered
	blocked int // of those, answered with the block response
}

// sub returns e bound to subtest t, so that its helpers fail the subtest that calls them.
func (e *dnsEnv) sub(t *testing.T) *dnsEnv {
	env := *e.env
	env.t = t
	return &dnsEnv{env: &env, n: e.n}
}

// newDNSEnv builds the sandbox, the extra service addresses and the DNS servers, and starts the daemon with
// config (%UPSTREAM% replaced by upstream, one of the real nameserver's addresses). With symlinked set, the config path is a
// symlink (useSymlinkedConfig), so only an explicit reload picks up changes; the returned path is then the file
// to write.
func newDNSEnv(t *testing.T, config, upstream string, symlinked bool) (*dnsEnv, string) {
	t.Helper()
	e := &dnsEnv{env: newEnv(t), n: &dnsTally{}}
	for _, ns := range []string{e.top.A, e.top.B} {
		for _, a := range []string{serviceV4C.String() + "/32", serviceV4D.String() + "/32", serviceV6C.String() + "/128", serviceV6D.String() + "/128"} {
			if out, err := exec.Command("ip", "-n", ns, "addr", "add", a, "dev", "lo").CombinedOutput(); err != nil {
				t.Fatalf("ip -n %s addr add %s: %v\n%s", ns, a, err, out)
			}
		}
	}
	extra := []string{serviceV4C.String(), serviceV6C.String(), serviceV4D.String(), serviceV6D.String()}
	for name, ag := range map[string]*sandbox.Agent{"A": e.a, "B": e.b} {
		call(t, ag, sandbox.Request{Op: "serve", Name: name, Addrs: extra, TCP: []uint16{80, 81}, UDP: []uint16{4000}})
		call(t, ag, sandbox.Request{Op: "dns-serve", Name: "fake", Addrs: []string{fakeDNS4.Addr().String(), fakeDNS6.Addr().String()},
			UDP: []uint16{53}, TCP: []uint16{53}, Records: fakeZone()})
	}
	call(t, e.a, sandbox.Request{Op: "dns-serve", Name: "real", Addrs: []string{realDNS4.Addr().String(), realDNS6.Addr().String()},
		UDP: []uint16{53}, TCP: []uint16{53}, Records: realZone()})
	config = strings.ReplaceAll(config, "%UPSTREAM%", upstream)
	target := e.cfg
	if symlinked {
		target = e.useSymlinkedConfig(config)
	} else {
		e.writeConfig(config)
	}
	e.startDaemon()
	return e, target
}

// ask has the client agent (an application in the client namespace) ask resolver for name over network.
func (e *dnsEnv) ask(network string, resolver netip.AddrPort, name, qtype string) sandbox.Response {
	e.t.Helper()
	r := call(e.t, e.client, sandbox.Request{Op: "dns", Net: network, Dst: resolver.String(), QName: name, QType: qtype, TimeoutMS: 5000})
	e.n.flows++
	if r.Outcome == sandbox.Connected {
		e.n.answers++
	}
	return r
}

// resolve asks and fails the test unless the answer is NOERROR with exactly want (the real zone's addresses).
func (e *dnsEnv) resolve(network string, resolver netip.AddrPort, name, qtype string, want ...netip.Addr) []netip.Addr {
	e.t.Helper()
	r := e.ask(network, resolver, name, qtype)
	got := r.Addrs()
	if r.Outcome != sandbox.Connected || r.Rcode != "NOERROR" || !slices.Equal(got, want) {
		e.t.Errorf("%s %s %s asking %s: outcome %s (%s), rcode %s, addresses %v; want NOERROR %v", network, qtype, name,
			resolver, r.Outcome, r.Detail, r.Rcode, got, want)
	}
	return got
}

// expectBlocked asks and fails the test unless Warden answered with its block response (NXDOMAIN).
func (e *dnsEnv) expectBlocked(network string, resolver netip.AddrPort, name, qtype string) {
	e.t.Helper()
	r := e.ask(network, resolver, name, qtype)
	if r.Outcome != sandbox.Connected || r.Rcode != "NXDOMAIN" || len(r.Answers) != 0 {
		e.t.Errorf("%s %s %s asking %s: outcome %s (%s), rcode %s, answers %v; want the block response NXDOMAIN",
			network, qtype, name, resolver, r.Outcome, r.Detail, r.Rcode, r.Answers)
	}
	e.n.blocked++
}

// dnsCount returns the questions the named DNS server in agent ag was asked.
func dnsCount(t *testing.T, ag *sandbox.Agent, server string) map[string]int {
	t.Helper()
	return call(t, ag, sandbox.Request{Op: "dns-count", Name: server}).DNSQueries
}

func (e *dnsEnv) domainConns() []domainConn {
	e.t.Helper()
	var cs []domainConn
	if err := json.Unmarshal([]byte(e.cli("conns", "--json")), &cs); err != nil {
		e.t.Fatal(err)
	}
	return cs
}

// TestNameserver runs Warden with its nameserver and domain rules in the sandbox, against a real DNS server
// in namespace A:
//   - an application's DNS to any resolver address, over UDP and TCP, IPv4 and IPv6, is answered by Warden
//     (the fake servers on those addresses are never asked; where no server listens, the answer still comes):
//     a blocked name (also behind a CNAME) gets NXDOMAIN and never reaches the upstream, others the real
//     answer; an application asking over TCP makes Warden ask the upstream over TCP;
//   - a rule on *.example.net restricted to TCP port 80 blocks connections to the addresses the allowed
//     queries for a.example.net and example.net returned, on port 80 only, and not other names' addresses;
//   - a split rule by domain sends that name's connections (TCP and UDP) through B, others through A;
//   - a rule that blocks an application's DNS to some address takes precedence over the reroute;
//   - an answer with TTL 1 s is served from the cache until it expires, and the next query after expiry
//     reaches the upstream again;
//   - `warden conns` shows the domain next to the remote address; the status counters match what was asked;
//     the nameserver's own upstream traffic never reaches the queue;
//   - a dead upstream (silently dropping) gives SERVFAIL within about the configured 500 ms, over UDP and TCP,
//     not a hang until the client's 5 s timeout.
func TestNameserver(t *testing.T) {
	t.Parallel()
	e, _ := newDNSEnv(t, dnsConfig, realDNS4.String(), false)
	st0 := nameserverStatus(t, e.status())
	if st0.Queries != 0 || !slices.Equal(st0.Upstreams, []string{realDNS4.String()}) {
		t.Errorf("nameserver status at start: %+v; want no queries, upstream %s", st0, realDNS4)
	}

	resolvers4 := []netip.AddrPort{fakeDNS4, noDNS4}
	resolvers6 := []netip.AddrPort{fakeDNS6, noDNS6}
	t.Run("rerouted", func(t *testing.T) {
		e := e.sub(t)
		for _, network := range []string{"udp", "tcp"} {
			for _, res := range resolvers4 {
				e.resolve(network, res, "a.example.net", "A", sandbox.ServiceV4)
				e.expectBlocked(network, res, "ads.example.com", "A")
				e.expectBlocked(network, res, "cloak.example.com", "A")
			}
			for _, res := range resolvers6 {
				e.resolve(network, res, "a.example.net", "AAAA", sandbox.ServiceV6)
				e.expectBlocked(network, res, "ads.example.com", "AAAA")
			}
		}
		// A name first asked over TCP is forwarded over TCP.
		e.resolve("tcp", fakeDNS4, "b.example.org", "A", sandbox.ServiceV4Alt)
		e.resolve("tcp", noDNS6, "b.example.org", "AAAA", sandbox.ServiceV6Alt)

		for name, ag := range map[string]*sandbox.Agent{"A": e.a, "B": e.b} {
			if n := dnsCount(t, ag, "fake"); len(n) != 0 {
				t.Errorf("the resolver the application chose (fake, on %s) was asked directly: %v", name, n)
			}
		}
		// Each name once (then cached); the blocked name never; the CNAME once (its answer is blocked).
		want := map[string]int{
			sandbox.DNSQueryKey("udp", "a.example.net", "A"):     1,
			sandbox.DNSQueryKey("udp", "a.example.net", "AAAA"):  1,
			sandbox.DNSQueryKey("udp", "cloak.example.com", "A"): 1,
			sandbox.DNSQueryKey("tcp", "b.example.org", "A"):     1,
			sandbox.DNSQueryKey("tcp", "b.example.org", "AAAA"):  1,
		}
		if got := dnsCount(t, e.a, "real"); !maps.Equal(got, want) {
			t.Errorf("the real nameserver was asked %v; want %v", got, want)
		}
	})

	t.Run("a rule blocking DNS wins over the reroute", func(t *testing.T) {
		e := e.sub(t)
		blockedDNS := netip.AddrPortFrom(sandbox.ServiceV4Alt, 53)
		r := call(t, e.client, sandbox.Request{Op: "dns", Dst: blockedDNS.String(), QName: "c.example.com", TimeoutMS: 3000})
		if r.Outcome != sandbox.Refused {
			t.Errorf("udp DNS to %s (rule no-udp-dns-to-11): outcome %s (%s), rcode %q; want refused by the rule", blockedDNS, r.Outcome, r.Detail, r.Rcode)
		}
		// Over TCP the rule does not apply: rerouted and answered.
		e.resolve("tcp", blockedDNS, "c.example.com", "A", serviceV4D)
	})

	t.Run("connection rule by domain", func(t *testing.T) {
		e := e.sub(t)
		netV4 := e.resolve("udp", noDNS4, "example.net", "A", serviceV4C)
		netV6 := e.resolve("udp", noDNS4, "example.net", "AAAA", serviceV6C)
		aV4 := e.resolve("udp", fakeDNS4, "a.example.net", "A", sandbox.ServiceV4)
		aV6 := e.resolve("udp", fakeDNS4, "a.example.net", "AAAA", sandbox.ServiceV6)
		cV4 := e.resolve("udp", fakeDNS4, "c.example.com", "A", serviceV4D)
		cV6 := e.resolve("udp", fakeDNS6, "c.example.com", "AAAA", serviceV6D)
		for _, ip := range slices.Concat(aV4, aV6, netV4, netV6) {
			r := call(t, e.client, tcpReq(hp(ip, 80)))
			expectOutcome(t, "tcp to "+hp(ip, 80)+" (*.example.net, port 80)", r, sandbox.Refused)
			expectServer(t, "tcp to "+hp(ip, 81)+" (*.example.net, another port)", call(t, e.client, tcpReq(hp(ip, 81))), "A")
		}
		for _, ip := range slices.Concat(cV4, cV6) {
			expectServer(t, "tcp to "+hp(ip, 80)+" (c.example.com)", call(t, e.client, tcpReq(hp(ip, 80))), "A")
		}
		for _, c := range e.domainConns() {
			if c.Remote == hp(sandbox.ServiceV4, 80) && c.Rule == "example-net-web" && c.Domain == "a.example.net" {
				return
			}
		}
		t.Errorf("conns has no connection to %s decided by example-net-web with domain a.example.net", hp(sandbox.ServiceV4, 80))
	})

	t.Run("split by domain", func(t *testing.T) {
		e := e.sub(t)
		orgV4 := e.resolve("udp", fakeDNS4, "b.example.org", "A", sandbox.ServiceV4Alt)
		orgV6 := e.resolve("tcp", fakeDNS6, "b.example.org", "AAAA", sandbox.ServiceV6Alt)
		for _, ip := range slices.Concat(orgV4, orgV6) {
			expectServer(t, "tcp to "+hp(ip, 80)+" (b.example.org, split)", call(t, e.client, tcpReq(hp(ip, 80))), "B")
			expectServer(t, "udp to "+hp(ip, 4000)+" (b.example.org, split)", call(t, e.client, udpReq(hp(ip, 4000))), "B")
		}
		for _, ip := range []netip.Addr{serviceV4D, serviceV6D} { // c.example.com
			expectServer(t, "tcp to "+hp(ip, 81)+" (c.example.com)", call(t, e.client, tcpReq(hp(ip, 81))), "A")
			expectServer(t, "udp to "+hp(ip, 4000)+" (c.example.com)", call(t, e.client, udpReq(hp(ip, 4000))), "A")
		}
	})

	t.Run("ttl", func(t *testing.T) {
		e := e.sub(t)
		key := sandbox.DNSQueryKey("udp", "ttl.example.com", "A")
		ttlIP := netip.MustParseAddr("192.0.2.15")
		start := time.Now()
		e.resolve("udp", fakeDNS4, "ttl.example.com", "A", ttlIP)
		if n := dnsCount(t, e.a, "real")[key]; n != 1 {
			t.Fatalf("the real nameserver was asked %d times for ttl.example.com, want 1", n)
		}
		// Within the TTL the cache answers; once it ran out, the next query goes upstream. Polled every
		// 100 ms: no event tells when a TTL has run out.
		deadline := start.Add(5 * time.Second)
		for {
			r := e.ask("udp", fakeDNS4, "ttl.example.com", "A")
			if len(r.Answers) != 1 || r.Answers[0].TTL > 1 || r.Rcode != "NOERROR" {
				t.Fatalf("ttl.example.com: %+v; want one answer with TTL ≤ 1", r)
			}
			n := dnsCount(t, e.a, "real")[key]
			if n == 2 {
				if el := time.Since(start); el < time.Second || el > 3*time.Second {
					t.Errorf("the TTL-1 answer was asked for again after %v; want after 1 s and soon after", el)
				}
				break
			}
			if n != 1 {
				t.Fatalf("the real nameserver was asked %d times for ttl.example.com", n)
			}
			if time.Now().After(deadline) {
				t.Fatal("a TTL-1 answer was still served from the cache after 5 s")
			}
			time.Sleep(100 * time.Millisecond)
		}
	})

	t.Run("conns and status", func(t *testing.T) {
		e := e.sub(t)
		h := call(t, e.client, sandbox.Request{Op: "hold", Dst: hp(serviceV4D, 80), TimeoutMS: 3000})
		expectServer(t, "held tcp to c.example.com", h, "A")
		found := false
		var dnsFlows int
		for _, c := range e.domainConns() {
			if c.Remote == hp(serviceV4D, 80) && c.Local == h.Local {
				found = true
				if c.Domain != "c.example.com" || c.Verdict != "accept-permanent" {
					t.Errorf("held connection in conns: %+v; want domain c.example.com, accept-permanent", c)
				}
			}
			if strings.HasSuffix(c.Remote, ":53") && c.Rule == "nameserver" && c.Verdict == "reroute-nameserver-permanent" {
				dnsFlows++
			}
		}
		if !found {
			t.Errorf("conns has no connection %s → %s", h.Local, hp(serviceV4D, 80))
		}
		if dnsFlows == 0 {
			t.Error("conns shows no rerouted DNS flow (rule nameserver, reroute-nameserver-permanent)")
		}
		if out := e.cli("conns"); !strings.Contains(out, hp(serviceV4D, 80)+" (c.example.com)") {
			t.Errorf("warden conns does not show the domain next to the remote address:\n%s", out)
		}
		call(t, e.client, sandbox.Request{Op: "close", ID: h.ID})

		st := e.status()
		ns := nameserverStatus(t, st)
		if ns.Queries != uint64(e.n.answers) || ns.Blocked != uint64(e.n.blocked) || ns.ServFails != 0 || ns.UpstreamFailures != 0 {
			t.Errorf("nameserver counters %+v; want queries %d, blocked %d, no failures", ns, e.n.answers, e.n.blocked)
		}
		total := 0
		for _, n := range dnsCount(t, e.a, "real") {
			total += n
		}
		if ns.CacheHits == 0 || ns.UpstreamQueries != uint64(total) || ns.CacheMisses != uint64(total) {
			t.Errorf("nameserver counters %+v; want cache hits, and upstream queries = cache misses = %d (what the real nameserver was asked)", ns, total)
		}
		if got := st.Pipeline.Verdicts["reroute-nameserver"]; got != uint64(e.n.flows) {
			t.Errorf("pipeline reroute-nameserver verdicts = %d, want one per DNS flow the client made = %d", got, e.n.flows)
		}
		if n := st.Pipeline.Verdicts["accept-final"]; n != 0 {
			t.Errorf("%d own (accept-final) decisions: the nameserver's upstream traffic reached the queue", n)
		}
		if st.Pipeline.Failures != 0 || st.Pipeline.LateDecisions != 0 {
			t.Errorf("pipeline failures %d, late decisions %d", st.Pipeline.Failures, st.Pipeline.LateDecisions)
		}
	})

	t.Run("dead upstream", func(t *testing.T) {
		e := e.sub(t)
		// The upstream's host stops answering: its namespace drops DNS silently (no reset, no ICMP).
		for _, tool := range []string{"iptables", "ip6tables"} {
			for _, p := range []string{"udp", "tcp"} {
				args := []string{"netns", "exec", e.top.A, tool, "-w", "-I", "INPUT", "-p", p, "--dport", "53", "-j", "DROP"}
				if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
					t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
				}
			}
		}
		before := nameserverStatus(t, e.status())
		for _, c := range []struct {
			network  string
			resolver netip.AddrPort
		}{{"udp", fakeDNS4}, {"tcp", noDNS6}} {
			r := e.ask(c.network, c.resolver, "c"+c.network+".uncached.example.com", "A")
			if r.Outcome != sandbox.Connected || r.Rcode != "SERVFAIL" || r.Elapsed > 2*time.Second {
				t.Errorf("%s query with the upstream dead: outcome %s (%s), rcode %s after %v; want SERVFAIL well within the client's 5 s",
					c.network, r.Outcome, r.Detail, r.Rcode, r.Elapsed)
			}
			t.Logf("%s: %s after %v", c.network, r.Rcode, r.Elapsed)
		}
		after := nameserverStatus(t, e.status())
		if after.ServFails-before.ServFails != 2 || after.UpstreamFailures-before.UpstreamFailures != 2 {
			t.Errorf("servfails %d → %d, upstream_failures %d → %d; want 2 more of each", before.ServFails, after.ServFails,
				before.UpstreamFailures, after.UpstreamFailures)
		}
		// Cached answers still work without the upstream.
		e.resolve("udp", fakeDNS4, "c.example.com", "A", serviceV4D)
	})
}

// noDomainConfig has no domain rule at all, so the pipeline has no reason to look up domains.
const noDomainConfig = `
rules:
  - name: no-telnet
    action: block
    protocol: tcp
    ports: [23]
nameserver:
  upstreams: ["%UPSTREAM%"]
`

// domainRules are added by the reload in TestNameserverReload.
const domainRules = `
  - name: no-ads
    action: block
    remote: [ads.example.com]
  - name: no-c-web
    action: block
    protocol: tcp
    remote: [c.example.com]
    ports: [80]
`

// TestNameserverReload: with no domain rule, `warden conns` still shows a connection's domain; a reload that
// adds domain rules to such a policy takes effect at once: the nameserver answers a newly blocked name with
// the block response although its answer is cached, and a live connection to an address an application looked
// up before the reload is cut when a new rule blocks its domain (only that one), like a new one; a reload that
// removes the rules lets both through again (the name from the cache).
func TestNameserverReload(t *testing.T) {
	t.Parallel()
	// The upstream over TCP only, on IPv6: the other path of the nameserver's own (marked) traffic.
	upstream := "tcp://" + realDNS6.String()
	e, target := newDNSEnv(t, noDomainConfig, upstream, true)
	cIP := e.resolve("udp", fakeDNS4, "c.example.com", "A", serviceV4D)
	e.resolve("udp", fakeDNS4, "ads.example.com", "A", netip.MustParseAddr("192.0.2.14"))
	if len(cIP) != 1 {
		t.FailNow()
	}
	dst := hp(cIP[0], 80)
	held := call(t, e.client, sandbox.Request{Op: "hold", Dst: dst})
	expectServer(t, "held connection to c.example.com before the reload", held, "A")
	untouched := call(t, e.client, sandbox.Request{Op: "hold", Dst: hp(cIP[0], 81)})
	expectServer(t, "held connection to c.example.com:81 before the reload", untouched, "A")
	// The domain is known even though no rule needs it yet.
	if out := e.cli("conns"); !strings.Contains(out, dst+" (c.example.com)") {
		t.Errorf("warden conns without domain rules does not show the domain of %s:\n%s", dst, out)
	}

	body := strings.ReplaceAll(noDomainConfig, "nameserver:", strings.TrimPrefix(domainRules, "\n")+"nameserver:")
	writeFile(t, target, e.configText(strings.ReplaceAll(body, "%UPSTREAM%", upstream)))
	if out := e.cli("reload"); !strings.Contains(out, "reloaded; 1 live connection(s) changed verdict") {
		t.Errorf("reload adding domain rules: %q; want exactly one live connection changed (the one to c.example.com:80)", out)
	}
	start := time.Now()
	r := call(t, e.client, sandbox.Request{Op: "ping", ID: held.ID, TimeoutMS: 1000})
	if r.Outcome == sandbox.Connected {
		t.Errorf("the live connection to %s (c.example.com) survived a reload blocking c.example.com port 80", dst)
	} else if time.Since(start) > time.Second {
		t.Errorf("the live connection to %s was cut only after %v", dst, time.Since(start))
	}
	expectOutcome(t, "the live connection to c.example.com:81", call(t, e.client, sandbox.Request{Op: "ping", ID: untouched.ID}), sandbox.Connected)
	expectOutcome(t, "a new connection to "+dst+" after the reload", call(t, e.client, tcpReq(dst)), sandbox.Refused)
	e.expectBlocked("udp", fakeDNS4, "ads.example.com", "A")
	e.expectBlocked("tcp", noDNS6, "ads.example.com", "A")

	writeFile(t, target, e.configText(strings.ReplaceAll(noDomainConfig, "%UPSTREAM%", upstream)))
	e.cli("reload")
	e.resolve("udp", fakeDNS4, "ads.example.com", "A", netip.MustParseAddr("192.0.2.14"))
	expectServer(t, "a new connection to "+dst+" after the rules went away", call(t, e.client, tcpReq(dst)), "A")
	want := map[string]int{sandbox.DNSQueryKey("tcp", "ads.example.com", "A"): 1, sandbox.DNSQueryKey("tcp", "c.example.com", "A"): 1}
	if got := dnsCount(t, e.a, "real"); !maps.Equal(got, want) {
		t.Errorf("the real nameserver was asked %v; want %v (each name once over TCP, then the cache answers)", got, want)
	}
	if st := e.status(); st.Pipeline.Verdicts["accept-final"] != 0 {
		t.Errorf("%d own (accept-final) decisions: the nameserver's upstream traffic reached the queue", st.Pipeline.Verdicts["accept-final"])
	}
}
