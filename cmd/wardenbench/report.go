package main

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"runtime"
	"slices"
	"sort"
	"strings"
	"text/tabwriter"
	"time"
)

// Configurations, as they appear in the report.
const (
	cfgKernel = "kernel"
	cfgBare   = "bare_nfqueue"
	cfgWarden = "warden"
	cfgDirect = "direct"
	cfgProxy  = "proxy"
	// cfgRoute is Warden with split_tunnel.mode: route; it runs the split workloads only.
	cfgRoute = "route"
	// cfgHandoff is Warden with split_tunnel.mode: proxy and kernel_handoff: true; split workloads only.
	cfgHandoff = "handoff"
	// cfgCompare is a second Warden binary (--compare), measured beside cfgWarden.
	cfgCompare = "compare"
)

// Workloads, as they appear in the report and on the command line.
const (
	wlTCPConnect  = "tcp_connect"
	wlUDPFlows    = "udp_flows"
	wlLatency     = "connect_latency"
	wlBulk        = "tcp_bulk"
	wlProxyBulk   = "proxy_tcp_bulk"
	wlProxyUDP    = "proxy_udp_rr"
	wlSplitSetup  = "split_connect_latency"
	wlMemory      = "memory"
	wlRSSIdle     = "rss_idle"
	wlRSSTracked  = "rss_tracked"
	wlBytesPerCon = "bytes_per_connection"
	wlTableHeap   = "conn_table_heap"
)

// allWorkloads is every workload the harness knows, in the order it runs them.
var allWorkloads = []string{wlTCPConnect, wlUDPFlows, wlLatency, wlBulk, wlProxyBulk, wlProxyUDP, wlSplitSetup, wlMemory}

// Result is one line of the report: the median over the repetitions of one workload in one configuration.
type Result struct {
	Workload string  `json:"workload"`
	Config   string  `json:"config"`
	Value    float64 `json:"value"`
	Unit     string  `json:"unit"`
	// P50 and P99 are latencies in microseconds, null where the workload measures none.
	P50 *float64 `json:"p50_us"`
	P99 *float64 `json:"p99_us"`
	// Runs are the values of the individual repetitions; Errors counts failed operations over all of them.
	Runs []float64 `json:"runs"`
	// P99Runs are the repetitions' own p99s (P99 is their median), so that the p99 target gets an interval too.
	P99Runs []float64 `json:"p99_runs,omitempty"`
	Errors  uint64    `json:"errors"`
	// QueueDrops counts, over all repetitions, the packets the firewall's NFQUEUE queues dropped (full, or the
	// message not delivered): each is a connection's first packet lost, and the connection waits for its
	// retransmission. Omitted where no queue was in use or none dropped.
	QueueDrops uint64 `json:"queue_drops,omitempty"`
	// CPUBusy is the median share of the machine's CPU time that was busy during the runs (all processes,
	// 0-1): 1 means the workload was CPU-bound, and then any extra work costs throughput one for one.
	CPUBusy float64 `json:"cpu_busy"`
	// Stolen is the median share of the machine's CPU time the hypervisor gave to other guests during the
	// runs (steal time). It is not in CPUBusy nor in MachineUS; a run with much of it ran on a crowded host,
	// and its rates say more about the neighbours than about the configuration.
	Stolen float64 `json:"cpu_stolen"`
	// StealRepeats counts the runs that were measured again because the hypervisor stole more than
	// --max-steal of the CPU time during them (each run at most stealRetries times; the last measurement
	// counts whatever its steal).
	StealRepeats int `json:"steal_repeats,omitempty"`
	// For workloads counted in operations (connections, flows, round trips), medians per operation in
	// microseconds: MachineUS is the whole machine's busy CPU time (every process and the kernel: CPU BUSY x
	// CPUs / rate), FirewallCPUUS the firewall process's own (user and system time of the bare consumer or
	// Warden). A rate on a loaded 2-CPU machine moves with scheduling; what the consumer spends per
	// connection moves much less, so these tell a cost change from noise.
	MachineUS     *float64 `json:"machine_us_per_op,omitempty"`
	FirewallCPUUS *float64 `json:"firewall_cpu_us_per_op,omitempty"`
	// MachineSwitches is the machine's context switches per operation (all CPUs, from /proc/stat): a
	// hand-over between threads costs a switch on each side, and on a virtual machine a switch is expensive,
	// so a design that wakes another thread per connection shows here before it shows in the rate.
	MachineSwitches *float64 `json:"machine_cs_per_op,omitempty"`
}

