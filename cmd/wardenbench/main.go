// Command wardenbench measures Warden against the kernel alone and a bare NFQUEUE consumer, in one run, in
// network namespaces it creates and removes. See docs/performance.md for the method and the results.
//
//	wardenbench [--quick] [--out results.json] [--workloads tcp_connect,udp_flows,...] [--duration 3s]
//
// The load generators, servers, the bare consumer and (with --warden builtin) Warden itself run as child
// processes inside the namespaces: the binary re-executes itself with a hidden subcommand (_server, _client,
// _bare, _warden) under `ip netns exec`.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
	"time"
)

// stealRetries bounds how often one workload run is repeated because the hypervisor stole too much CPU time.
const stealRetries = 2

// options are the command line.
type options struct {
	out         string
	quick       bool
	reps        int
	duration    time.Duration
	workloads   []string
	clients     int
	latencyRate int
	memFlows    int
	memClients  int
	rules       int
	warden      string
	compare     string
	profile     string
	pool        []string
	keepLogs    bool
	noApps      bool
	// maxSteal is the share of CPU time the hypervisor may steal during one workload run before the run is
	// repeated (at most stealRetries times); 0 never repeats.
	maxSteal float64
}

func parseFlags(args []string, stderr io.Writer) (*options, error) {
	o := &options{}
	fs := flag.NewFlagSet("wardenbench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var workloads, pool string
	fs.StringVar(&o.out, "out", "", "write the results as JSON to this file")
	fs.BoolVar(&o.quick, "quick", false, "one repetition of 1s per workload and 20000 memory flows (finishes within 60s)")
	fs.IntVar(&o.reps, "reps", 0, "repetitions of every workload (median reported; default 8, quick 1)")
	fs.DurationVar(&o.duration, "duration", 0, "length of one workload run (default 2s, quick 1s)")
	fs.StringVar(&workloads, "workloads", "", "comma-separated workloads (default all): "+strings.Join(allWorkloads, ","))
	fs.IntVar(&o.clients, "clients", 8, "concurrent clients for tcp_connect and udp_flows")
	fs.IntVar(&o.latencyRate, "latency-rate", 2000, "new connections per second for connect_latency (moderate load)")
	fs.IntVar(&o.memFlows, "mem-flows", 0, "UDP flows Warden tracks for the memory workload (default 100000, quick 20000)")
	fs.IntVar(&o.memClients, "mem-clients", 128, "concurrent clients making the memory workload's flows (its rate does not matter, only the count)")
	fs.IntVar(&o.rules, "rules", 1000, "rules in Warden's policy")
	fs.StringVar(&o.warden, "warden", "", "warden binary (default: next to wardenbench, else $PATH); \"builtin\" runs the same daemon package inside this binary")
	fs.StringVar(&o.compare, "compare", "", "a second warden binary, measured as configuration \"compare\" right after \"warden\" in every repetition (tcp_connect, udp_flows, connect_latency, tcp_bulk): an A/B test of a change under the same conditions")
	fs.StringVar(&o.profile, "profile", "", "directory for CPU profiles (pprof, perf) of Warden and the bare consumer during tcp_connect, udp_flows and tcp_bulk, and of the split tunnel's workloads; implies --warden builtin")
	fs.BoolVar(&o.noApps, "no-app-rules", false, "diagnosis: Warden's policy without application rules (no process lookups); the report says so")
	fs.Float64Var(&o.maxSteal, "max-steal", -1, fmt.Sprintf("repeat a workload run (up to %d times) when the hypervisor stole more than this share of the CPU time during it (default 0.05; quick 0: never)", stealRetries))
	fs.BoolVar(&o.keepLogs, "keep-logs", false, "keep the temporary directory with Warden's config and logs")
	fs.StringVar(&pool, "pool", "", "comma-separated result files of earlier runs (--out): measure nothing, report their repetitions pooled (medians over all of them, the same ratios and targets); with --out, write that report")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: wardenbench [flags]\n\nMeasures Warden against the kernel alone and a bare NFQUEUE consumer (needs root).\n\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected arguments: %v", fs.Args())
	}
	if pool != "" {
		measuring := false
		fs.Visit(func(f *flag.Flag) { measuring = measuring || (f.Name != "pool" && f.Name != "out") })
		if measuring {
			return nil, errors.New("--pool measures nothing: it takes only --out besides the files")
		}
		for p := range strings.SplitSeq(pool, ",") {
			if p = strings.TrimSpace(p); p != "" {
				o.pool = append(o.pool, p)
			}
		}
		return o, nil
	}
	if o.reps <= 0 {
		// Even, so that each configuration order (odd repetitions run it reversed) is measured equally often.
		// Many short repetitions rather than a few long ones: this host's speed swings by 10-20 % within
		// seconds, and two identical Warden binaries measured side by side differed by 9-15 % in their medians
		// of 5 x 3 s, by 1-2 % in their medians of 8 x 2 s (docs/performance.md, session 12).
		o.reps = 8
		if o.quick {
			o.reps = 1
		}
	}
	if o.duration <= 0 {
		o.duration = 2 * time.Second
		if o.quick {
			o.duration = time.Second
		}
	}
	if o.maxSteal < 0 {
		// A crowded host's steal shows in every figure of the run it hits; --quick is a smoke test and keeps
		// its time bound instead.
		o.maxSteal = 0.05
		if o.quick {
			o.maxSteal = 0
		}
	}
	if o.maxSteal > 1 {
		return nil, errors.New("--max-steal is a share of CPU time, between 0 and 1")
	}
	if o.memFlows <= 0 {
		o.memFlows = 100000
		if o.quick {
			o.memFlows = 20000
		}
	}
	if o.clients <= 0 || o.latencyRate <= 0 || o.memClients <= 0 || o.rules < 10 {
		return nil, errors.New("--clients, --mem-clients and --latency-rate must be positive and --rules at least 10")
	}
	if workloads == "" {
		o.workloads = slices.Clone(allWorkloads)
	} else {
		for w := range strings.SplitSeq(workloads, ",") {
			w = strings.TrimSpace(w)
			if !slices.Contains(allWorkloads, w) {
				return nil, fmt.Errorf("unknown workload %q (known: %s)", w, strings.Join(allWorkloads, ","))
			}
			if !slices.Contains(o.workloads, w) {
				o.workloads = append(o.workloads, w)
			}
		}
	}
	if o.profile != "" && o.warden == "" {
		o.warden = "builtin"
	}
	if o.compare != "" && o.profile != "" {
		return nil, errors.New("--compare and --profile do not go together: profiling runs Warden inside wardenbench")
	}
	return o, nil
}

func main() {
	if len(os.Args) > 1 && strings.HasPrefix(os.Args[1], "_") {
		os.Exit(childMain(os.Args[1], os.Args[2:]))
	}
	o, err := parseFlags(os.Args[1:], os.Stderr)
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(0)
		}
		fmt.Fprintln(os.Stderr, "wardenbench:", err)
		os.Exit(2)
	}
	if len(o.pool) > 0 {
		if err := runPool(o, os.Stdout, os.Stderr); err != nil {
			fmt.Fprintln(os.Stderr, "wardenbench:", err)
			os.Exit(1)
		}
		return
	}
	if err := runBench(o, os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "wardenbench:", err)
		os.Exit(1)
	}
}

// runPool prints (and with --out writes) the pooled report of earlier runs' result files.
func runPool(o *options, stdout, stderr io.Writer) error {
	rep, err := poolReports(o.pool, stderr)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "Pooled: %d repetitions from %s\n\n", rep.Method.Reps, strings.Join(rep.Method.PooledFrom, ", "))
	writeTable(stdout, rep)
	if o.out != "" {
		return writeJSON(o.out, rep)
	}
	return nil
}
