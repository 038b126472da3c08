package e2e

import (
	"context"
	"net/netip"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/warden-fw/warden/cmd/internal/control"
	"github.com/warden-fw/warden/cmd/internal/sandbox"
)

func hp(a netip.Addr, port uint16) string { return netip.AddrPortFrom(a, port).String() }

const splitConfig = `
rules:
  - name: split-port
    action: split
    ports: [8080]
    via: ub
  - name: split-app
    action: split
    app: %APP%
    via: ub
split_tunnel:
  interface: ub
  mode: %MODE%
  kernel_handoff: %HANDOFF%
  on_interface_down: %DOWN%
log:
  level: debug
`

// splitConfigFor fills splitConfig in.
func splitConfigFor(app, down, mode string, handoff bool) string {
	return strings.NewReplacer("%APP%", app, "%DOWN%", down, "%MODE%", mode, "%HANDOFF%", strconv.FormatBool(handoff)).Replace(splitConfig)
}

// TestSplitTunnel: in both modes (kernel routing and the proxy), split flows (by port and by application; TCP
// and UDP; IPv4 and IPv6) leave through uplink B and reach B's server, everything else reaches A's; the client
// sees the original destination as its peer; one UDP socket talking to two peers gets each reply from the
// right one; under load every split connection is decided exactly once and none of Warden's own upstream
// traffic is queued; status shows the split interface and the counters of the mode's carrier (and the other
// carrier carried nothing); when B goes down, on_interface_down: block refuses new split connections; a
// stop leaves no ip rule or route behind. "proxy-handoff" is the proxy with split_tunnel.kernel_handoff: every
// split TCP connection's download goes into the application's socket in the kernel.
func TestSplitTunnel(t *testing.T) {
	t.Parallel()
	for _, variant := range []string{"route", "proxy", "proxy-handoff"} {
		t.Run(variant, func(t *testing.T) {
			t.Parallel()
			mode, handoff := strings.CutSuffix(variant, "-handoff")
			testSplitTunnel(t, mode, handoff)
		})
	}
}