// Report is what --out writes.
type Report struct {
	Machine Machine            `json:"machine"`
	Method  Method             `json:"method"`
	Results []Result           `json:"results"`
	Ratios  map[string]float64 `json:"ratios"`
	Targets []Target           `json:"targets"`
	// Partial is set when the run was interrupted or failed: the results are what was measured until then.
	Partial bool `json:"partial,omitempty"`
}

// Machine describes where the numbers were taken.
type Machine struct {
	CPUs        int       `json:"cpus"`
	CPUModel    string    `json:"cpu_model"`
	Kernel      string    `json:"kernel"`
	GoVersion   string    `json:"go_version"`
	MemTotalKiB uint64    `json:"mem_total_kib"`
	LoadStart   string    `json:"loadavg_start"`
	LoadEnd     string    `json:"loadavg_end"`
	Date        time.Time `json:"date"`
}

// Method records the parameters of the run.
type Method struct {
	Quick       bool     `json:"quick"`
	Reps        int      `json:"reps"`
	DurationMS  int64    `json:"duration_ms"`
	Clients     int      `json:"clients"`
	LatencyRate int      `json:"latency_rate_per_s"`
	MemFlows    int      `json:"memory_flows"`
	MemClients  int      `json:"memory_clients"`
	Rules       int      `json:"warden_rules"`
	Workloads   []string `json:"workloads"`
	Warden      string   `json:"warden"`
	Compare     string   `json:"compare,omitempty"`
	NoAppRules  bool     `json:"no_app_rules,omitempty"`
	// PooledFrom names the result files a --pool report merged; Reps is then their repetitions together.
	PooledFrom []string `json:"pooled_from,omitempty"`
}

// Target is one of the goals and whether this run met it.
type Target struct {
	Name  string  `json:"name"`
	Ratio string  `json:"ratio"`
	Want  string  `json:"want"`
	Value float64 `json:"value"`
	Met   bool    `json:"met"`
	// PairedRuns are the ratio of each repetition on its own (the two configurations ran back to back in it),
	// for rate ratios: their spread shows how far one run's ratio can be trusted. Value stays the ratio of the
	// medians.
	PairedRuns []float64 `json:"paired_runs,omitempty"`
	// Interval is the 95 % bootstrap interval of Value (see ratioInterval), for rate and p99 ratios with enough
	// paired repetitions; Settled says it lies wholly on one side of the target, so that Met holds at this run's
	// precision. An unsettled verdict needs more repetitions, or runs pooled with --pool.
	Interval []float64 `json:"interval95,omitempty"`
	Settled  bool      `json:"settled,omitempty"`
}

// sample is one repetition's measurement of one workload in one configuration.
type sample struct {
	value    float64
	p50, p99 float64 // microseconds; 0 when not measured
	errors   uint64
	// queueDrops counts the packets the firewall's queues dropped during the run.
	queueDrops uint64
	cpuBusy    float64
	stolen     float64
	// stealRepeats counts how often the run was repeated for steal before this measurement.
	stealRepeats int
	// machineUS and fwUS are per-operation CPU times, switches the machine's context switches per operation
	// (see Result); 0 when not measured.
	machineUS, fwUS, switches float64
}

// collector gathers samples and turns them into results.
type collector struct {
	order []string // "workload/config" in first-seen order
	units map[string]string
	data  map[string][]sample
}

