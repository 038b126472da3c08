package nfqueue

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/warden-fw/warden/backend"
	"github.com/warden-fw/warden/backend/netnstest"
	"github.com/warden-fw/warden/backend/nfqueue/marks"
	"golang.org/x/sys/unix"
)

// Ports of the test policy.
const (
	portAllow uint16 = 8001
	portBlock uint16 = 8002
	portDrop  uint16 = 8003
	portOnce  uint16 = 8004 // accepted packet by packet, not permanently
)

func verdictRules() []childRule {
	return []childRule{
		{Dir: "out", Port: portAllow, Verdict: "accept", Permanent: true},
		{Dir: "out", Port: portBlock, Verdict: "block", Permanent: true},
		{Dir: "out", Port: portDrop, Verdict: "drop", Permanent: true},
		{Dir: "out", Port: portOnce, Verdict: "accept"},
	}
}

// families runs f once for IPv4 and once for IPv6 addresses of the net.
func families(t *testing.T, n *testNet, f func(t *testing.T, server, server2 netip.Addr)) {
	t.Run("ipv4", func(t *testing.T) { f(t, n.ServerV4, n.Server2V4) })
	t.Run("ipv6", func(t *testing.T) { f(t, n.ServerV6, n.Server2V6) })
}

func TestKernelTCPVerdicts(t *testing.T) {
	t.Parallel()
	n := newTestNet(t)
	srv := map[uint16]*tcpServer{}
	for _, p := range []uint16{portAllow, portBlock, portDrop, portOnce} {
		srv[p] = listenTCP(t, n.server, p)
	}
	startWarden(t, n.client, childConfig{Rules: verdictRules()})
	families(t, n, func(t *testing.T, server, _ netip.Addr) {
		for _, p := range []uint16{portAllow, portOnce} {
			c, err := dial(t, n.client, net.Dialer{}, "tcp", netip.AddrPortFrom(server, p), 3*time.Second)
			if err != nil {
				t.Fatalf("allowed port %d: %v", p, err)
			}
			echo(t, c)
		}

		start := time.Now()
		_, err := dial(t, n.client, net.Dialer{}, "tcp", netip.AddrPortFrom(server, portBlock), 3*time.Second)
		if !isRefused(err) {
			t.Errorf("blocked port: got %v, want connection refused", err)
		}
		if d := time.Since(start); d > 500*time.Millisecond {
			t.Errorf("blocked connect took %v, want an immediate refusal", d)
		}

		_, err = dial(t, n.client, net.Dialer{}, "tcp", netip.AddrPortFrom(server, portDrop), 1500*time.Millisecond)
		if !isTimeout(err) {
			t.Errorf("dropped port: got %v, want a timeout", err)
		}
	})
	if a := srv[portBlock].accepted.Load() + srv[portDrop].accepted.Load(); a != 0 {
		t.Errorf("server accepted %d blocked/dropped connections", a)
	}
}

// echo checks a connection carries data both ways.
func echo(t *testing.T, c net.Conn) {
	t.Helper()
	_ = c.SetDeadline(time.Now().Add(3 * time.Second))
	if _, err := c.Write([]byte("hello")); err != nil {
		t.Fatalf("write: %v", err)
	}
	buf := make([]byte, 5)
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "hello" {
		t.Fatalf("echo: %q, %v", buf, err)
	}
}

func TestKernelUDPVerdicts(t *testing.T) {
	t.Parallel()
	n := newTestNet(t)
	srv := map[uint16]*udpServer{}
	for _, p := range []uint16{portAllow, portBlock, portDrop} {
		srv[p] = listenUDP(t, n.server, p, n.ServerV4, n.ServerV6)
	}
	startWarden(t, n.client, childConfig{Rules: verdictRules()})
	families(t, n, func(t *testing.T, server, _ netip.Addr) {
		if err := udpExchange(t, n.client, netip.AddrPortFrom(server, portAllow), 2*time.Second); err != nil {
			t.Errorf("allowed UDP: %v", err)
		}
		// Block: the sender hears about it (ICMP admin-prohibited) on its connected socket.
		start := time.Now()
		err := udpExchange(t, n.client, netip.AddrPortFrom(server, portBlock), 2*time.Second)
		if !isRefused(err) {
			t.Errorf("blocked UDP: got %v, want an ICMP error", err)
		}
		if d := time.Since(start); d > 500*time.Millisecond {
			t.Errorf("blocked UDP error took %v", d)
		}
		// Drop: silence.
		err = udpExchange(t, n.client, netip.AddrPortFrom(server, portDrop), time.Second)
		if !isTimeout(err) {
			t.Errorf("dropped UDP: got %v, want a timeout", err)
		}
	})
	if got := srv[portAllow].received.Load(); got != 2 {
		t.Errorf("allowed server received %d datagrams, want 2", got)
	}
	if got := srv[portBlock].received.Load() + srv[portDrop].received.Load(); got != 0 {
		t.Errorf("blocked/dropped servers received %d datagrams", got)
	}
}

func TestKernelICMP(t *testing.T) {
	t.Parallel()
	n := newTestNet(t)
	startWarden(t, n.client, childConfig{Rules: []childRule{
		{Proto: "icmp", Remote: n.Server2V4.String(), Verdict: "block"},
		{Proto: "icmp", Remote: n.Server2V6.String(), Verdict: "block"},
		{Proto: "icmp", Verdict: "accept"},
	}})
	families(t, n, func(t *testing.T, server, blocked netip.Addr) {
		if !ping(t, n.client, server, 3*time.Second) {
			t.Errorf("ping %s: no reply, want one", server)
		}
		if ping(t, n.client, blocked, time.Second) {
			t.Errorf("ping %s: got a reply, want it blocked", blocked)
		}
	})
}