func testSplitTunnel(t *testing.T, mode string, handoff bool) {
	e := newEnv(t)
	app, appExe := e.startAppAgent()
	e.writeConfig(splitConfigFor(appExe, "block", mode, handoff))
	rulesBefore := ipRules(t, e.top.Client)
	d := e.startDaemon()

	var splitTCP, splitUDP int // split flows made, to check the counters exactly
	for _, svc := range []struct {
		name     string
		one, two netip.Addr
	}{{"v4", sandbox.ServiceV4, sandbox.ServiceV4Alt}, {"v6", sandbox.ServiceV6, sandbox.ServiceV6Alt}} {
		// TCP: port 80 is not split and goes to A; 8080 is split and goes to B, and the client's peer is
		// still the original destination.
		r := call(t, e.client, tcpReq(hp(svc.one, 80)))
		expectServer(t, svc.name+" tcp :80", r, "A")
		r = call(t, e.client, tcpReq(hp(svc.one, 8080)))
		splitTCP++
		expectServer(t, svc.name+" tcp :8080 (split)", r, "B")
		if r.Echo != "ping" {
			t.Errorf("%s tcp :8080: echo %q, want ping", svc.name, r.Echo)
		}
		if r.Peer != hp(svc.one, 8080) {
			t.Errorf("%s tcp :8080: the client's peer is %s, want the original destination %s", svc.name, r.Peer, hp(svc.one, 8080))
		}

		// UDP on a connected socket: the reply must come from the original destination, or the kernel would
		// not even deliver it.
		r = call(t, e.client, udpReq(hp(svc.one, 4000)))
		expectServer(t, svc.name+" udp :4000", r, "A")
		r = call(t, e.client, udpReq(hp(svc.one, 8080)))
		splitUDP++
		expectServer(t, svc.name+" udp :8080 (split)", r, "B")

		// One unconnected UDP socket, two peers: each reply from the peer it was sent to, both via B.
		dsts := []string{hp(svc.one, 8080), hp(svc.two, 8080)}
		r = call(t, e.client, sandbox.Request{Op: "udp", Dsts: dsts, Payload: "multi", TimeoutMS: 3000})
		splitUDP += 2
		if len(r.Replies) != 2 {
			t.Fatalf("%s multi-peer udp: %d replies", svc.name, len(r.Replies))
		}
		for i, rep := range r.Replies {
			if rep.Outcome != sandbox.Connected || rep.Server != "B" || rep.From != dsts[i] || rep.Echo != "multi@"+dsts[i] {
				t.Errorf("%s multi-peer udp to %s: %+v; want B's answer from %s", svc.name, dsts[i], rep, dsts[i])
			}
		}

		// The app rule: the test binary's connections are split whatever the port.
		r = call(t, app, tcpReq(hp(svc.one, 80)))
		splitTCP++
		expectServer(t, svc.name+" app tcp :80 (split by app)", r, "B")
		if r.Peer != hp(svc.one, 80) {
			t.Errorf("%s app tcp: peer %s, want %s", svc.name, r.Peer, hp(svc.one, 80))
		}
		r = call(t, app, udpReq(hp(svc.one, 4000)))
		splitUDP++
		expectServer(t, svc.name+" app udp :4000 (split by app)", r, "B")
	}

	// No loop under load: 200 short split connections, 8 at a time.
	const n = 200
	r := call(t, e.client, sandbox.Request{Op: "many", Dst: hp(sandbox.ServiceV4, 8080), Count: n, Parallel: 8, TimeoutMS: 5000})
	splitTCP += n
	if r.Servers["B"] != n || r.Failures != 0 {
		t.Errorf("load: answers %v, %d failures (%s); want all %d from B", r.Servers, r.Failures, r.Detail, n)
	}

	st := e.status()
	if got, want := st.Pipeline.Verdicts["reroute-split"], uint64(splitTCP+splitUDP); got != want {
		t.Errorf("pipeline reroute-split verdicts = %d, want exactly one per split flow = %d", got, want)
	}
	if n := st.Pipeline.Verdicts["accept-final"]; n != 0 {
		t.Errorf("%d own (accept-final) decisions: the proxy's upstream traffic reached the queue", n)
	}
	if st.Pipeline.Failures != 0 || st.Pipeline.LateDecisions != 0 {
		t.Errorf("pipeline failures %d, late decisions %d", st.Pipeline.Failures, st.Pipeline.LateDecisions)
	}
	for _, c := range e.conns() {
		if c.Protocol != "tcp" && c.Protocol != "udp" {
			continue
		}
		if strings.HasPrefix(c.Local, sandbox.ClientBV4.String()+":") || strings.HasPrefix(c.Local, "["+sandbox.ClientBV6.String()+"]:") {
			t.Errorf("the proxy's upstream connection was queued and tracked: %+v", c)
		}
	}
	// The daemon attributes the app agent's connections to its process.
	attributed := 0
	for _, c := range e.conns() {
		if c.Rule == "split-app" {
			attributed++
			if c.App != appExe || c.PID != int32(app.PID()) || c.Verdict != "reroute-split-permanent" {
				t.Errorf("split-app connection %+v; want app %s, pid %d, reroute-split-permanent", c, appExe, app.PID())
			}
		}
	}
	if attributed != 4 {
		t.Errorf("%d connections decided by split-app, want 4 (TCP and UDP, IPv4 and IPv6)", attributed)
	}
	if a := st.Attribution; a == nil || a.MapAnswers+a.ProcAnswers < 4 {
		t.Errorf("status attribution %+v: want at least the app agent's 4 lookups answered", a)
	}
	// explain --online answers from the running policy.
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"--proto", "tcp", "--remote", sandbox.ServiceV4.String(), "--port", "8080"}, `{"action":"split","rule":"split-port","via":"ub"}`},
		{[]string{"--proto", "udp", "--remote", sandbox.ServiceV6.String(), "--port", "4000", "--app", appExe}, `{"action":"split","rule":"split-app","via":"ub"}`},
		{[]string{"--proto", "tcp", "--remote", sandbox.ServiceV4.String(), "--port", "80"}, `{"action":"allow","rule":"","via":""}`},
	} {
		out := e.cli(append([]string{"explain", "--online", "--json"}, c.args...)...)
		if got := strings.Join(strings.Fields(out), ""); got != c.want {
			t.Errorf("explain --online %v = %s, want %s", c.args, got, c.want)
		}
	}

	sp := e.split(st)
	if !sp.Interface.Up || sp.Interface.Interface.Name != sandbox.UplinkB || sp.OnInterfaceDown != "block" || sp.Mode != mode {
		t.Errorf("split interface in status: %+v", sp)
	}
	relayed, routed := [2]uint64{sp.TCP.Total, sp.UDP.Total}, [2]uint64{sp.TCP.Routed, sp.UDP.Routed}
	want, none := [2]uint64{uint64(splitTCP), uint64(splitUDP)}, [2]uint64{}
	if mode == "route" {
		relayed, routed = routed, relayed
	}
	if running := ipRules(t, e.top.Client); mode == "route" && !strings.Contains(running, "lookup 1728") {
		t.Errorf("route mode: no policy routing rule for route 1 while running:\n%s", running)
	}
	if relayed != want || routed != none {
		t.Errorf("%s mode: carried tcp/udp %v, the other carrier %v; want %v and none", mode, relayed, routed, want)
	}
	if want := map[bool]uint64{true: uint64(splitTCP)}[handoff]; sp.TCP.HandedOff != want {
		t.Errorf("%d tcp downloads handed off to the application's socket, want %d", sp.TCP.HandedOff, want)
	}
	if sp.TCP.Unresolved+sp.UDP.Unresolved+sp.TCP.DialErrors+sp.UDP.DialErrors+sp.TCP.Rejected+sp.UDP.Rejected != 0 {
		t.Errorf("proxy errors: %+v %+v", sp.TCP, sp.UDP)
	}
	if out := e.cli("status"); !strings.Contains(out, "split tunnel") || !strings.Contains(out, "ub (up;") {
		t.Errorf("status does not show the split interface up:\n%s", out)
	}

	// B goes down: split connections are refused at once (not sent through A, not left hanging); others
	// still work.
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := e.top.SetUplink(ctx, sandbox.UplinkB, false); err != nil {
		t.Fatal(err)
	}
	e.waitStatus("the split interface to be down", func(st control.Status) bool { return !e.split(st).Interface.Up })
	for _, dst := range []string{hp(sandbox.ServiceV4, 8080), hp(sandbox.ServiceV6, 8080)} {
		r := call(t, e.client, tcpReq(dst))
		expectOutcome(t, "tcp "+dst+" with B down (block)", r, sandbox.Refused)
		if r.Elapsed > time.Second {
			t.Errorf("refusing took %v", r.Elapsed)
		}
	}
	// A UDP flow from a fixed port: blocked while B is down, and the same flow (its conntrack entry still
	// alive) reaches B once B is back, because the daemon re-evaluates live connections on the change.
	flowSrc := netip.AddrPortFrom(sandbox.ClientAV4, 45719).String()
	udpFlow := sandbox.Request{Op: "udp", Src: flowSrc, Dst: hp(sandbox.ServiceV4, 8080), Connect: true, TimeoutMS: 500}
	r = call(t, e.client, udpFlow)
	if r.Server != "" {
		t.Errorf("udp with B down (block): answered by %s", r.Server)
	}
	expectServer(t, "tcp :80 with B down", call(t, e.client, tcpReq(hp(sandbox.ServiceV4, 80))), "A")
	st = e.status()
	if sp := e.split(st); sp.TCP.Refused < 2 {
		t.Errorf("proxy refused_interface_down = %d, want ≥ 2", sp.TCP.Refused)
	}
	if out := e.cli("status"); !strings.Contains(out, "down; when down: block") {
		t.Errorf("status does not show the split interface down:\n%s", out)
	}

	changes := e.split(e.status()).InterfaceChanges
	if err := e.top.SetUplink(ctx, sandbox.UplinkB, true); err != nil {
		t.Fatal(err)
	}
	e.waitStatus("the split interface to be up and followed", func(st control.Status) bool {
		sp := e.split(st)
		return sp.Interface.Up && sp.InterfaceChanges > changes
	})
	udpFlow.TimeoutMS = 3000
	expectServer(t, "the udp flow blocked while B was down, B back", call(t, e.client, udpFlow), "B")

	if _, err := d.Stop(10 * time.Second); err != nil {
		t.Fatal(err)
	}
	if after := ipRules(t, e.top.Client); after != rulesBefore {
		t.Errorf("ip rules and split route tables after stop differ from before start:\n--- before\n%s--- after\n%s", rulesBefore, after)
	}
}