func newCollector() *collector {
	return &collector{units: map[string]string{}, data: map[string][]sample{}}
}

func (c *collector) add(workload, config, unit string, s sample) {
	k := workload + "/" + config
	if _, ok := c.data[k]; !ok {
		c.order = append(c.order, k)
	}
	c.units[k] = unit
	c.data[k] = append(c.data[k], s)
}

func median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	return sortedMedian(slices.Clone(xs))
}

func (c *collector) results() []Result {
	out := make([]Result, 0, len(c.order))
	for _, k := range c.order {
		wl, cfg, _ := strings.Cut(k, "/")
		ss := c.data[k]
		r := Result{Workload: wl, Config: cfg, Unit: c.units[k]}
		var vals, p50s, p99s, busy, stolen, machine, fw, switches []float64
		for _, s := range ss {
			vals = append(vals, s.value)
			busy = append(busy, s.cpuBusy)
			stolen = append(stolen, s.stolen)
			r.StealRepeats += s.stealRepeats
			if s.machineUS > 0 {
				machine = append(machine, s.machineUS)
			}
			if s.fwUS > 0 {
				fw = append(fw, s.fwUS)
			}
			if s.switches > 0 {
				switches = append(switches, s.switches)
			}
			r.Errors += s.errors
			r.QueueDrops += s.queueDrops
			if s.p99 > 0 {
				p50s = append(p50s, s.p50)
				p99s = append(p99s, s.p99)
			}
		}
		r.Value = round(median(vals))
		r.Runs = roundAll(vals)
		r.CPUBusy = math.Round(median(busy)*100) / 100
		r.Stolen = math.Round(median(stolen)*1000) / 1000
		r.MachineUS, r.FirewallCPUUS, r.MachineSwitches = medianOrNil(machine), medianOrNil(fw), medianOrNil(switches)
		if len(p99s) > 0 {
			p50, p99 := round(median(p50s)), round(median(p99s))
			r.P50, r.P99 = &p50, &p99
			r.P99Runs = roundAll(p99s)
		}
		out = append(out, r)
	}
	return out
}

// medianOrNil is the rounded median of xs, or nil (no such measure) when xs is empty.
func medianOrNil(xs []float64) *float64 {
	if len(xs) == 0 {
		return nil
	}
	v := round(median(xs))
	return &v
}

func round(v float64) float64 {
	switch a := math.Abs(v); {
	case a >= 100:
		return math.Round(v)
	case a >= 1:
		return math.Round(v*100) / 100
	default:
		return math.Round(v*10000) / 10000
	}
}

func roundAll(vs []float64) []float64 {
	out := make([]float64, len(vs))
	for i, v := range vs {
		out[i] = round(v)
	}
	return out
}

func find(rs []Result, workload, config string) (Result, bool) {
	for _, r := range rs {
		if r.Workload == workload && r.Config == config {
			return r, true
		}
	}
	return Result{}, false
}

// ratioSpec defines one ratio: a/b of two results' values, or of another of their measures.
type ratioSpec struct {
	name     string
	workload string
	num, den string
	metric   metric
	target   float64
	atMost   bool // the target is an upper bound
}

// metric is the measure of a result a ratio compares.
type metric int

const (
	metricValue metric = iota
	metricP99
	metricMachineUS
	metricFirewallCPUUS
	metricMachineSwitches
)

// of returns r's measure m, false when r has none.
func (m metric) of(r Result) (float64, bool) {
	var p *float64
	switch m {
	case metricValue:
		return r.Value, true
	case metricP99:
		p = r.P99
	case metricMachineUS:
		p = r.MachineUS
	case metricFirewallCPUUS:
		p = r.FirewallCPUUS
	case metricMachineSwitches:
		p = r.MachineSwitches
	}
	if p == nil {
		return 0, false
	}
	return *p, true
}

