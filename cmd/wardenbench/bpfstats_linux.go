package main

import (
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// bpfProgStats is one program's run count and time (the kernel's BPF run-time statistics).
type bpfProgStats struct {
	runs uint64
	time time.Duration
}

// bpfRecorder measures what Warden's attribution programs cost the applications whose system calls run them:
// with --profile it turns on the kernel's BPF run-time statistics for the profiled runs (they cost every BPF
// program on the machine two clock reads per run, which is why only profiling does it) and compares the
// counters of the programs named warden_* before and after.
type bpfRecorder struct {
	stats  io.Closer
	before map[string]bpfProgStats
}

// startBPFStats starts a recording, or returns nil when the kernel cannot keep statistics.
func (b *bench) startBPFStats() *bpfRecorder {
	c, err := ebpf.EnableStats(unix.BPF_STATS_RUN_TIME)
	if err != nil {
		b.logf("BPF run-time statistics unavailable: %v", err)
		return nil
	}
	return &bpfRecorder{stats: c, before: wardenProgStats()}
}

// finish writes, for each of Warden's programs that ran, its runs and time per operation of the workload to
// path, and returns the total time per operation.
func (r *bpfRecorder) finish(path string, ops uint64) (time.Duration, error) {
	after := wardenProgStats()
	r.stats.Close()
	if ops == 0 {
		return 0, nil
	}
	report, perOp := bpfReport(r.before, after, ops)
	return perOp, os.WriteFile(path, []byte(report), 0o644)
}

// bpfReport renders what each program cost between two readings, per run and per operation, and returns
// the total per operation. Programs that did not run are left out.
func bpfReport(before, after map[string]bpfProgStats, ops uint64) (string, time.Duration) {
	var names []string
	for name := range after {
		names = append(names, name)
	}
	slices.Sort(names)
	var b strings.Builder
	var total time.Duration
	fmt.Fprintf(&b, "%-20s %12s %10s %10s %12s\n", "PROGRAM", "RUNS", "RUNS/OP", "NS/RUN", "NS/OP")
	for _, name := range names {
		d := bpfProgStats{runs: after[name].runs - before[name].runs, time: after[name].time - before[name].time}
		if d.runs == 0 {
			continue
		}
		total += d.time
		fmt.Fprintf(&b, "%-20s %12d %10.2f %10.0f %12.0f\n", name, d.runs, float64(d.runs)/float64(ops),
			float64(d.time.Nanoseconds())/float64(d.runs), float64(d.time.Nanoseconds())/float64(ops))
	}
	perOp := total / time.Duration(ops)
	fmt.Fprintf(&b, "total: %.2f µs per operation (%d operations)\n", float64(total.Nanoseconds())/float64(ops)/1e3, ops)
	return b.String(), perOp
}

// wardenProgStats reads the statistics of every loaded program whose name starts with "warden" (the kernel
// keeps 15 characters of a name), summed by name.
func wardenProgStats() map[string]bpfProgStats {
	out := make(map[string]bpfProgStats)
	var id ebpf.ProgramID
	for {
		next, err := ebpf.ProgramGetNextID(id)
		if err != nil {
			return out
		}
		id = next
		p, err := ebpf.NewProgramFromID(id)
		if err != nil {
			continue // unloaded meanwhile
		}
		info, ierr := p.Info()
		st, serr := p.Stats()
		p.Close()
		if ierr != nil || serr != nil || !strings.HasPrefix(info.Name, "warden") {
			continue
		}
		s := out[info.Name]
		s.runs += st.RunCount
		s.time += st.Runtime
		out[info.Name] = s
	}
}
