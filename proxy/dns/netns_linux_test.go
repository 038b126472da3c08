package dns

import (
	"context"
	"os"
	"strings"
	"testing"
	"time"

	mdns "github.com/miekg/dns"

	"github.com/warden-fw/warden/backend/netnstest"
	"github.com/warden-fw/warden/backend/nfqueue/marks"
)

const netnsChildEnv = "WARDEN_DNS_NETNS_CHILD"

// TestNetnsReroute runs the nameserver on its real addresses (127.0.0.17:53, [::1]:53) in a fresh network
// namespace whose own nat table reroutes port-53 traffic to it the way Warden's rules do (DNAT for UDP and
// TCP, mark 1709 exempt). An application asking the "real" resolver directly is answered by us: blocked
// names get NXDOMAIN, the rest reach the real resolver through our marked upstream socket without looping.
func TestNetnsReroute(t *testing.T) {
	netnstest.RequireRoot(t, "ip", "iptables")
	ns := "wdns-" + netnstest.Suffix()
	netnstest.NewNS(t, ns)
	// The namespace's own nat table, never the host's.
	nat := []string{"ip", "netns", "exec", ns, "iptables", "-w", "-t", "nat", "-A", "OUTPUT"}
	netnstest.Run(t, append(nat, "-m", "mark", "--mark", "1709", "-j", "RETURN")...)
	netnstest.Run(t, append(nat, "-d", "127.0.0.17", "-j", "RETURN")...)
	for _, p := range []string{"udp", "tcp"} {
		netnstest.Run(t, append(nat, "-p", p, "--dport", "53", "-j", "DNAT", "--to-destination", "127.0.0.17:53")...)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := netnstest.Child(ctx, t, ns, netnsChildEnv+"=1", "-test.run=^TestNetnsChild$", "-test.v", "-test.count=1")
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "--- PASS: TestNetnsChild") {
		t.Fatalf("child in namespace %s: %v\n%s", ns, err, out)
	}
	t.Logf("child output:\n%s", out)
}

// TestNetnsChild is TestNetnsReroute's part inside the namespace (a separate process, so every thread is in
// the namespace). It does nothing unless started by TestNetnsReroute.
func TestNetnsChild(t *testing.T) {
	if os.Getenv(netnsChildEnv) == "" {
		t.Skip("run by TestNetnsReroute inside a network namespace")
	}
	// The "real" resolver the application is configured with, on 127.0.0.1:53.
	up := &testUpstream{t: t, records: defaultZone(t), nxTTL: 60, truncUDP: map[string]bool{}}
	pc, ln, err := listenPair(context.Background(), mustAddrPort(t, "127.0.0.1:53"))
	if err != nil {
		t.Fatal(err)
	}
	startMDNS(t, &mdns.Server{PacketConn: pc, Handler: mdns.HandlerFunc(up.serve)})
	startMDNS(t, &mdns.Server{Listener: ln, Handler: mdns.HandlerFunc(up.serve)})

	s, err := New(Config{Upstreams: []string{"127.0.0.1:53"}, Timeout: time.Second, Control: marks.ControlOwnSocket},
		blockAds, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	t.Logf("listening on %v", s.Addrs())

	for _, netw := range []string{"udp", "tcp"} {
		// The application asks 127.0.0.1:53 directly; the DNAT sends it to us.
		r := ask(t, "127.0.0.1:53", netw, "ads.doubleclick.net.", mdns.TypeA, false)
		if r.Rcode != mdns.RcodeNameError {
			t.Errorf("%s: blocked name: rcode %s, want NXDOMAIN (not rerouted?)", netw, mdns.RcodeToString[r.Rcode])
		}
		r = ask(t, "127.0.0.1:53", netw, "example.com.", mdns.TypeA, false)
		if r.Rcode != mdns.RcodeSuccess || len(r.Answer) != 1 {
			t.Errorf("%s: allowed name: %v", netw, r)
		}
	}
	// Also on the [::1] listener when IPv6 is there (no DNAT needed: asked directly).
	for _, a := range s.Addrs() {
		if a.Addr().Is6() {
			if r := ask(t, a.String(), "udp", "example.com.", mdns.TypeAAAA, false); len(r.Answer) != 1 {
				t.Errorf("[::1]: %v", r)
			}
		}
	}
	st := s.Stats()
	if st.Blocked != 2 || st.ServFails != 0 || up.count("ads.doubleclick.net.", mdns.TypeA) != 0 {
		t.Errorf("stats %+v, blocked name reached the resolver %d times", st, up.count("ads.doubleclick.net.", mdns.TypeA))
	}
	if n := up.count("example.com.", mdns.TypeA); n != 1 {
		t.Errorf("the resolver was asked %d times for example.com (want 1: then cached, no loop)", n)
	}
}
