package main

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// poolRun is a small run's report: tcp_connect for the bare consumer and Warden with the given repetitions,
// and a machine time per connection.
func poolRun(bare, warden []float64, machineW, machineB float64) *Report {
	f := func(v float64) *float64 { return &v }
	rs := []Result{
		{Workload: wlTCPConnect, Config: cfgBare, Unit: "conn/s", Runs: bare, Value: median(bare), MachineUS: f(machineB), Errors: 1},
		{Workload: wlTCPConnect, Config: cfgWarden, Unit: "conn/s", Runs: warden, Value: median(warden), MachineUS: f(machineW)},
	}
	m, ts := ratios(rs)
	return &Report{Method: Method{Reps: len(bare), DurationMS: 2000, Clients: 8, LatencyRate: 2000, Rules: 1000},
		Results: rs, Ratios: m, Targets: ts}
}

func writeRun(t *testing.T, dir, name string, r *Report) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := writeJSON(p, r); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestPoolReports(t *testing.T) {
	dir := t.TempDir()
	// Run one alone misses the target (900/1000), run two alone meets it (1000/1000 and 950/1000): pooled,
	// the medians of all six repetitions decide (Warden 950, bare 1000: 0.95).
	a := writeRun(t, dir, "a.json", poolRun([]float64{1000, 1000}, []float64{900, 900}, 110, 100))
	b := writeRun(t, dir, "b.json", poolRun([]float64{1000, 1000, 1000, 1000}, []float64{1000, 950, 950, 1000}, 130, 100))
	var warn bytes.Buffer
	rep, err := poolReports([]string{a, b}, &warn)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Method.Reps != 6 || !cmp.Equal(rep.Method.PooledFrom, []string{a, b}) {
		t.Errorf("method: %d repetitions from %v, want 6 from both files", rep.Method.Reps, rep.Method.PooledFrom)
	}
	w, _ := find(rep.Results, wlTCPConnect, cfgWarden)
	if diff := cmp.Diff([]float64{900, 900, 1000, 950, 950, 1000}, w.Runs); diff != "" {
		t.Errorf("Warden's pooled repetitions (-want +got):\n%s", diff)
	}
	if w.Value != 950 || *w.MachineUS != 120 {
		t.Errorf("Warden pooled: %v conn/s, %v µs per connection; want the median of all repetitions (950) and of the runs' medians (120)", w.Value, *w.MachineUS)
	}
	if b, _ := find(rep.Results, wlTCPConnect, cfgBare); b.Errors != 2 {
		t.Errorf("errors %d, want both runs' (2)", b.Errors)
	}
	if got := rep.Ratios["warden_vs_bare_tcp_connect"]; got != 0.95 {
		t.Errorf("pooled ratio %v, want 0.95", got)
	}
	var tgt Target
	for _, x := range rep.Targets {
		if x.Ratio == "warden_vs_bare_tcp_connect" {
			tgt = x
		}
	}
	if !tgt.Met || !cmp.Equal(tgt.PairedRuns, []float64{0.9, 0.9, 1, 0.95, 0.95, 1}) {
		t.Errorf("target %+v: want met, with each repetition paired with its own run's", tgt)
	}
	if warn.Len() != 0 {
		t.Errorf("unexpected warnings: %s", warn.String())
	}
}

func TestPoolRefuses(t *testing.T) {
	dir := t.TempDir()
	good := writeRun(t, dir, "good.json", poolRun([]float64{1, 1}, []float64{1, 1}, 1, 1))
	longer := poolRun([]float64{1, 1}, []float64{1, 1}, 1, 1)
	longer.Method.DurationMS = 3000
	partial := poolRun([]float64{1, 1}, []float64{1, 1}, 1, 1)
	partial.Partial = true
	unpaired := poolRun([]float64{1, 1}, []float64{1, 1, 1}, 1, 1)
	if err := os.WriteFile(filepath.Join(dir, "junk.json"), []byte("not json"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name, path, want string
	}{
		{"another run length", writeRun(t, dir, "longer.json", longer), "run length"},
		{"an interrupted run", writeRun(t, dir, "partial.json", partial), "interrupted"},
		{"unpaired repetitions", writeRun(t, dir, "unpaired.json", unpaired), "different numbers of repetitions"},
		{"not a result file", filepath.Join(dir, "junk.json"), "not a wardenbench result file"},
		{"a missing file", filepath.Join(dir, "none.json"), "no such file"},
	} {
		if _, err := poolReports([]string{good, c.path}, &bytes.Buffer{}); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: error %v, want one saying %q", c.name, err, c.want)
		}
	}
	if _, err := poolReports([]string{good}, &bytes.Buffer{}); err == nil {
		t.Error("one file: no error")
	}
}

// A workload one run did not measure is left out of the pool, and the report says so.
func TestPoolLeavesOutWhatOneRunLacks(t *testing.T) {
	dir := t.TempDir()
	withBulk := poolRun([]float64{1, 1}, []float64{1, 1}, 1, 1)
	withBulk.Results = append(withBulk.Results, Result{Workload: wlBulk, Config: cfgKernel, Unit: "MB/s", Runs: []float64{2000, 2000}, Value: 2000})
	a := writeRun(t, dir, "a.json", withBulk)
	b := writeRun(t, dir, "b.json", poolRun([]float64{1, 1}, []float64{1, 1}, 1, 1))
	var warn bytes.Buffer
	rep, err := poolReports([]string{a, b}, &warn)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := find(rep.Results, wlBulk, cfgKernel); ok || !strings.Contains(warn.String(), "tcp_bulk kernel is not in every file") {
		t.Errorf("bulk in the pool: %v; warning %q", ok, warn.String())
	}
}