// runs returns the per-repetition values behind measure m of a and b, for the rate and the p99 (the other
// measures are kept as medians only); false when either lacks them.
func (m metric) runs(a, b Result) (num, den []float64, ok bool) {
	switch m {
	case metricValue:
		num, den = a.Runs, b.Runs
	case metricP99:
		num, den = a.P99Runs, b.P99Runs
	}
	return num, den, len(num) > 0 && len(den) > 0
}

var ratioSpecs = []ratioSpec{
	{name: "warden_vs_bare_tcp_connect", workload: wlTCPConnect, num: cfgWarden, den: cfgBare, target: 0.9},
	{name: "warden_vs_bare_udp_flows", workload: wlUDPFlows, num: cfgWarden, den: cfgBare, target: 0.9},
	{name: "warden_vs_kernel_bulk", workload: wlBulk, num: cfgWarden, den: cfgKernel, target: 0.95},
	{name: "proxy_vs_direct_bulk", workload: wlProxyBulk, num: cfgProxy, den: cfgDirect, target: 0.9},
	{name: "route_vs_direct_bulk", workload: wlProxyBulk, num: cfgRoute, den: cfgDirect, target: 0.9},
	{name: "handoff_vs_direct_bulk", workload: wlProxyBulk, num: cfgHandoff, den: cfgDirect, target: 0.9},
	{name: "warden_vs_bare_connect_p99", workload: wlLatency, num: cfgWarden, den: cfgBare, metric: metricP99, target: 1.5, atMost: true},
	// Informational (no target in the issue).
	{name: "bare_vs_kernel_tcp_connect", workload: wlTCPConnect, num: cfgBare, den: cfgKernel},
	{name: "bare_vs_kernel_udp_flows", workload: wlUDPFlows, num: cfgBare, den: cfgKernel},
	{name: "warden_vs_kernel_tcp_connect", workload: wlTCPConnect, num: cfgWarden, den: cfgKernel},
	{name: "warden_vs_kernel_udp_flows", workload: wlUDPFlows, num: cfgWarden, den: cfgKernel},
	{name: "bare_vs_kernel_bulk", workload: wlBulk, num: cfgBare, den: cfgKernel},
	{name: "proxy_vs_direct_udp_rr", workload: wlProxyUDP, num: cfgProxy, den: cfgDirect},
	{name: "route_vs_direct_udp_rr", workload: wlProxyUDP, num: cfgRoute, den: cfgDirect},
	{name: "handoff_vs_direct_udp_rr", workload: wlProxyUDP, num: cfgHandoff, den: cfgDirect},
	{name: "proxy_vs_direct_connect_p50", workload: wlSplitSetup, num: cfgProxy, den: cfgDirect},
	{name: "route_vs_direct_connect_p50", workload: wlSplitSetup, num: cfgRoute, den: cfgDirect},
	{name: "handoff_vs_direct_connect_p50", workload: wlSplitSetup, num: cfgHandoff, den: cfgDirect},
	// Costs per connection or flow (above 1: Warden spends more than the bare consumer).
	{name: "warden_vs_bare_firewall_cpu_per_tcp_connect", workload: wlTCPConnect, num: cfgWarden, den: cfgBare, metric: metricFirewallCPUUS},
	{name: "warden_vs_bare_firewall_cpu_per_udp_flow", workload: wlUDPFlows, num: cfgWarden, den: cfgBare, metric: metricFirewallCPUUS},
	{name: "warden_vs_bare_machine_per_tcp_connect", workload: wlTCPConnect, num: cfgWarden, den: cfgBare, metric: metricMachineUS},
	{name: "warden_vs_bare_machine_per_udp_flow", workload: wlUDPFlows, num: cfgWarden, den: cfgBare, metric: metricMachineUS},
	{name: "warden_vs_bare_switches_per_tcp_connect", workload: wlTCPConnect, num: cfgWarden, den: cfgBare, metric: metricMachineSwitches},
	{name: "warden_vs_bare_switches_per_udp_flow", workload: wlUDPFlows, num: cfgWarden, den: cfgBare, metric: metricMachineSwitches},
	// The machine's time per megabyte moved (above 1: a byte costs more than without the firewall or proxy).
	{name: "warden_vs_kernel_machine_per_bulk_mb", workload: wlBulk, num: cfgWarden, den: cfgKernel, metric: metricMachineUS},
	// --compare: the second binary against the first (above 1 in a rate, or below 1 in a cost: it does better).
	{name: "compare_vs_warden_tcp_connect", workload: wlTCPConnect, num: cfgCompare, den: cfgWarden},
	{name: "compare_vs_warden_udp_flows", workload: wlUDPFlows, num: cfgCompare, den: cfgWarden},
	{name: "compare_vs_warden_bulk", workload: wlBulk, num: cfgCompare, den: cfgWarden},
	{name: "compare_vs_warden_connect_p99", workload: wlLatency, num: cfgCompare, den: cfgWarden, metric: metricP99},
	{name: "compare_vs_warden_machine_per_tcp_connect", workload: wlTCPConnect, num: cfgCompare, den: cfgWarden, metric: metricMachineUS},
	{name: "compare_vs_warden_machine_per_udp_flow", workload: wlUDPFlows, num: cfgCompare, den: cfgWarden, metric: metricMachineUS},
	{name: "compare_vs_warden_firewall_cpu_per_tcp_connect", workload: wlTCPConnect, num: cfgCompare, den: cfgWarden, metric: metricFirewallCPUUS},
	{name: "compare_vs_warden_firewall_cpu_per_udp_flow", workload: wlUDPFlows, num: cfgCompare, den: cfgWarden, metric: metricFirewallCPUUS},
	{name: "proxy_vs_direct_machine_per_mb", workload: wlProxyBulk, num: cfgProxy, den: cfgDirect, metric: metricMachineUS},
	{name: "route_vs_direct_machine_per_mb", workload: wlProxyBulk, num: cfgRoute, den: cfgDirect, metric: metricMachineUS},
	{name: "handoff_vs_direct_machine_per_mb", workload: wlProxyBulk, num: cfgHandoff, den: cfgDirect, metric: metricMachineUS},
}