// ipRules returns ns's policy routing rules and the contents of Warden's split route tables (IPv4 and IPv6).
func ipRules(t *testing.T, ns string) string {
	t.Helper()
	var b strings.Builder
	for _, fam := range []string{"-4", "-6"} {
		for _, args := range [][]string{{"rule", "show"}, {"route", "show", "table", "all"}} {
			out, err := exec.Command("ip", append([]string{"-n", ns, fam}, args...)...).CombinedOutput()
			if err != nil {
				t.Fatalf("ip %v: %v: %s", args, err, out)
			}
			for line := range strings.SplitSeq(string(out), "\n") {
				// Only what Warden could own: rules of priority 1728-1743 and routes in those tables.
				if strings.HasPrefix(line, "17") || strings.Contains(line, "table 17") {
					b.WriteString(fam + " " + line + "\n")
				}
			}
		}
	}
	return b.String()
}

// TestSplitInterfaceDownDirect: with on_interface_down: direct, split connections go out through A while B is
// down, and through B again once it is back.
func TestSplitInterfaceDownDirect(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.writeConfig(splitConfigFor("/nonexistent/app", "direct", "auto", false))
	e.startDaemon()
	dst4, dst6 := hp(sandbox.ServiceV4, 8080), hp(sandbox.ServiceV6, 8080)
	expectServer(t, "tcp split, B up", call(t, e.client, tcpReq(dst4)), "B")

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := e.top.SetUplink(ctx, sandbox.UplinkB, false); err != nil {
		t.Fatal(err)
	}
	e.waitStatus("the split interface to be down", func(st control.Status) bool { return !e.split(st).Interface.Up })
	expectServer(t, "tcp split v4, B down (direct)", call(t, e.client, tcpReq(dst4)), "A")
	expectServer(t, "tcp split v6, B down (direct)", call(t, e.client, tcpReq(dst6)), "A")
	expectServer(t, "udp split, B down (direct)", call(t, e.client, udpReq(dst4)), "A")
	if sp := e.split(e.status()); sp.TCP.Direct < 2 || sp.UDP.Direct < 1 || sp.OnInterfaceDown != "direct" {
		t.Errorf("proxy direct counters: tcp %d, udp %d (%s)", sp.TCP.Direct, sp.UDP.Direct, sp.OnInterfaceDown)
	}

	if err := e.top.SetUplink(ctx, sandbox.UplinkB, true); err != nil {
		t.Fatal(err)
	}
	e.waitStatus("the split interface to be up", func(st control.Status) bool { return e.split(st).Interface.Up })
	expectServer(t, "tcp split, B back", call(t, e.client, tcpReq(dst4)), "B")
}