func TestPoolFlags(t *testing.T) {
	o, err := parseFlags([]string{"--pool", "a.json, b.json", "--out", "p.json"}, &bytes.Buffer{})
	if err != nil || !cmp.Equal(o.pool, []string{"a.json", "b.json"}) || o.out != "p.json" {
		t.Fatalf("--pool a.json, b.json --out p.json: %+v, %v", o, err)
	}
	if _, err := parseFlags([]string{"--pool", "a.json,b.json", "--reps", "4"}, &bytes.Buffer{}); err == nil {
		t.Error("--pool with --reps: no error")
	}
	// The JSON a pool writes reads back as a report with the files it came from.
	dir := t.TempDir()
	a := writeRun(t, dir, "a.json", poolRun([]float64{1, 1}, []float64{1, 1}, 1, 1))
	b := writeRun(t, dir, "b.json", poolRun([]float64{1, 1}, []float64{1, 1}, 1, 1))
	out := filepath.Join(dir, "pooled.json")
	var stdout bytes.Buffer
	if err := runPool(&options{pool: []string{a, b}, out: out}, &stdout, &bytes.Buffer{}); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(stdout.String(), "Pooled: 4 repetitions") || !strings.Contains(stdout.String(), "warden_vs_bare_tcp_connect") {
		t.Errorf("table:\n%s", stdout.String())
	}
	raw, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	var rep Report
	if err := json.Unmarshal(raw, &rep); err != nil || len(rep.Method.PooledFrom) != 2 || rep.Method.Reps != 4 {
		t.Errorf("written report: %+v, %v", rep.Method, err)
	}
}

// The repetitions' own p99s pool like the rates: their median over every repetition, and an interval, once each
// file kept them; a file from before they were kept leaves the p99 as the median of the runs' medians.
func TestPoolP99Repetitions(t *testing.T) {
	dir := t.TempDir()
	f := func(v float64) *float64 { return &v }
	run := func(bareP99, wardenP99 []float64) *Report {
		r := poolRun([]float64{1000, 1000, 1000}, []float64{950, 950, 950}, 1, 1)
		r.Results = append(r.Results,
			Result{Workload: wlLatency, Config: cfgBare, Unit: "us (p50)", Runs: []float64{50, 50, 50}, Value: 50,
				P50: f(50), P99: f(median(bareP99)), P99Runs: bareP99},
			Result{Workload: wlLatency, Config: cfgWarden, Unit: "us (p50)", Runs: []float64{60, 60, 60}, Value: 60,
				P50: f(60), P99: f(median(wardenP99)), P99Runs: wardenP99})
		return r
	}
	a := writeRun(t, dir, "a.json", run([]float64{100, 100, 100}, []float64{170, 180, 190}))
	b := writeRun(t, dir, "b.json", run([]float64{100, 100, 100}, []float64{200, 210, 220}))
	rep, err := poolReports([]string{a, b}, &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	// All six Warden p99s: 170 180 190 200 210 220, median 195.
	w, _ := find(rep.Results, wlLatency, cfgWarden)
	if *w.P99 != 195 || len(w.P99Runs) != 6 {
		t.Errorf("pooled Warden p99 %v from %v", *w.P99, w.P99Runs)
	}
	c := writeRun(t, dir, "c.json", run([]float64{100, 100, 100}, []float64{300, 300, 300}))
	rep, err = poolReports([]string{a, b, c}, &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	// Nine p99s, median 210, each at least 1.7 times the bare consumer's: the interval lies above 1.5.
	var tgt Target
	for _, x := range rep.Targets {
		if x.Ratio == "warden_vs_bare_connect_p99" {
			tgt = x
		}
	}
	if tgt.Value != 2.1 || len(tgt.Interval) != 2 || tgt.Interval[0] > 2.1 || tgt.Interval[1] < 2.1 || !tgt.Settled || tgt.Met {
		t.Errorf("p99 target %+v: want 2.1 with an interval around it, a settled miss of <= 1.5", tgt)
	}
	old := run([]float64{100, 100, 100}, []float64{170, 180, 190})
	for i := range old.Results {
		old.Results[i].P99Runs = nil
	}
	oldPath := writeRun(t, dir, "old.json", old)
	rep, err = poolReports([]string{oldPath, c}, &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	// Pooled over all repetitions it would be 245 (170 180 190 300 300 300); the runs' medians give 240.
	if w, _ := find(rep.Results, wlLatency, cfgWarden); *w.P99 != 240 {
		t.Errorf("with a file that kept no p99s: %v, want the median of the runs' medians (180, 300: 240)", *w.P99)
	}
	// The interval must describe the same repetitions as the value: from b's and c's alone (six pairs, enough
	// for one) it would claim a precision the pooled median of medians does not have.
	rep, err = poolReports([]string{oldPath, b, c}, &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	for _, x := range rep.Targets {
		if x.Ratio == "warden_vs_bare_connect_p99" && (x.Interval != nil || x.Settled) {
			t.Errorf("p99 target with a file that kept no p99s: %+v, want no interval", x)
		}
	}
}