// bytesPerConnTarget is the memory goal: at most 1 KiB per tracked connection.
const bytesPerConnTarget = 1024

// ratios computes the ratios the results allow, and the targets they meet or miss.
func ratios(rs []Result) (map[string]float64, []Target) {
	m := map[string]float64{}
	var ts []Target
	for _, s := range ratioSpecs {
		a, ok1 := find(rs, s.workload, s.num)
		b, ok2 := find(rs, s.workload, s.den)
		if !ok1 || !ok2 {
			continue
		}
		x, okx := s.metric.of(a)
		y, oky := s.metric.of(b)
		if !okx || !oky || y == 0 {
			continue
		}
		r := roundRatio(x / y)
		m[s.name] = r
		if s.target > 0 {
			t := Target{Name: s.workload, Ratio: s.name, Value: r}
			if s.metric == metricValue && len(a.Runs) == len(b.Runs) {
				for i := range a.Runs {
					if b.Runs[i] > 0 {
						t.PairedRuns = append(t.PairedRuns, roundRatio(a.Runs[i]/b.Runs[i]))
					}
				}
			}
			if s.atMost {
				t.Want, t.Met = fmt.Sprintf("<= %.2f", s.target), r <= s.target
			} else {
				t.Want, t.Met = fmt.Sprintf(">= %.2f", s.target), r >= s.target
			}
			if num, den, ok := s.metric.runs(a, b); ok {
				if lo, hi, ok := ratioInterval(num, den); ok {
					t.Interval = []float64{lo, hi}
					t.Settled = lo > s.target || hi < s.target
				}
			}
			ts = append(ts, t)
		}
	}
	if r, ok := find(rs, wlBytesPerCon, cfgWarden); ok {
		m["bytes_per_connection"] = r.Value
		ts = append(ts, Target{Name: wlMemory, Ratio: "bytes_per_connection", Value: r.Value,
			Want: fmt.Sprintf("<= %d", bytesPerConnTarget), Met: r.Value <= bytesPerConnTarget})
	}
	return m, ts
}

