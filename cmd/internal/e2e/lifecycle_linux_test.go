package e2e

import (
	"context"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/warden-fw/warden/cmd/internal/sandbox"
)

// conntrackMarked lists the namespace's conntrack entries carrying one of Warden's permanent marks.
func conntrackMarked(t *testing.T, ns string) string {
	t.Helper()
	var out strings.Builder
	marks := []string{"1709", "1710", "1711", "1712", "1717", "1719", "1799"}
	for m := 1728; m <= 1743; m++ { // kernel-routed split connections
		marks = append(marks, strconv.Itoa(m))
	}
	for _, mark := range marks {
		for _, fam := range []string{"ipv4", "ipv6"} {
			b, err := exec.Command("ip", "netns", "exec", ns, "conntrack", "-L", "-f", fam, "--mark", mark).Output()
			if err != nil {
				t.Fatalf("conntrack -L --mark %s: %v", mark, err)
			}
			out.Write(b)
		}
	}
	return out.String()
}

// firstRule returns the first rule of chain in table's section of an iptables-save dump.
func firstRule(dump, table, chain string) string {
	in := false
	for _, l := range strings.Split(dump, "\n") {
		switch {
		case strings.HasPrefix(l, "*"):
			in = l == "*"+table
		case in && strings.HasPrefix(l, "-A "+chain+" "):
			return l
		}
	}
	return ""
}

// TestCleanStopAndKillRecovery: a clean stop (SIGTERM) leaves iptables-save and ip6tables-save byte-identical
// to before the start, with third-party rules in filter, mangle and nat untouched and in order; after kill -9
// the rules (and the split tunnel's policy routes) stay behind, and `warden cleanup` restores the same state
// and forgets the conntrack marks.
func TestCleanStopAndKillRecovery(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	thirdPartyRules(t, e.top.Client)
	e.writeConfig(noTelnet + splitPort8080)
	before := ipt(t, e.top.Client)
	routesBefore := ipRules(t, e.top.Client)

	d := e.startDaemon()
	expectServer(t, "allowed", call(t, e.client, tcpReq(hp(sandbox.ServiceV4, 80))), "A")
	running := ipt(t, e.top.Client)
	// The jumps into the ingest and filter chains skip connections accepted for good (connmark 1710).
	const skip = "-m connmark ! --mark 0x6ae "
	for _, c := range []struct{ table, chain, match, target string }{
		{"filter", "INPUT", skip, "WARDEN-FILTER"}, {"filter", "OUTPUT", skip, "WARDEN-FILTER"}, {"nat", "OUTPUT", "", "WARDEN-REDIRECT"},
		{"mangle", "OUTPUT", skip, "WARDEN-INGEST-OUTPUT"}, {"mangle", "INPUT", skip, "WARDEN-INGEST-INPUT"},
	} {
		if got, want := firstRule(running, c.table, c.chain), "-A "+c.chain+" "+c.match+"-j "+c.target; got != want {
			t.Errorf("while running, the first rule of %s %s is %q, want %q", c.table, c.chain, got, want)
		}
	}
	if code, err := d.Stop(15 * time.Second); err != nil || code != 0 {
		t.Fatalf("SIGTERM: exit %d, %v", code, err)
	}
	if diff := cmp.Diff(before, ipt(t, e.top.Client)); diff != "" {
		t.Errorf("after a clean stop the rules differ from before the start (-before +after):\n%s", diff)
	}
	if after := ipRules(t, e.top.Client); after != routesBefore {
		t.Errorf("after a clean stop the split routes differ from before:\n--- before\n%s--- after\n%s", routesBefore, after)
	}

	// kill -9: nothing is cleaned up by the daemon itself.
	d = e.startDaemon()
	expectServer(t, "allowed", call(t, e.client, tcpReq(hp(sandbox.ServiceV4, 80))), "A")
	expectOutcome(t, "blocked", call(t, e.client, tcpReq(hp(sandbox.ServiceV4, 23))), sandbox.Refused)
	expectServer(t, "split", call(t, e.client, tcpReq(hp(sandbox.ServiceV4, 8080))), "B")
	d.Kill()
	if after := ipt(t, e.top.Client); !strings.Contains(after, "WARDEN-") {
		t.Fatal("after kill -9 no Warden rule is left; the test would prove nothing")
	}
	if after := ipRules(t, e.top.Client); !strings.Contains(after, "lookup 1728") {
		t.Fatalf("after kill -9 no split route is left; the test would prove nothing:\n%s", after)
	}
	if ct := conntrackMarked(t, e.top.Client); ct == "" {
		t.Error("after kill -9 no conntrack entry carries a Warden mark; the test would prove less")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := sandbox.Command(ctx, e.top.Client, wardenBin, "cleanup", "-c", e.cfg)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("warden cleanup: %v\n%s", err, out)
	}
	if diff := cmp.Diff(before, ipt(t, e.top.Client)); diff != "" {
		t.Errorf("after kill -9 and warden cleanup the rules differ from before the start (-before +after):\n%s", diff)
	}
	if after := ipRules(t, e.top.Client); after != routesBefore {
		t.Errorf("after kill -9 and warden cleanup the split routes differ from before:\n--- before\n%s--- after\n%s", routesBefore, after)
	}
	if ct := conntrackMarked(t, e.top.Client); ct != "" {
		t.Errorf("conntrack entries with Warden marks survived cleanup:\n%s", ct)
	}
	// And a fresh start after all that works.
	e.startDaemon()
	expectOutcome(t, "blocked after restart", call(t, e.client, tcpReq(hp(sandbox.ServiceV4, 23))), sandbox.Refused)
}

