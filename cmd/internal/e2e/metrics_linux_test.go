package e2e

import (
	"bufio"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/warden-fw/warden/cmd/internal/sandbox"
)

// samples maps a series (name plus labels, as the text format writes them) to its value.
type samples map[string]float64

// parseMetrics reads the Prometheus text format: every line that is not a comment is "series value".
func parseMetrics(t *testing.T, body string) samples {
	t.Helper()
	s := samples{}
	sc := bufio.NewScanner(strings.NewReader(body))
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			t.Fatalf("bad metrics line %q", line)
		}
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			t.Fatalf("bad metrics line %q: %v", line, err)
		}
		s[line[:i]] = v
	}
	return s
}

// need returns a series' value and fails the test if it is missing.
func (s samples) need(t *testing.T, series string) float64 {
	t.Helper()
	v, ok := s[series]
	if !ok {
		t.Fatalf("metrics: no series %s", series)
	}
	return v
}

// sum adds every series of a metric name (all label sets).
func (s samples) sum(name string) float64 {
	var n float64
	for k, v := range s {
		if k == name || strings.HasPrefix(k, name+"{") {
			n += v
		}
	}
	return n
}

// TestMetrics: /metrics exposes the documented series with values that match the traffic: packets, verdicts
// by kind, a decision-latency histogram with one observation per decided connection, tracked connections,
// and config reloads.
func TestMetrics(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.writeConfig(noTelnet + `
  - name: drop-5000
    action: drop
    protocol: udp
    ports: [5000]
metrics:
  listen: 127.0.0.1:9717
`)
	e.startDaemon()
	const allowed, blocked, dropped = 3, 2, 2
	for range allowed {
		expectServer(t, "allowed", call(t, e.client, tcpReq(hp(sandbox.ServiceV4, 80))), "A")
	}
	for range blocked {
		expectOutcome(t, "blocked", call(t, e.client, tcpReq(hp(sandbox.ServiceV4, 23))), sandbox.Refused)
	}
	for range dropped {
		r := call(t, e.client, sandbox.Request{Op: "udp", Dst: hp(sandbox.ServiceV4, 5000), Connect: true, TimeoutMS: 300})
		expectOutcome(t, "dropped", r, sandbox.TimedOut)
	}

	// Scraped from inside the namespace; the agent keeps its HTTP connection, so later scrapes add no new
	// connection. A decision is counted just after its verdict is applied, and the kernel's neighbour discovery
	// adds connections of its own now and then, so scrape until the counters agree with each other and with
	// `warden conns` listed just before and just after (bounded).
	scrape := func() samples {
		r := call(t, e.client, sandbox.Request{Op: "http", URL: "http://127.0.0.1:9717/metrics"})
		if r.Outcome != sandbox.Connected || r.Status != 200 {
			t.Fatalf("scraping /metrics: %s %d %s", r.Outcome, r.Status, r.Detail)
		}
		return parseMetrics(t, r.Body)
	}
	stable := func() samples {
		var m samples
		var before, after int
		for range 30 {
			before = len(e.conns())
			m = scrape()
			after = len(e.conns())
			n := m["warden_decision_latency_seconds_count"]
			if float64(before) == n && float64(after) == n && m["warden_tracked_connections"] == n {
				return m
			}
			time.Sleep(100 * time.Millisecond)
		}
		t.Fatalf("metrics never agreed with themselves and warden conns: conns %d then %d; latency count %v, tracked %v",
			before, after, m["warden_decision_latency_seconds_count"], m["warden_tracked_connections"])
		return nil
	}
	m := stable()

	if got := m.need(t, `warden_verdicts_total{verdict="block"}`); got != blocked {
		t.Errorf("block verdicts %v, want %d", got, blocked)
	}
	if got := m.need(t, `warden_verdicts_total{verdict="drop"}`); got != dropped {
		t.Errorf("drop verdicts %v, want %d", got, dropped)
	}
	// Accepts: ours, the scrape's own connection, and neighbour discovery.
	if got := m.need(t, `warden_verdicts_total{verdict="accept"}`); got < allowed+1 {
		t.Errorf("accept verdicts %v, want ≥ %d", got, allowed+1)
	}
	decided := m.need(t, "warden_decision_latency_seconds_count")
	if decided < allowed+blocked+dropped+1 {
		t.Errorf("decision latency count %v, want ≥ %d", decided, allowed+blocked+dropped+1)
	}
	// (stable checked that the histogram counts one observation per tracked connection, as conns lists them.)
	if got := m.sum("warden_connections_decided_total"); got != decided {
		t.Errorf("warden_connections_decided_total sums to %v, want %v", got, decided)
	}
	if got := m.sum("warden_verdicts_total"); got != decided {
		t.Errorf("verdicts sum to %v; every decided connection here took one packet, want %v", got, decided)
	}
	if p := m.need(t, "warden_packets_total"); p < decided {
		t.Errorf("warden_packets_total %v < %v decided connections", p, decided)
	}
	if s := m.need(t, "warden_decision_latency_seconds_sum"); s <= 0 || s > decided*3 {
		t.Errorf("decision latency sum %vs for %v decisions", s, decided)
	}
	if inf := m.need(t, `warden_decision_latency_seconds_bucket{le="+Inf"}`); inf != decided {
		t.Errorf("+Inf bucket %v, want %v", inf, decided)
	}
	for _, z := range []string{"warden_decision_failures_total", "warden_queue_overruns_total", "warden_verdict_timeouts_total",
		`warden_split_routed_total{protocol="tcp"}`, `warden_split_routed_total{protocol="udp"}`, "warden_split_handed_off_total", "warden_split_bulk_gathers_total"} {
		if v := m.need(t, z); v != 0 {
			t.Errorf("%s = %v, want 0", z, v)
		}
	}
	if v := m.need(t, "warden_split_interface_up"); v != 1 {
		t.Errorf("warden_split_interface_up = %v, want 1 (auto picks uplink A)", v)
	}
	if _, ok := m[`warden_config_reloads_total{result="ok"}`]; ok {
		t.Error("a reload counted before any reload")
	}

	e.cli("reload")
	m = scrape()
	if got := m.need(t, `warden_config_reloads_total{result="ok"}`); got != 1 {
		t.Errorf("warden_config_reloads_total{result=\"ok\"} = %v after one reload", got)
	}
}
