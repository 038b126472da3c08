package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"slices"
)

// Pooling: one run's ratio moves by 0.05-0.1 on a shared host, so the documented figures pool the repetitions
// of several runs of the same code. --pool does that from the runs' --out files, so that those figures can be
// recomputed by anyone from the files alone, with the same ratios and targets as a single run.

// poolReports reads the reports at paths and returns one report whose results hold every repetition of all of
// them: each rate's median is taken over the concatenated repetitions, so the ratios are those of the pooled
// medians, and the per-repetition ratios stay paired (each file's repetitions ran side by side). The p99 is
// pooled the same way when every file kept its repetitions' p99s (since session 15). The other per-run costs
// and latencies (p50, machine and firewall time, switches) are kept only as medians in the files: their pooled
// value is the median of the runs' medians. Runs measured with other parameters, or interrupted,
// are refused; a workload and configuration missing from any file is left out.
func poolReports(paths []string, warn io.Writer) (*Report, error) {
	if len(paths) < 2 {
		return nil, errors.New("--pool needs at least two result files")
	}
	reps := make([]*Report, len(paths))
	for i, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			return nil, err
		}
		var r Report
		if err := json.Unmarshal(b, &r); err != nil {
			return nil, fmt.Errorf("%s: not a wardenbench result file: %w", p, err)
		}
		if len(r.Results) == 0 {
			return nil, fmt.Errorf("%s: no results", p)
		}
		if r.Partial {
			return nil, fmt.Errorf("%s: an interrupted run (partial results) cannot be pooled", p)
		}
		if i > 0 {
			if err := samePlan(reps[0].Method, r.Method); err != nil {
				return nil, fmt.Errorf("%s and %s measured differently: %w", paths[0], p, err)
			}
		}
		reps[i] = &r
	}

	out := &Report{Machine: reps[0].Machine, Method: reps[0].Method, Ratios: map[string]float64{}}
	out.Machine.LoadEnd = reps[len(reps)-1].Machine.LoadEnd
	out.Method.Reps = 0
	out.Method.PooledFrom = slices.Clone(paths)
	for _, r := range reps {
		out.Method.Reps += r.Method.Reps
	}
	for _, first := range reps[0].Results {
		parts := make([]Result, 0, len(reps))
		for _, r := range reps {
			if res, ok := find(r.Results, first.Workload, first.Config); ok {
				parts = append(parts, res)
			}
		}
		if len(parts) < len(reps) {
			fmt.Fprintf(warn, "wardenbench: %s %s is not in every file; left out\n", first.Workload, first.Config)
			continue
		}
		out.Results = append(out.Results, poolResult(parts))
	}
	if err := checkPairing(paths, reps, out.Results); err != nil {
		return nil, err
	}
	out.Ratios, out.Targets = ratios(out.Results)
	return out, nil
}

// samePlan reports how two runs' parameters differ in a way that changes what a repetition measures.
func samePlan(a, b Method) error {
	switch {
	case a.Quick != b.Quick:
		return errors.New("--quick differs")
	case a.DurationMS != b.DurationMS:
		return fmt.Errorf("run length %d ms against %d ms", a.DurationMS, b.DurationMS)
	case a.Clients != b.Clients:
		return fmt.Errorf("%d clients against %d", a.Clients, b.Clients)
	case a.LatencyRate != b.LatencyRate:
		return fmt.Errorf("latency rate %d/s against %d/s", a.LatencyRate, b.LatencyRate)
	case a.Rules != b.Rules:
		return fmt.Errorf("%d rules against %d", a.Rules, b.Rules)
	case a.MemFlows != b.MemFlows:
		return fmt.Errorf("%d memory flows against %d", a.MemFlows, b.MemFlows)
	case a.NoAppRules != b.NoAppRules:
		return errors.New("--no-app-rules differs")
	}
	return nil
}

// poolResult merges one workload and configuration's results from several runs.
func poolResult(parts []Result) Result {
	r := Result{Workload: parts[0].Workload, Config: parts[0].Config, Unit: parts[0].Unit}
	var busy, stolen []float64
	var p50, p99, machine, fw, switches []*float64
	everyP99 := true // every run kept a p99 for each of its repetitions
	for _, p := range parts {
		everyP99 = everyP99 && len(p.P99Runs) == len(p.Runs)
		r.Runs = append(r.Runs, p.Runs...)
		r.P99Runs = append(r.P99Runs, p.P99Runs...)
		r.Errors += p.Errors
		r.QueueDrops += p.QueueDrops
		r.StealRepeats += p.StealRepeats
		busy = append(busy, p.CPUBusy)
		stolen = append(stolen, p.Stolen)
		p50, p99 = append(p50, p.P50), append(p99, p.P99)
		machine, fw, switches = append(machine, p.MachineUS), append(fw, p.FirewallCPUUS), append(switches, p.MachineSwitches)
	}
	r.Value = round(median(r.Runs))
	r.CPUBusy = math.Round(median(busy)*100) / 100
	r.Stolen = math.Round(median(stolen)*1000) / 1000
	r.P50, r.P99 = medianOfSet(p50), medianOfSet(p99)
	if everyP99 && len(r.P99Runs) > 0 {
		// Their median over all repetitions, as for the rate.
		v := round(median(r.P99Runs))
		r.P99 = &v
	} else {
		// The p99 is then the median of the runs' medians; an interval from the runs that kept their
		// repetitions' p99s would describe other repetitions than that value.
		r.P99Runs = nil
	}
	r.MachineUS, r.FirewallCPUUS, r.MachineSwitches = medianOfSet(machine), medianOfSet(fw), medianOfSet(switches)
	return r
}

// medianOfSet is the rounded median of the values that are set, or nil when none is.
func medianOfSet(ps []*float64) *float64 {
	var xs []float64
	for _, p := range ps {
		if p != nil {
			xs = append(xs, *p)
		}
	}
	return medianOrNil(xs)
}

// checkPairing refuses a pool whose per-repetition ratios would pair repetitions of different runs: within one
// workload, every configuration must have as many repetitions in each file.
func checkPairing(paths []string, reps []*Report, pooled []Result) error {
	for i, r := range reps {
		counts := map[string]int{}
		for _, p := range pooled {
			res, _ := find(r.Results, p.Workload, p.Config)
			if n, ok := counts[p.Workload]; ok && n != len(res.Runs) {
				return fmt.Errorf("%s: the configurations of %s have different numbers of repetitions", paths[i], p.Workload)
			}
			counts[p.Workload] = len(res.Runs)
		}
	}
	return nil
}