// splitPort8080 splits TCP and UDP port 8080 through uplink B (kernel-routed by default).
const splitPort8080 = `
  - {name: split-8080, action: split, ports: [8080], via: ub}
split_tunnel: {interface: ub}
`

// TestExitCodes: `warden run` with a bad config exits 2 and touches nothing; status, conns and reload without
// a daemon exit 1.
func TestExitCodes(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	thirdPartyRules(t, e.top.Client)
	before := ipt(t, e.top.Client)
	e.writeConfig("rules:\n  - name: a\n    action: block\n    ports: [\"70000\"]\n")
	d, log := e.spawnDaemon(e.cfg)
	code, err := d.Wait(30 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if code != 2 || !strings.Contains(log.String(), `rules[0].ports[0]: "70000" is not a port`) {
		t.Errorf("warden run with a bad config: exit %d; want 2 naming the bad key\n%s", code, log)
	}
	if diff := cmp.Diff(before, ipt(t, e.top.Client)); diff != "" {
		t.Errorf("a rejected start changed the rules:\n%s", diff)
	}
	missing := filepath.Join(e.dir, "run", "nobody-listens.sock")
	for _, cmd := range []string{"status", "conns", "reload"} {
		code, _, errOut := wardenCmd(t, nil, cmd, "--socket", missing)
		if code != 1 || !strings.Contains(errOut, "not reachable") {
			t.Errorf("warden %s without a daemon: exit %d, %q; want 1, not reachable", cmd, code, errOut)
		}
	}
}

// TestSecondDaemonRefused: a second `warden run` in the namespace of a running daemon (another config, another
// control socket) exits with a clear error before touching anything: the first one's rules and split routes
// stay as they were and it keeps answering. Without the check, the second took them for a crashed run's
// leftovers and removed them.
func TestSecondDaemonRefused(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.writeConfig(splitConfigFor("/nonexistent", "block", "route", false))
	d := e.startDaemon()
	rulesBefore, routesBefore := ipt(t, e.top.Client), ipRules(t, e.top.Client)

	second := filepath.Join(e.dir, "second.yaml")
	writeFile(t, second, "control: {socket: "+filepath.Join(e.dir, "run", "second.sock")+"}\n"+noTelnet)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := sandbox.Command(ctx, e.top.Client, wardenBin, "run", "-c", second).CombinedOutput()
	want := "another warden daemon runs in this network namespace (pid " + strconv.Itoa(d.PID()) + ")"
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 || !strings.Contains(string(out), want) {
		t.Errorf("second daemon: %v, output:\n%s\nwant exit 1 saying %q", err, out, want)
	}
	if diff := cmp.Diff(rulesBefore, ipt(t, e.top.Client)); diff != "" {
		t.Errorf("the second daemon changed the rules (-before +after):\n%s", diff)
	}
	if diff := cmp.Diff(routesBefore, ipRules(t, e.top.Client)); diff != "" {
		t.Errorf("the second daemon changed the ip rules (-before +after):\n%s", diff)
	}
	if st := e.status(); st.Backend != "nfqueue" {
		t.Errorf("the first daemon's status after the refusal: %+v", st)
	}
}