// writeTable prints the results and the targets for people.
func writeTable(w io.Writer, rep *Report) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "WORKLOAD\tCONFIG\tMEDIAN\tUNIT\tP50 µs\tP99 µs\tCPU BUSY\tSTOLEN\tMACHINE µs/OP\tFIREWALL µs/OP\tSWITCHES/OP\tERRORS\tRUNS")
	for _, r := range rep.Results {
		busy, stolen := "-", "-"
		if r.CPUBusy > 0 {
			busy = fmt.Sprintf("%.0f%%", r.CPUBusy*100)
		}
		if r.Stolen > 0 {
			stolen = fmt.Sprintf("%.1f%%", r.Stolen*100)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%d\t%s\n", r.Workload, r.Config, fmtNum(r.Value), r.Unit,
			fmtPtr(r.P50), fmtPtr(r.P99), busy, stolen, fmtPtr(r.MachineUS), fmtPtr(r.FirewallCPUUS), fmtPtr(r.MachineSwitches),
			r.Errors, fmtRuns(r.Runs))
	}
	tw.Flush()
	if rep.Partial {
		fmt.Fprintln(w, "PARTIAL: the run was interrupted or failed; these are the results until then.")
	}
	fmt.Fprintln(w)
	tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "RATIO\tVALUE\tTARGET\tMET\t95% INTERVAL\tPER REPETITION")
	for _, t := range rep.Targets {
		met := "yes"
		if !t.Met {
			met = "NO"
		}
		interval := "-"
		if len(t.Interval) == 2 {
			// "?" marks a verdict the interval does not settle: the target lies inside it.
			interval = fmt.Sprintf("%s-%s", fmtNum(t.Interval[0]), fmtNum(t.Interval[1]))
			if !t.Settled {
				met += "?"
			}
		}
		paired := "-"
		if len(t.PairedRuns) > 0 {
			paired = fmtRuns(t.PairedRuns)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", t.Ratio, fmtNum(t.Value), t.Want, met, interval, paired)
	}
	names := make([]string, 0, len(rep.Ratios))
	for k := range rep.Ratios {
		names = append(names, k)
	}
	sort.Strings(names)
	for _, k := range names {
		if !slices.ContainsFunc(rep.Targets, func(t Target) bool { return t.Ratio == k }) {
			fmt.Fprintf(tw, "%s\t%s\t-\t-\t-\t\n", k, fmtNum(rep.Ratios[k]))
		}
	}
	tw.Flush()
}

func fmtNum(v float64) string {
	if v == math.Trunc(v) {
		return fmt.Sprintf("%.0f", v)
	}
	return fmt.Sprintf("%.3g", v)
}

func fmtPtr(p *float64) string {
	if p == nil {
		return "-"
	}
	return fmtNum(*p)
}

func fmtRuns(rs []float64) string {
	s := make([]string, len(rs))
	for i, v := range rs {
		s[i] = fmtNum(v)
	}
	return strings.Join(s, " ")
}

// writeJSON writes the report to path.
func writeJSON(path string, rep *Report) error {
	b, err := json.MarshalIndent(rep, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(path, append(b, '\n'), 0o644); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	return nil
}

func baseMachine() Machine {
	return Machine{CPUs: runtime.NumCPU(), GoVersion: runtime.Version(), Date: time.Now().UTC().Truncate(time.Second)}
}

// percentiles returns the 50th and 99th percentile of xs (sorted in place), nearest rank.
func percentiles(xs []float64) (p50, p99 float64) {
	if len(xs) == 0 {
		return 0, 0
	}
	sort.Float64s(xs)
	at := func(q float64) float64 {
		i := int(math.Ceil(q*float64(len(xs)))) - 1
		return xs[max(0, min(i, len(xs)-1))]
	}
	return at(0.50), at(0.99)
}