// TestSplitRouteRestored: in route mode, another program deleting Warden's ip rules (which would send split
// connections out of the default uplink) has them put back within seconds, and split connections leave
// through B again.
func TestSplitRouteRestored(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.writeConfig(splitConfigFor("/nonexistent", "block", "route", false))
	e.startDaemon()
	dst := hp(sandbox.ServiceV4, 8080)
	expectServer(t, "split before", call(t, e.client, tcpReq(dst)), "B")
	installed := ipRules(t, e.top.Client)
	if !strings.Contains(installed, "fwmark") {
		t.Fatalf("no split ip rule installed:\n%s", installed)
	}
	for _, fam := range []string{"-4", "-6"} {
		out, err := exec.Command("ip", "-n", e.top.Client, fam, "rule", "del", "fwmark", "0x6c0", "lookup", "1728").CombinedOutput()
		if err != nil {
			t.Fatalf("deleting the %s rule: %v: %s", fam, err, out)
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for ipRules(t, e.top.Client) != installed {
		if time.Now().After(deadline) {
			t.Fatalf("ip rules not restored in 10 s:\n--- installed\n%s--- now\n%s", installed, ipRules(t, e.top.Client))
		}
		time.Sleep(100 * time.Millisecond)
	}
	expectServer(t, "split after the repair", call(t, e.client, tcpReq(dst)), "B")
}

// TestSplitRouteSNATFollowsRules: in route mode the source NAT of routed split connections is installed only
// while a rule splits (every other new connection would pay for an empty NAT binding): none at start without
// split rules, a reload that brings one installs it before the first routed connection, which reaches B, and a
// reload that takes the last one away removes it.
func TestSplitRouteSNATFollowsRules(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	const tunnel = "split_tunnel:\n  interface: ub\n  mode: route\n"
	e.writeConfig(tunnel)
	e.startDaemon()
	snat := func() bool {
		t.Helper()
		out, err := exec.Command("ip", "netns", "exec", e.top.Client, "iptables-save", "-t", "nat").CombinedOutput()
		if err != nil {
			t.Fatalf("iptables-save: %v: %s", err, out)
		}
		return strings.Contains(string(out), "-A POSTROUTING -j WARDEN-SPLIT-SNAT")
	}
	split := hp(sandbox.ServiceV4, 8080)
	if snat() {
		t.Error("source NAT installed at start without a split rule")
	}
	expectServer(t, "tcp :8080 before any split rule", call(t, e.client, tcpReq(split)), "A")

	e.writeConfig("rules:\n  - name: split-port\n    action: split\n    ports: [8080]\n    via: ub\n" + tunnel)
	e.cli("reload")
	if !snat() {
		t.Error("no source NAT after a reload brought a split rule")
	}
	expectServer(t, "tcp :8080 split by the reloaded rule", call(t, e.client, tcpReq(split)), "B")

	e.writeConfig(tunnel)
	e.cli("reload")
	if snat() {
		t.Error("source NAT still installed after the last split rule went")
	}
	expectServer(t, "tcp :8080 after the split rule went", call(t, e.client, tcpReq(split)), "A")
}
