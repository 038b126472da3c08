package main

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/warden-fw/warden/backend"
	"github.com/warden-fw/warden/config"
	"github.com/warden-fw/warden/firewall"
)

func TestMain(m *testing.M) {
	// Re-executed as a child inside a namespace (the harness runs os.Executable(), here the test binary).
	if os.Getenv(childEnv) != "" && len(os.Args) > 1 && strings.HasPrefix(os.Args[1], "_") {
		os.Exit(childMain(os.Args[1], os.Args[2:]))
	}
	// Re-executed as the whole command (the interrupt test).
	if args, ok := os.LookupEnv(mainArgsEnv); ok {
		os.Args = append([]string{"wardenbench"}, strings.Fields(args)...)
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

const mainArgsEnv = "WARDENBENCH_TEST_MAIN_ARGS"

func compilePolicy(t *testing.T, yaml string) *firewall.Policy {
	t.Helper()
	p := filepath.Join(t.TempDir(), "warden.yaml")
	if err := os.WriteFile(p, []byte(yaml), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Load(p)
	if err != nil {
		t.Fatalf("generated config does not load: %v", err)
	}
	pol, err := firewall.Compile(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return pol
}

// TestPolicyAllowsBenchmarkTraffic proves the generated policy is valid, has the requested size, needs what a
// realistic policy needs, and lets every connection the benchmark makes through (or splits it, for the proxy).
func TestPolicyAllowsBenchmarkTraffic(t *testing.T) {
	exe, _ := os.Executable()
	for _, noApps := range []bool{false, true} {
		pol := compilePolicy(t, wardenConfig(policyParams{Socket: "/run/wb.sock", SplitRemote: serviceAddr.String(),
			SplitVia: "ub", Rules: 1000, NoApps: noApps}))
		if pol.Len() != 1000 {
			t.Errorf("noApps=%v: %d rules, want 1000", noApps, pol.Len())
		}
		if pol.NeedsProcess == noApps || !pol.NeedsInterface {
			t.Errorf("noApps=%v: NeedsProcess=%v NeedsInterface=%v", noApps, pol.NeedsProcess, pol.NeedsInterface)
		}
		for _, app := range []string{"", exe, "/usr/local/bin/wardenbench"} {
			for _, proto := range []backend.Protocol{backend.TCP, backend.UDP} {
				for _, port := range []uint16{portBulk, portTCPFirst, portTCPFirst + 3, portUDPFirst, portUDPFirst + 3} {
					for _, iface := range []string{"", "ua"} {
						q := firewall.Query{Protocol: proto, Remote: serverAddr, ServicePort: port, App: app, UID: 0, Interface: iface}
						if m := pol.Decide(&q); m.Action != config.Allow {
							t.Fatalf("noApps=%v: %+v decided %v by %q", noApps, q, m.Action, m.Name)
						}
						q.Remote = serviceAddr
						q.Interface = "ub"
						if m := pol.Decide(&q); m.Action != config.Split || m.Via != "ub" {
							t.Fatalf("noApps=%v: %+v decided %v via %q by %q, want split via ub", noApps, q, m.Action, m.Via, m.Name)
						}
					}
				}
			}
		}
	}
}

func TestPolicyDeterministic(t *testing.T) {
	p := policyParams{Socket: "/s", SplitRemote: "192.0.2.10", SplitVia: "ub", Rules: 100}
	if a, b := wardenConfig(p), wardenConfig(p); a != b {
		t.Error("two renderings of the same policy differ")
	}
}

func TestTupleDistinct(t *testing.T) {
	seen := map[[3]int]bool{}
	const n = clientAddrCount * 64000 * portSpread
	for _, i := range []uint64{0, 1, 7, 8, 9, 511999, 512000, n - 1} {
		src, sport, dport := tuple(i, portTCPFirst)
		k := [3]int{int(src[3]), sport, dport}
		if seen[k] {
			t.Fatalf("index %d repeats tuple %v", i, k)
		}
		seen[k] = true
		if sport < 1024 || sport > 65535 || dport < portTCPFirst || dport >= portTCPFirst+portSpread {
			t.Fatalf("index %d: sport %d dport %d out of range", i, sport, dport)
		}
	}
	// Connections open at the same time (consecutive indexes) never bind the same address and port.
	bound := map[[2]int]bool{}
	for i := range uint64(4096) {
		src, sport, _ := tuple(i, portUDPFirst)
		k := [2]int{int(src[3]), sport}
		if bound[k] {
			t.Fatalf("index %d binds %v again", i, k)
		}
		bound[k] = true
	}
	if src, sport, dport := tuple(n, portTCPFirst); src != clientAddrs()[0].As4() || sport != 1024 || dport != portTCPFirst {
		t.Errorf("the sequence does not wrap after %d: %v %d %d", n, src, sport, dport)
	}
}

func TestMedianAndPercentiles(t *testing.T) {
	if got := median([]float64{3, 1, 2}); got != 2 {
		t.Errorf("median odd = %v", got)
	}
	if got := median([]float64{4, 1, 3, 2}); got != 2.5 {
		t.Errorf("median even = %v", got)
	}
	xs := make([]float64, 1000)
	for i := range xs {
		xs[i] = float64(1000 - i)
	}
	if p50, p99 := percentiles(xs); p50 != 500 || p99 != 990 {
		t.Errorf("percentiles = %v, %v; want 500, 990", p50, p99)
	}
}

func TestRatiosAndTargets(t *testing.T) {
	c := newCollector()
	for _, v := range []float64{900, 1000, 1100} {
		c.add(wlTCPConnect, cfgBare, "conn/s", sample{value: v, p50: 100, p99: v / 10, machineUS: v / 5, fwUS: v / 20, switches: 6})
		c.add(wlTCPConnect, cfgWarden, "conn/s", sample{value: v * 0.8, p50: 100, p99: v / 5, machineUS: v / 4, fwUS: v * 0.06, switches: 7.5})
		// --compare: a second binary, 10 % faster with 5 % less of the firewall's time per connection.
		c.add(wlTCPConnect, cfgCompare, "conn/s", sample{value: v * 0.88, p50: 100, p99: v / 5, machineUS: v / 5, fwUS: v * 0.057})
	}
	c.add(wlBulk, cfgKernel, "MB/s", sample{value: 2000, machineUS: 700})
	c.add(wlBulk, cfgWarden, "MB/s", sample{value: 1960, machineUS: 714})
	c.add(wlLatency, cfgBare, "us (p50)", sample{value: 50, p50: 50, p99: 100})
	c.add(wlLatency, cfgWarden, "us (p50)", sample{value: 60, p50: 60, p99: 151})
	c.add(wlBytesPerCon, cfgWarden, "bytes", sample{value: 900})
	rs := c.results()
	got, targets := ratios(rs)
	want := map[string]float64{
		"warden_vs_bare_tcp_connect": 0.8,
		"warden_vs_kernel_bulk":      0.98,
		"warden_vs_bare_connect_p99": 1.51,
		"bytes_per_connection":       900,
		// Per-connection costs: medians 250 / 200 of the machine's, 60 / 50 of the firewall's.
		"warden_vs_bare_machine_per_tcp_connect":      1.25,
		"warden_vs_bare_firewall_cpu_per_tcp_connect": 1.2,
		"warden_vs_bare_switches_per_tcp_connect":     1.25,
		"warden_vs_kernel_machine_per_bulk_mb":        1.02,
		// Medians 880 / 800, 200 / 250 and 57 / 60.
		"compare_vs_warden_tcp_connect":                  1.1,
		"compare_vs_warden_machine_per_tcp_connect":      0.8,
		"compare_vs_warden_firewall_cpu_per_tcp_connect": 0.95,
	}
	if d := cmp.Diff(want, got); d != "" {
		t.Errorf("ratios (-want +got):\n%s", d)
	}
	met := map[string]bool{}
	for _, tg := range targets {
		met[tg.Ratio] = tg.Met
	}
	wantMet := map[string]bool{"warden_vs_bare_tcp_connect": false, "warden_vs_kernel_bulk": true,
		"warden_vs_bare_connect_p99": false, "bytes_per_connection": true}
	if d := cmp.Diff(wantMet, met); d != "" {
		t.Errorf("targets met (-want +got):\n%s", d)
	}
	r, _ := find(rs, wlTCPConnect, cfgWarden)
	if r.Value != 800 || *r.P99 != 200 || len(r.Runs) != 3 {
		t.Errorf("warden tcp_connect = %+v", r)
	}
	if r.MachineUS == nil || *r.MachineUS != 250 || r.FirewallCPUUS == nil || *r.FirewallCPUUS != 60 {
		t.Errorf("warden tcp_connect costs per connection: machine %v, firewall %v; want 250, 60", r.MachineUS, r.FirewallCPUUS)
	}
	if r.MachineSwitches == nil || *r.MachineSwitches != 7.5 {
		t.Errorf("warden tcp_connect context switches per connection %v, want 7.5", r.MachineSwitches)
	}
	if r, _ := find(rs, wlBulk, cfgKernel); r.P50 != nil || r.P99 != nil || r.MachineUS == nil || *r.MachineUS != 700 ||
		r.FirewallCPUUS != nil || r.MachineSwitches != nil {
		t.Errorf("bulk has latencies, or lacks its machine time per MB (700): %+v", r)
	}
	var buf bytes.Buffer
	writeTable(&buf, &Report{Results: rs, Ratios: got, Targets: targets})
	if !strings.Contains(buf.String(), "warden_vs_bare_tcp_connect") || !strings.Contains(buf.String(), "NO") {
		t.Errorf("table lacks the ratios:\n%s", buf.String())
	}
}

func TestParseFlags(t *testing.T) {
	o, err := parseFlags([]string{"--quick", "--workloads", "tcp_connect,udp_flows,tcp_connect", "--duration", "300ms"}, &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	if o.reps != 1 || o.duration != 300*time.Millisecond || o.memFlows != 20000 || o.maxSteal != 0 ||
		!cmp.Equal(o.workloads, []string{wlTCPConnect, wlUDPFlows}) {
		t.Errorf("quick options = %+v", o)
	}
	o, err = parseFlags(nil, &bytes.Buffer{})
	if err != nil || o.reps != 8 || o.duration != 2*time.Second || o.memFlows != 100000 || o.maxSteal != 0.05 ||
		len(o.workloads) != len(allWorkloads) {
		t.Errorf("default options = %+v, %v", o, err)
	}
	if o, err := parseFlags([]string{"--max-steal", "0"}, &bytes.Buffer{}); err != nil || o.maxSteal != 0 {
		t.Errorf("--max-steal 0: %+v, %v; want repeats off", o, err)
	}
	if _, err := parseFlags([]string{"--max-steal", "5"}, &bytes.Buffer{}); err == nil {
		t.Error("--max-steal 5 (a percentage, not a share) accepted")
	}
	if _, err := parseFlags([]string{"--workloads", "nope"}, &bytes.Buffer{}); err == nil {
		t.Error("an unknown workload was accepted")
	}
	if _, err := parseFlags([]string{"--profile", "/tmp/x", "--compare", "/bin/true"}, &bytes.Buffer{}); err == nil {
		t.Error("--compare with --profile accepted")
	}
	if o, _ := parseFlags([]string{"--profile", "/tmp/x"}, &bytes.Buffer{}); o.warden != "builtin" {
		t.Errorf("--profile left --warden %q", o.warden)
	}
}

// reportShape is the JSON the issue asks for.
type reportShape struct {
	Machine map[string]any `json:"machine"`
	Results []struct {
		Workload *string  `json:"workload"`
		Config   *string  `json:"config"`
		Value    *float64 `json:"value"`
		Unit     *string  `json:"unit"`
		P50      *float64 `json:"p50_us"`
		P99      *float64 `json:"p99_us"`
	} `json:"results"`
	Ratios map[string]float64 `json:"ratios"`
}

func TestReportJSONShape(t *testing.T) {
	c := newCollector()
	c.add(wlTCPConnect, cfgBare, "conn/s", sample{value: 10, p50: 1, p99: 2})
	c.add(wlTCPConnect, cfgWarden, "conn/s", sample{value: 9, p50: 1, p99: 2})
	rep := &Report{Machine: baseMachine(), Results: c.results()}
	rep.Ratios, rep.Targets = ratios(rep.Results)
	path := filepath.Join(t.TempDir(), "r.json")
	if err := writeJSON(path, rep); err != nil {
		t.Fatal(err)
	}
	checkShape(t, path, []string{cfgBare, cfgWarden}, []string{"warden_vs_bare_tcp_connect"})
}

// checkShape reads a report and checks its shape: the machine, one result per wanted configuration of
// tcp_connect with every key present, and the wanted ratios.
func checkShape(t *testing.T, path string, configs, ratioNames []string) reportShape {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(data, &raw); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"machine", "results", "ratios"} {
		if _, ok := raw[k]; !ok {
			t.Errorf("report lacks %q", k)
		}
	}
	var rep reportShape
	if err := json.Unmarshal(data, &rep); err != nil {
		t.Fatal(err)
	}
	if rep.Machine["cpus"] == nil || rep.Machine["go_version"] == nil {
		t.Errorf("machine = %v", rep.Machine)
	}
	var resultsRaw []map[string]json.RawMessage
	_ = json.Unmarshal(raw["results"], &resultsRaw)
	for _, r := range resultsRaw {
		for _, k := range []string{"workload", "config", "value", "unit", "p50_us", "p99_us"} {
			if _, ok := r[k]; !ok {
				t.Errorf("result %s lacks %q", r["workload"], k)
			}
		}
	}
	got := map[string]float64{}
	for _, r := range rep.Results {
		if r.Workload == nil || r.Config == nil || r.Value == nil || r.Unit == nil {
			t.Fatalf("incomplete result in %s", data)
		}
		if *r.Workload == wlTCPConnect {
			got[*r.Config] = *r.Value
			if r.P50 == nil || r.P99 == nil || *r.P99 < *r.P50 {
				t.Errorf("tcp_connect %s latencies p50 %v p99 %v", *r.Config, r.P50, r.P99)
			}
		}
	}
	for _, c := range configs {
		if got[c] <= 0 {
			t.Errorf("tcp_connect %s = %v, want a positive rate (results %v)", c, got[c], got)
		}
	}
	for _, k := range ratioNames {
		if rep.Ratios[k] <= 0 {
			t.Errorf("ratio %s = %v in %v", k, rep.Ratios[k], rep.Ratios)
		}
	}
	return rep
}

// Steal is reported as the median share over the runs, and the repeats it caused are summed.
func TestStealInResults(t *testing.T) {
	c := newCollector()
	c.add(wlUDPFlows, cfgWarden, "flows/s", sample{value: 10, stolen: 0.01})
	c.add(wlUDPFlows, cfgWarden, "flows/s", sample{value: 11, stolen: 0.2, stealRepeats: 2})
	c.add(wlUDPFlows, cfgWarden, "flows/s", sample{value: 12, stolen: 0.03, stealRepeats: 1})
	rs := c.results()
	if len(rs) != 1 || rs[0].Stolen != 0.03 || rs[0].StealRepeats != 3 {
		t.Errorf("results %+v; want stolen 0.03 (the median), 3 repeats", rs)
	}
	var buf bytes.Buffer
	writeTable(&buf, &Report{Results: rs})
	if !strings.Contains(buf.String(), "STOLEN") || !strings.Contains(buf.String(), "3.0%") {
		t.Errorf("table without the stolen share:\n%s", buf.String())
	}
}

// A rate target also carries each repetition's own ratio, in repetition order; the target's value stays the
// ratio of the medians.
func TestPairedRuns(t *testing.T) {
	c := newCollector()
	for _, v := range [][2]float64{{100, 90}, {80, 88}, {120, 96}} { // bare, warden per repetition
		c.add(wlUDPFlows, cfgBare, "flows/s", sample{value: v[0]})
		c.add(wlUDPFlows, cfgWarden, "flows/s", sample{value: v[1]})
	}
	_, ts := ratios(c.results())
	i := slices.IndexFunc(ts, func(t Target) bool { return t.Ratio == "warden_vs_bare_udp_flows" })
	if i < 0 {
		t.Fatalf("no UDP target in %+v", ts)
	}
	if got := ts[i]; got.Value != 0.9 || !cmp.Equal(got.PairedRuns, []float64{0.9, 1.1, 0.8}) {
		t.Errorf("target %+v; want value 0.9 (90/100) and per-repetition ratios 0.9 1.1 0.8", got)
	}
}