func TestKernelInbound(t *testing.T) {
	t.Parallel()
	n := newTestNet(t)
	listenTCP(t, n.client, 9001)
	blocked := listenTCP(t, n.client, 9002)
	startWarden(t, n.client, childConfig{Rules: []childRule{
		{Dir: "in", Port: 9002, Verdict: "block", Permanent: true},
		{Dir: "in", Port: 9001, Verdict: "accept", Permanent: true},
	}})
	for _, client := range []netip.Addr{n.ClientV4, n.ClientV6} {
		c, err := dial(t, n.server, net.Dialer{}, "tcp", netip.AddrPortFrom(client, 9001), 3*time.Second)
		if err != nil {
			t.Fatalf("allowed inbound to %s: %v", client, err)
		}
		echo(t, c)
		start := time.Now()
		_, err = dial(t, n.server, net.Dialer{}, "tcp", netip.AddrPortFrom(client, 9002), 3*time.Second)
		if !isRefused(err) {
			t.Errorf("blocked inbound to %s: got %v, want refused", client, err)
		}
		if d := time.Since(start); d > 500*time.Millisecond {
			t.Errorf("blocked inbound refusal took %v", d)
		}
	}
	if a := blocked.accepted.Load(); a != 0 {
		t.Errorf("blocked listener accepted %d connections", a)
	}
}

// A permanently accepted flow reaches user space only for its first packets: the connmark decides the
// rest in the kernel.
func TestKernelOnlyFirstPacketsQueued(t *testing.T) {
	t.Parallel()
	n := newTestNet(t)
	listenTCP(t, n.server, portAllow)
	w := startWarden(t, n.client, childConfig{Rules: verdictRules()})
	// Probes after routing: every packet the client sends to the server, and those of them carrying the
	// accept-always mark.
	port := strconv.Itoa(int(portAllow))
	n.ipt(t, n.client, false, "-t", "mangle", "-A", "POSTROUTING", "-p", "tcp", "--dport", port)
	n.ipt(t, n.client, false, "-t", "mangle", "-A", "POSTROUTING", "-p", "tcp", "--dport", port, "-m", "mark", "--mark", strconv.Itoa(int(marks.AcceptAlways)))
	// The jumps into Warden's chains, first in their built-in chains: their counters say how many packets
	// entered the chains.
	// The first packet enters them on its way out; the server's answers arrive after it saved the decision.
	jumps := []struct {
		table, chain string
		least        uint64
	}{{"mangle", "OUTPUT", 1}, {"mangle", "INPUT", 0}, {"filter", "OUTPUT", 1}, {"filter", "INPUT", 0}}
	jumped := func() []uint64 {
		var c []uint64
		for _, j := range jumps {
			c = append(c, ruleCounts(t, n, j.table, j.chain)[0])
		}
		return c
	}
	jumpedBefore := jumped()
	before := w.count(t)
	c, err := dial(t, n.client, net.Dialer{}, "tcp", netip.AddrPortFrom(n.ServerV4, portAllow), 3*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	const size = 10 << 20
	_ = c.SetDeadline(time.Now().Add(30 * time.Second))
	go func() {
		buf := make([]byte, 64<<10)
		for sent := 0; sent < size; sent += len(buf) {
			if _, err := c.Write(buf); err != nil {
				return
			}
		}
	}()
	if _, err := io.CopyN(io.Discard, c, size); err != nil {
		t.Fatalf("echoing 10 MB: %v", err)
	}
	queued := w.count(t) - before
	t.Logf("10 MB echoed; %d packets queued", queued)
	if queued >= 20 || queued < 1 {
		t.Errorf("%d packets reached user space, want a handful (1..19)", queued)
	}
	// The later packets leave with their mark untouched (the filter chain reads the connmark): a mark changed
	// in mangle OUTPUT would cost each of them a second route lookup.
	counts := postroutingCounts(t, n)
	t.Logf("packets to the server after routing: %d, with the accept-always mark: %d", counts[0], counts[1])
	if counts[0] < 100 {
		t.Errorf("%d packets counted after routing for 10 MB, want at least 100", counts[0])
	}
	if counts[1] < 1 || counts[1] >= 20 {
		t.Errorf("%d packets left with the accept-always mark, want the first few (1..19)", counts[1])
	}
	// Nor do they enter Warden's chains, which would only return them (the jumps skip connmark 1710).
	for i, after := range jumped() {
		j, entered := jumps[i], after-jumpedBefore[i]
		t.Logf("%s %s: %d packets jumped into Warden's chain", j.table, j.chain, entered)
		if entered < j.least || entered >= 20 {
			t.Errorf("%s %s: %d packets jumped into Warden's chain, want the first few (%d..19)", j.table, j.chain, entered, j.least)
		}
	}
}

// postroutingCounts returns the packet counters of the client's mangle POSTROUTING rules, in order.
func postroutingCounts(t *testing.T, n *testNet) []uint64 {
	t.Helper()
	counts := ruleCounts(t, n, "mangle", "POSTROUTING")
	if len(counts) != 2 {
		t.Fatalf("got %d POSTROUTING rules, want the 2 probes", len(counts))
	}
	return counts
}

// ruleCounts returns the packet counters of the rules of a chain of the client's (IPv4), in order.
func ruleCounts(t *testing.T, n *testNet, table, chain string) []uint64 {
	t.Helper()
	var counts []uint64
	for _, line := range strings.Split(n.ipt(t, n.client, false, "-t", table, "-L", chain, "-v", "-x", "-n"), "\n")[2:] {
		fields := strings.Fields(line)
		if len(fields) == 0 {
			continue
		}
		c, err := strconv.ParseUint(fields[0], 10, 64)
		if err != nil {
			t.Fatalf("counter of %q: %v", line, err)
		}
		counts = append(counts, c)
	}
	return counts
}

// Accept-final: Warden's own sockets pass even when other software appends a DROP to OUTPUT and INPUT.
func TestKernelAcceptFinal(t *testing.T) {
	t.Parallel()
	n := newTestNet(t)
	listenTCP(t, n.server, portAllow)
	startWarden(t, n.client, childConfig{Rules: verdictRules()})
	for _, v6 := range []bool{false, true} {
		if v6 {
			// Like any real firewall, the third party lets neighbour discovery through.
			n.ipt(t, n.client, v6, "-A", "OUTPUT", "-p", "ipv6-icmp", "-j", "ACCEPT")
			n.ipt(t, n.client, v6, "-A", "INPUT", "-p", "ipv6-icmp", "-j", "ACCEPT")
		}
		n.ipt(t, n.client, v6, "-A", "OUTPUT", "-j", "DROP")
		n.ipt(t, n.client, v6, "-A", "INPUT", "-j", "DROP")
	}
	for _, server := range []netip.Addr{n.ServerV4, n.ServerV6} {
		to := netip.AddrPortFrom(server, portAllow)
		c, err := dial(t, n.client, net.Dialer{Control: marks.ControlOwnSocket}, "tcp", to, 3*time.Second)
		if err != nil {
			t.Fatalf("own socket to %s: %v", to, err)
		}
		echo(t, c)
		if _, err := dial(t, n.client, net.Dialer{}, "tcp", to, time.Second); !isTimeout(err) {
			t.Errorf("ordinary socket to %s: got %v, want the third-party DROP to win", to, err)
		}
	}
}

// A foreign packet mark (WireGuard-like) is preserved on every packet of an accepted connection, the first
// one included (its routing may depend on it), while Warden still decides the connection.
func TestKernelForeignMarkPreserved(t *testing.T) {
	t.Parallel()
	n := newTestNet(t)
	listenTCP(t, n.server, portAllow)
	const foreign = 0x51820
	// Counting rules (no target) see the mark the packets leave with, and all packets to the port.
	n.ipt(t, n.client, false, "-t", "mangle", "-A", "POSTROUTING", "-m", "mark", "--mark", fmt.Sprint(foreign))
	n.ipt(t, n.client, false, "-t", "mangle", "-A", "POSTROUTING", "-p", "tcp", "--dport", fmt.Sprint(portAllow))
	w := startWarden(t, n.client, childConfig{Rules: verdictRules()})
	c, err := dial(t, n.client, net.Dialer{Control: setMark(foreign)}, "tcp", netip.AddrPortFrom(n.ServerV4, portAllow), 3*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	for range 20 {
		echo(t, c)
	}
	c.Close()
	out := n.ipt(t, n.client, false, "-t", "mangle", "-v", "-S", "POSTROUTING")
	count := func(re string) int {
		m := regexp.MustCompile(re).FindStringSubmatch(out)
		if m == nil {
			t.Fatalf("no counter %s in\n%s", re, out)
		}
		n, _ := strconv.Atoi(m[1])
		return n
	}
	marked, all := count(`--mark 0x51820 -c (\d+) `), count(fmt.Sprintf(`--dport %d -c (\d+) `, portAllow))
	// 20 requests, the handshake and the close at least, and every one of them with the foreign mark.
	if all < 22 || marked != all {
		t.Errorf("%d of %d packets left with the foreign mark, want all (at least 22)\n%s", marked, all, out)
	}
	// The SYN, decided once and never looped; on a loaded machine a SYN retransmitted before the first was
	// answered is queued too, and counted by the kernel.
	if got, retrans := w.count(t), synRetransmits(t, n.client); got < 1 || got > 1+retrans {
		t.Errorf("the policy saw %d packets, want 1 (the SYN: decided once, never looped), or 1 more per SYN "+
			"retransmission (%d)", got, retrans)
	}
}

// synRetransmits reads the TcpExt TCPSynRetrans counter of namespace ns.
func synRetransmits(t *testing.T, ns string) int {
	t.Helper()
	lines := strings.Split(netnstest.Run(t, "ip", "netns", "exec", ns, "cat", "/proc/net/netstat"), "\n")
	for i := 0; i+1 < len(lines); i += 2 {
		names, values := strings.Fields(lines[i]), strings.Fields(lines[i+1])
		if len(names) == 0 || names[0] != "TcpExt:" || len(values) != len(names) {
			continue
		}
		for j, name := range names {
			if name == "TCPSynRetrans" {
				v, err := strconv.Atoi(values[j])
				if err != nil {
					t.Fatalf("TCPSynRetrans %q: %v", values[j], err)
				}
				return v
			}
		}
	}
	t.Fatal("no TcpExt TCPSynRetrans in /proc/net/netstat")
	return 0
}

// setMark returns a dialer Control that gives the socket a mark, as a VPN client does to its own sockets.
func setMark(mark int) func(network, address string, c syscall.RawConn) error {
	return func(network, address string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, mark)
		})
		return errors.Join(err, serr)
	}
}

// thirdPartyRules puts other software's rules into filter, mangle and nat before Warden starts.
func thirdPartyRules(t *testing.T, n *testNet) {
	t.Helper()
	for _, v6 := range []bool{false, true} {
		n.ipt(t, n.client, v6, "-A", "OUTPUT", "-p", "tcp", "--dport", "9999", "-j", "ACCEPT")
		n.ipt(t, n.client, v6, "-I", "INPUT", "1", "-p", "udp", "--dport", "9998", "-j", "DROP")
		n.ipt(t, n.client, v6, "-N", "OTHER-CHAIN")
		n.ipt(t, n.client, v6, "-A", "OTHER-CHAIN", "-j", "RETURN")
		n.ipt(t, n.client, v6, "-A", "INPUT", "-j", "OTHER-CHAIN")
		n.ipt(t, n.client, v6, "-t", "mangle", "-A", "OUTPUT", "-p", "udp", "--dport", "51820", "-j", "MARK", "--set-mark", "0x51820")
		n.ipt(t, n.client, v6, "-t", "mangle", "-A", "INPUT", "-j", "RETURN")
		n.ipt(t, n.client, v6, "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "9997", "-j", "RETURN")
	}
}

// A clean stop leaves iptables-save and ip6tables-save exactly as they were, third-party rules included.
func TestKernelStopRestoresRuleset(t *testing.T) {
	t.Parallel()
	n := newTestNet(t)
	thirdPartyRules(t, n)
	before4, before6 := save(t, n.client, false), save(t, n.client, true)
	w := startWarden(t, n.client, childConfig{Rules: verdictRules()})
	if during := save(t, n.client, false); !strings.Contains(during, "-A OUTPUT -m connmark ! --mark 0x6ae -j WARDEN-FILTER") {
		t.Fatalf("rules not installed:\n%s", during)
	}
	w.stop(t)
	expectRuleset(t, n.client, "after stop", before4, before6, true)
}

// expectRuleset compares the namespace's iptables-save and ip6tables-save with want4 and want6: exactly, or,
// when withCounters is false, with the packet counters left out (want is then withoutCounters output).
func expectRuleset(t *testing.T, ns, when, want4, want6 string, withCounters bool) {
	t.Helper()
	for i, want := range []string{want4, want6} {
		got := save(t, ns, i == 1)
		if !withCounters {
			got = withoutCounters(got)
		}
		if diff := cmp.Diff(want, got); diff != "" {
			t.Errorf("%s rules %s differ (-want +got):\n%s", []string{"IPv4", "IPv6"}[i], when, diff)
		}
	}
}

// After kill -9 the rules stay (fail mode needs them); a restart converges to exactly one copy of each, the
// same state a clean start produces, and Start after Stop in one process does too.
func TestKernelRestartConverges(t *testing.T) {
	t.Parallel()
	n := newTestNet(t)
	thirdPartyRules(t, n)
	w := startWarden(t, n.client, childConfig{Rules: verdictRules()})
	clean4, clean6 := withoutCounters(save(t, n.client, false)), withoutCounters(save(t, n.client, true))
	for _, s := range []string{clean4, clean6} {
		// Packets of connections accepted for good (connmark 1710 = 0x6ae) skip the jumps into the chains
		// that would only return them.
		for _, j := range []string{"-A OUTPUT -m connmark ! --mark 0x6ae -j WARDEN-FILTER", "-A INPUT -m connmark ! --mark 0x6ae -j WARDEN-FILTER",
			"-A OUTPUT -m connmark ! --mark 0x6ae -j WARDEN-INGEST-OUTPUT", "-A INPUT -m connmark ! --mark 0x6ae -j WARDEN-INGEST-INPUT",
			"-A OUTPUT -j WARDEN-REDIRECT"} {
			if c := strings.Count(s, j+"\n"); c != 1 {
				t.Errorf("%q appears %d times after a clean start, want once", j, c)
			}
		}
	}
	w.kill(t)
	if s := save(t, n.client, false); !strings.Contains(s, "WARDEN-FILTER") {
		t.Fatal("rules vanished with the process; fail mode would not hold")
	}
	w = startWarden(t, n.client, childConfig{Rules: verdictRules()})
	expectRuleset(t, n.client, "after crash and restart, against a clean start", clean4, clean6, false)
	if r := w.call(t, "restart"); r != "ok" {
		t.Fatalf("restart: %s", r)
	}
	if diff := cmp.Diff(clean4, withoutCounters(save(t, n.client, false))); diff != "" {
		t.Errorf("IPv4 rules after Stop+Start differ (-clean +restarted):\n%s", diff)
	}
	listenTCP(t, n.server, portAllow)
	c, err := dial(t, n.client, net.Dialer{}, "tcp", netip.AddrPortFrom(n.ServerV4, portAllow), 3*time.Second)
	if err != nil {
		t.Fatalf("connect after Stop+Start: %v", err)
	}
	echo(t, c)
	if w.count(t) == 0 {
		t.Error("no packet reached the restarted backend")
	}
	w.stop(t)
}

// Route mode's source NAT is installed only with it. A run in route mode that crashed leaves its chain; the
// next start without route mode removes it and converges to a clean start's rules; turned on and off while
// running (a reload that brings the first split rule or takes the last away) it comes and goes alone, first
// in POSTROUTING; and a stop restores the ruleset as it was before all of it.
func TestKernelSourceNATOnlyInRouteMode(t *testing.T) {
	t.Parallel()
	n := newTestNet(t)
	thirdPartyRules(t, n)
	n.ipt(t, n.client, false, "-t", "nat", "-A", "POSTROUTING", "-p", "udp", "--dport", "9996", "-j", "RETURN")
	before4, before6 := save(t, n.client, false), save(t, n.client, true)
	w := startWarden(t, n.client, childConfig{Rules: verdictRules()})
	clean4, clean6 := withoutCounters(save(t, n.client, false)), withoutCounters(save(t, n.client, true))
	for _, s := range []string{clean4, clean6} {
		if strings.Contains(s, chainSplitSNAT) || !strings.Contains(s, "-A OUTPUT -j "+chainRedirect+"\n") {
			t.Fatalf("without route mode: want the redirect chain and no %s:\n%s", chainSplitSNAT, s)
		}
	}
	w.stop(t)
	w = startWarden(t, n.client, childConfig{Rules: verdictRules(), RouteSplit: true})
	for _, v6 := range []bool{false, true} {
		if s := save(t, n.client, v6); !strings.Contains(s, "-A POSTROUTING -j "+chainSplitSNAT+"\n") {
			t.Fatalf("route mode (v6=%v): no jump to %s:\n%s", v6, chainSplitSNAT, s)
		}
	}
	w.kill(t)
	w = startWarden(t, n.client, childConfig{Rules: verdictRules()})
	expectRuleset(t, n.client, "after a route-mode crash, against a clean start", clean4, clean6, false)
	// Turned on while running (a reload brought the first split rule): the chain, and the jump first in
	// POSTROUTING above a third party's rule; the watcher keeps it there. Off again: as before.
	for _, state := range []string{"on", "on", "off", "off"} {
		if r := w.call(t, "route_split "+state); r != "ok" {
			t.Fatalf("route_split %s: %s", state, r)
		}
		s := save(t, n.client, false)
		jump := "-A POSTROUTING -j " + chainSplitSNAT + "\n-A POSTROUTING -p udp"
		if got := strings.Contains(s, jump) && strings.Count(s, "-j "+chainSplitSNAT+"\n") == 1 &&
			strings.Contains(s, "-A "+chainSplitSNAT+" -m mark --mark"); got != (state == "on") {
			t.Fatalf("route_split %s: jump first and chain filled %v:\n%s", state, got, s)
		}
		if state == "off" {
			if diff := cmp.Diff(clean4, withoutCounters(s)); diff != "" {
				t.Errorf("after route_split off (-before on +now):\n%s", diff)
			}
		}
	}
	expectRuleset(t, n.client, "after route_split on and off, against a clean start", clean4, clean6, false)
	w.stop(t)
	expectRuleset(t, n.client, "after stop", before4, before6, true)
}

// fail_mode decides what happens while the daemon is down (its rules stay after kill -9).
func TestKernelFailMode(t *testing.T) {
	t.Parallel()
	for _, mode := range []string{"open", "closed"} {
		t.Run(mode, func(t *testing.T) {
			t.Parallel()
			n := newTestNet(t)
			listenTCP(t, n.server, portAllow)
			w := startWarden(t, n.client, childConfig{FailMode: mode, Rules: verdictRules()})
			w.kill(t)
			// A socket carrying another program's mark takes the same decision.
			for _, d := range []net.Dialer{{}, {Control: setMark(0x51820)}} {
				for _, server := range []netip.Addr{n.ServerV4, n.ServerV6} {
					_, err := dial(t, n.client, d, "tcp", netip.AddrPortFrom(server, portAllow), 1500*time.Millisecond)
					switch {
					case mode == "open" && err != nil:
						t.Errorf("fail open, daemon down: connect to %s (marked %v): %v, want success", server, d.Control != nil, err)
					case mode == "closed" && err == nil:
						t.Errorf("fail closed, daemon down: connect to %s (marked %v) succeeded", server, d.Control != nil)
					}
				}
			}
		})
	}
}

// Reevaluate cuts exactly the flows it is given.
func TestKernelReevaluate(t *testing.T) {
	t.Parallel()
	n := newTestNet(t)
	listenTCP(t, n.server, portAllow)
	w := startWarden(t, n.client, childConfig{Rules: verdictRules()})
	families(t, n, func(t *testing.T, server, _ netip.Addr) {
		to := netip.AddrPortFrom(server, portAllow)
		cut, err := dial(t, n.client, net.Dialer{}, "tcp", to, 3*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		kept, err := dial(t, n.client, net.Dialer{}, "tcp", to, 3*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		echo(t, cut)
		echo(t, kept)
		// The policy now blocks the port; only the reevaluated flow feels it.
		if r := w.call(t, `rules [{"dir":"out","port":8001,"verdict":"block","permanent":true}]`); r != "ok" {
			t.Fatal(r)
		}
		defer w.call(t, "rules "+mustJSON(t, verdictRules()))
		if r := w.call(t, "reeval tcp "+cut.LocalAddr().String()+" "+to.String()); r != "ok" {
			t.Fatalf("reeval: %s", r)
		}
		start := time.Now()
		_ = cut.SetDeadline(time.Now().Add(time.Second))
		_, werr := cut.Write([]byte("hello"))
		buf := make([]byte, 5)
		_, rerr := io.ReadFull(cut, buf)
		if werr == nil && rerr == nil {
			t.Error("reevaluated connection still carries data")
		} else if isTimeout(rerr) {
			t.Errorf("reevaluated connection timed out instead of being cut: %v", rerr)
		}
		d := time.Since(start)
		t.Logf("reevaluated connection cut after %v: write %v, read %v", d, werr, rerr)
		if d > time.Second {
			t.Errorf("cutting took %v", d)
		}
		echo(t, kept)
	})
}

// LiveConnections lists, by the keys the pipeline gave them, the connections conntrack still tracks: an open
// outbound TCP connection, a UDP flow, a UDP flow DNATed to the split-tunnel proxy (keyed by the destination
// the application used) and an inbound connection; not one that closed (TIME_WAIT).
func TestKernelLiveConnections(t *testing.T) {
	t.Parallel()
	n := newTestNet(t)
	listenTCP(t, n.server, portAllow)
	listenTCP(t, n.client, 9001)
	listenUDP(t, n.server, portAllow, n.ServerV4, n.ServerV6)
	listenUDP(t, n.client, 719, netip.MustParseAddr("127.0.0.17"), netip.IPv6Loopback())
	w := startWarden(t, n.client, childConfig{Rules: []childRule{{Dir: "out", Proto: "udp", Port: 443, Verdict: "split", Permanent: true}}})
	families(t, n, func(t *testing.T, server, _ netip.Addr) {
		key := func(p backend.Protocol, c net.Conn, inbound bool) string {
			local, remote := netip.MustParseAddrPort(c.LocalAddr().String()), netip.MustParseAddrPort(c.RemoteAddr().String())
			if inbound { // dialled from the server's namespace: Warden's side is the remote end
				local, remote = remote, local
			}
			return backend.ConnKey{Protocol: p, Local: local, Remote: remote}.String()
		}
		mustDial := func(ns, network string, to netip.AddrPort) net.Conn {
			t.Helper()
			c, err := dial(t, ns, net.Dialer{}, network, to, 3*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { c.Close() })
			echo(t, c)
			return c
		}
		client := n.ClientV4
		if server.Is6() {
			client = n.ClientV6
		}
		want := map[string]bool{
			key(backend.TCP, mustDial(n.client, "tcp", netip.AddrPortFrom(server, portAllow)), false): true,
			key(backend.UDP, mustDial(n.client, "udp", netip.AddrPortFrom(server, portAllow)), false): true,
			key(backend.UDP, mustDial(n.client, "udp", netip.AddrPortFrom(server, 443)), false):       true,
			key(backend.TCP, mustDial(n.server, "tcp", netip.AddrPortFrom(client, 9001)), true):       true,
		}
		closed := mustDial(n.client, "tcp", netip.AddrPortFrom(server, portAllow))
		closedKey := key(backend.TCP, closed, false)
		want[closedKey] = false
		closed.Close() // the client closes first, so conntrack ends in TIME_WAIT once the server's FIN is acked

		var got map[string]bool
		deadline := time.Now().Add(5 * time.Second)
		for i := 0; i < 100; i++ {
			r := w.call(t, "live")
			arg, ok := strings.CutPrefix(r, "live ")
			if !ok {
				t.Fatalf("live: %s", r)
			}
			got = map[string]bool{}
			if err := json.Unmarshal([]byte(arg), &got); err != nil {
				t.Fatal(err)
			}
			if !got[closedKey] || time.Now().After(deadline) {
				break
			}
			time.Sleep(50 * time.Millisecond) // the close finishes on the echo server's goroutine; no event here
		}
		for k, live := range want {
			switch l, decided := got[k]; {
			case !decided:
				t.Errorf("%s: never decided (decided: %v)", k, got)
			case l != live:
				t.Errorf("%s: listed %v, want %v", k, l, live)
			}
		}
	})
}

func mustJSON(t *testing.T, v any) string {
	t.Helper()
	j, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(j)
}

// A third party inserting above Warden's jump is pushed back below within a few seconds.
func TestKernelJumpStaysFirst(t *testing.T) {
	t.Parallel()
	n := newTestNet(t)
	startWarden(t, n.client, childConfig{Rules: verdictRules()})
	type chain struct {
		v6           bool
		table, chain string
		jump         string
	}
	chains := []chain{
		{false, "filter", "OUTPUT", "-A OUTPUT -m connmark ! --mark 0x6ae -j WARDEN-FILTER"},
		{false, "mangle", "INPUT", "-A INPUT -m connmark ! --mark 0x6ae -j WARDEN-INGEST-INPUT"},
		{true, "filter", "INPUT", "-A INPUT -m connmark ! --mark 0x6ae -j WARDEN-FILTER"},
		{true, "nat", "OUTPUT", "-A OUTPUT -j WARDEN-REDIRECT"},
	}
	for _, c := range chains {
		n.ipt(t, n.client, c.v6, "-t", c.table, "-I", c.chain, "1", "-p", "udp", "--dport", "4444", "-j", "ACCEPT")
	}
	for _, c := range chains {
		want := []string{c.jump, "-A " + c.chain + " -p udp -m udp --dport 4444 -j ACCEPT"}
		var got []string
		deadline := time.Now().Add(5 * time.Second)
		for time.Now().Before(deadline) {
			got = nil
			for _, l := range strings.Split(n.ipt(t, n.client, c.v6, "-t", c.table, "-S", c.chain), "\n") {
				if strings.HasPrefix(l, "-A ") {
					got = append(got, l)
				}
			}
			if cmp.Equal(want, got) {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		if diff := cmp.Diff(want, got); diff != "" {
			t.Errorf("v6=%v %s %s after a third party inserted first (-want +got):\n%s", c.v6, c.table, c.chain, diff)
		}
	}
}

// A packet nobody answers gets the fail-mode verdict after the timeout, counted in Stats.
func TestKernelVerdictTimeout(t *testing.T) {
	t.Parallel()
	n := newTestNet(t)
	listenTCP(t, n.server, portAllow)
	w := startWarden(t, n.client, childConfig{Timeout: 300 * time.Millisecond,
		Rules: []childRule{{Dir: "out", Port: portAllow, Verdict: "none"}}})
	start := time.Now()
	c, err := dial(t, n.client, net.Dialer{}, "tcp", netip.AddrPortFrom(n.ServerV4, portAllow), 3*time.Second)
	if err != nil {
		t.Fatalf("fail open after the verdict timeout: %v", err)
	}
	if d := time.Since(start); d < 250*time.Millisecond {
		t.Errorf("connected after %v, before the verdict timeout", d)
	}
	c.Close()
	var st backend.Stats
	if err := json.Unmarshal([]byte(strings.TrimPrefix(w.call(t, "stats"), "stats ")), &st); err != nil {
		t.Fatal(err)
	}
	if st.VerdictTimeouts == 0 || st.Packets == 0 {
		t.Errorf("stats %+v: want verdict timeouts and packets counted", st)
	}
}

// RerouteToSplitTun DNATs to the split-tunnel proxy on 127.0.0.17 / [::1], TCP and UDP.
func TestKernelReroute(t *testing.T) {
	t.Parallel()
	n := newTestNet(t)
	proxy4 := listenTCPOn(t, n.client, netip.MustParseAddrPort("127.0.0.17:719"))
	proxy6 := listenTCPOn(t, n.client, netip.MustParseAddrPort("[::1]:719"))
	udp := listenUDP(t, n.client, 719, netip.MustParseAddr("127.0.0.17"), netip.IPv6Loopback())
	startWarden(t, n.client, childConfig{Rules: []childRule{{Dir: "out", Port: 443, Verdict: "split"}}})
	// Probes after routing: the packets of the IPv4 connection's leg to the proxy, and those of them carrying
	// the reroute mark.
	toProxy := []string{"-t", "mangle", "-A", "POSTROUTING", "-p", "tcp", "-d", "127.0.0.17", "--dport", "719"}
	n.ipt(t, n.client, false, toProxy...)
	n.ipt(t, n.client, false, append(toProxy, "-m", "mark", "--mark", strconv.Itoa(int(marks.RerouteSplit)))...)
	for _, server := range []netip.Addr{n.ServerV4, n.ServerV6} {
		c, err := dial(t, n.client, net.Dialer{}, "tcp", netip.AddrPortFrom(server, 443), 3*time.Second)
		if err != nil {
			t.Fatalf("rerouted connect to %s: %v", server, err)
		}
		echo(t, c)
		if err := udpExchange(t, n.client, netip.AddrPortFrom(server, 443), 2*time.Second); err != nil {
			t.Errorf("rerouted UDP to %s: %v", server, err)
		}
	}
	if proxy4.accepted.Load() != 1 || proxy6.accepted.Load() != 1 || udp.received.Load() != 2 {
		t.Errorf("proxy saw tcp4=%d tcp6=%d udp=%d, want 1, 1, 2", proxy4.accepted.Load(), proxy6.accepted.Load(), udp.received.Load())
	}
	// Like an accepted connection's, the rerouted one's later packets leave with their mark untouched (the
	// DNAT is conntrack's): only the first carries the reroute mark.
	counts := postroutingCounts(t, n)
	t.Logf("IPv4 packets to the proxy after routing: %d, with the reroute mark: %d", counts[0], counts[1])
	if counts[0] < 3 || counts[1] != 1 {
		t.Errorf("%d of %d packets to the proxy carried the reroute mark, want the first only", counts[1], counts[0])
	}
}

// ConnBytes reads conntrack's byte counts when the namespace keeps them, and says it does not know otherwise:
// Warden never turns accounting on itself.
func TestKernelConnBytes(t *testing.T) {
	t.Parallel()
	n := newTestNet(t)
	listenTCP(t, n.server, portAllow)
	const portInbound uint16 = 8010
	rules := append(verdictRules(), childRule{Dir: "in", Port: portInbound, Verdict: "accept", Permanent: true})
	w := startWarden(t, n.client, childConfig{Rules: rules})
	// exchange writes send bytes on c and reads recv bytes back.
	exchange := func(c net.Conn, send, recv int) {
		t.Helper()
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := c.Write(make([]byte, send)); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(c, make([]byte, recv)); err != nil {
			t.Fatal(err)
		}
	}
	// echo sends size bytes over a new connection and reads them back; it returns the connection's call
	// argument for the child's "bytes" command.
	echo := func(size int) string {
		t.Helper()
		c, err := dial(t, n.client, net.Dialer{}, "tcp", netip.AddrPortFrom(n.ServerV4, portAllow), 3*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		exchange(c, size, size)
		return c.LocalAddr().String() + " " + c.RemoteAddr().String()
	}

	if got := w.call(t, "bytes "+echo(1000)); got != "bytes unknown" {
		t.Errorf("accounting off: %q, want bytes unknown", got)
	}
	netnstest.Run(t, "ip", "netns", "exec", n.client, "sysctl", "-q", "-w", "net.netfilter.nf_conntrack_acct=1")
	const size = 100000
	var tx, rx uint64
	if _, err := fmt.Sscanf(w.call(t, "bytes "+echo(size)), "bytes %d %d", &tx, &rx); err != nil {
		t.Fatalf("accounting on: %v", err)
	}
	// Both ways: the payload plus the IP and TCP headers of its segments and of the handshake.
	for _, got := range []uint64{tx, rx} {
		if got < size || got > size+size/4 {
			t.Errorf("counted %d/%d bytes sent/received, want %d each plus headers", tx, rx, size)
			break
		}
	}
	if got := w.call(t, "bytes 10.255.0.1:1 10.255.0.2:2"); got != "bytes unknown" {
		t.Errorf("a connection conntrack does not track: %q", got)
	}

	// Inbound, lopsided: the peer sends size bytes, this host answers a tenth. Sent and received are this
	// host's, whichever side opened the connection.
	var ln net.Listener
	var err error
	netnstest.InNS(t, n.client, func() { ln, err = net.Listen("tcp", netip.AddrPortFrom(n.ClientV4, portInbound).String()) })
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := io.ReadFull(c, make([]byte, size)); err == nil {
			_, _ = c.Write(make([]byte, size/10))
		}
	}()
	c, err := dial(t, n.server, net.Dialer{}, "tcp", netip.AddrPortFrom(n.ClientV4, portInbound), 3*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	exchange(c, size, size/10)
	if _, err := fmt.Sscanf(w.call(t, "bytes "+c.RemoteAddr().String()+" "+c.LocalAddr().String()), "bytes %d %d", &tx, &rx); err != nil {
		t.Fatalf("inbound: %v", err)
	}
	if tx < size/10 || tx > size/2 || rx < size || rx > size+size/4 {
		t.Errorf("inbound: counted %d/%d bytes sent/received, want about %d/%d", tx, rx, size/10, size)
	}
	w.stop(t)
}

// A second instance in the same namespace refuses to start and touches nothing: before the instance lock, it
// removed the running one's rules as a crashed run's leftovers. Once the first has stopped, a new one starts.
func TestKernelSecondInstanceRefused(t *testing.T) {
	t.Parallel()
	n := newTestNet(t)
	listenTCP(t, n.server, portBlock)
	w := startWarden(t, n.client, childConfig{Rules: verdictRules()})
	before4, before6 := withoutCounters(save(t, n.client, false)), withoutCounters(save(t, n.client, true))

	j, err := json.Marshal(childConfig{Rules: verdictRules(), FailMode: "open"})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := netnstest.Child(ctx, t, n.client, childEnv+"="+string(j)).CombinedOutput()
	want := fmt.Sprintf("another warden runs in this network namespace (pid %d)", w.cmd.Process.Pid)
	if err == nil || !strings.Contains(string(out), want) {
		t.Errorf("second instance: %v, output %q; want a refusal saying %q", err, out, want)
	}
	if diff := cmp.Diff(before4, withoutCounters(save(t, n.client, false))); diff != "" {
		t.Errorf("the second instance changed the IPv4 rules (-before +after):\n%s", diff)
	}
	if diff := cmp.Diff(before6, withoutCounters(save(t, n.client, true))); diff != "" {
		t.Errorf("the second instance changed the IPv6 rules (-before +after):\n%s", diff)
	}
	if _, err := dial(t, n.client, net.Dialer{}, "tcp", netip.AddrPortFrom(n.ServerV4, portBlock), 3*time.Second); !isRefused(err) {
		t.Errorf("blocked port after the refused start: %v, want refused", err)
	}
	w.stop(t)
	w = startWarden(t, n.client, childConfig{Rules: verdictRules()})
	w.stop(t)
}

// Another program flushing every chain (`iptables -F`, also in mangle), or replacing whole tables with
// iptables-restore (a firewall manager's reload: every chain it does not declare is gone), takes Warden's
// rules with it; the watcher rewrites them, and blocking works again, without a restart. The watcher runs
// while the test does this, so what proves the rules were taken is that they come back as new rules (new
// nf_tables handles), not a look between the two.
func TestKernelFlushedRulesRestored(t *testing.T) {
	t.Parallel()
	n := newTestNet(t)
	listenTCP(t, n.server, portBlock)
	// The watcher's tick is an hour: only the kernel's change announcements can bring the repair within the
	// test's 10 seconds.
	w := startWarden(t, n.client, childConfig{Rules: verdictRules(), Watch: time.Hour})
	clean4, clean6 := withoutCounters(save(t, n.client, false)), withoutCounters(save(t, n.client, true))
	handles := func() string {
		out := netnstest.Run(t, "ip", "netns", "exec", n.client, "nft", "-a", "list", "chain", "ip", "filter", chainFilter)
		return strings.Join(regexp.MustCompile(`# handle \d+`).FindAllString(out, -1), " ")
	}
	const builtins = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n" +
		"*mangle\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n"
	for _, attack := range []struct {
		name string
		run  func(tool string)
	}{
		{"iptables -F", func(tool string) {
			netnstest.Run(t, "ip", "netns", "exec", n.client, tool, "-F")
			netnstest.Run(t, "ip", "netns", "exec", n.client, tool, "-t", "mangle", "-F")
		}},
		{"iptables-restore of the built-in chains", func(tool string) {
			cmd := exec.Command("ip", "netns", "exec", n.client, tool+"-restore")
			cmd.Stdin = strings.NewReader(builtins)
			if out, err := cmd.CombinedOutput(); err != nil {
				t.Fatalf("%s-restore: %v: %s", tool, err, out)
			}
		}},
	} {
		before := handles()
		for _, tool := range []string{"iptables", "ip6tables"} {
			attack.run(tool)
		}
		deadline := time.Now().Add(10 * time.Second)
		for withoutCounters(save(t, n.client, false)) != clean4 || withoutCounters(save(t, n.client, true)) != clean6 ||
			handles() == before {
			if time.Now().After(deadline) {
				t.Fatalf("after %s the rules were not restored in 10 s (-clean +now):\n%s", attack.name,
					cmp.Diff(clean4, withoutCounters(save(t, n.client, false))))
			}
			time.Sleep(100 * time.Millisecond)
		}
		if _, err := dial(t, n.client, net.Dialer{}, "tcp", netip.AddrPortFrom(n.ServerV4, portBlock), 3*time.Second); !isRefused(err) {
			t.Errorf("blocked port after %s and the repair: %v, want refused", attack.name, err)
		}
	}
	w.stop(t)
}
