package main

import (
	"bufio"
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"
)

// costPart is one line of a profile's split: the samples whose kernel or user stack holds one of its functions.
type costPart struct {
	name  string
	short string   // its name in the progress line; "" keeps it out of that line
	funcs []string // a frame matches when its symbol starts with one of these
}

// costParts are the parts of a new connection's cost that docs/performance.md discusses. A sample counts in
// every part whose function its stack holds, so the lines overlap (NAT runs its own rule chains; the verdict
// write carries a packet through rules, NAT and the peer's receive) and do not add up.
var costParts = []costPart{
	{"netfilter rule chains (nft_do_chain)", "rule chains", []string{"nft_do_chain"}},
	{"  of them xtables matches and targets", "", []string{"nft_match_eval", "nft_target_eval_xt"}},
	{"NAT hooks (nf_nat_inet_fn)", "NAT", []string{"nf_nat_inet_fn"}},
	{"  of them null bindings (connections no NAT rule changes)", "", []string{"__nf_nat_alloc_null_binding"}},
	{"conntrack (nf_conntrack_in, confirm)", "conntrack", []string{"nf_conntrack_in", "__nf_conntrack_confirm"}},
	{"queueing packets to user space", "", []string{"__nfqnl_enqueue_packet", "nfqnl_enqueue_packet"}},
	{"verdicts (nfqnl_recv_verdict and the path it carries the packet on)", "", []string{"nfqnl_recv_verdict"}},
	{"cgroup eBPF programs (attribution)", "cgroup eBPF", []string{"__cgroup_bpf_run"}},
	{"context switches (finish_task_switch)", "context switches", []string{"finish_task_switch"}},
}

// idleLeaves are the functions an idle CPU's sample ends in (pvm_safe_halt: a PVM guest's halt hypercall).
var idleLeaves = []string{"pv_native_safe_halt", "native_safe_halt", "pvm_safe_halt", "default_idle", "mwait_idle",
	"intel_idle", "acpi_idle", "cpu_idle_poll"}

// perfSplit is the result of splitting a `perf script -F pid,period,ip,sym` text (with call chains).
type perfSplit struct {
	busyNS, firewallNS uint64
	// firewallUserNS is the firewall's samples that ended in user space: the daemon's own code and the Go
	// runtime, beside the kernel work its system calls carry (a verdict carries its packet on through the stack).
	firewallUserNS uint64
	partNS         []uint64 // by costParts index
}

// splitPerfScript reads perf script output and sums, in nanoseconds of CPU time, the busy samples, the firewall
// process's (fwPID; 0: none), and each cost part's.
func splitPerfScript(r io.Reader, fwPID int) (perfSplit, error) {
	s := perfSplit{partNS: make([]uint64, len(costParts))}
	var (
		pid      int
		period   uint64
		frames   []string
		userLeaf bool // the sample's first frame is not a kernel address
	)
	flush := func() {
		if len(frames) == 0 {
			return
		}
		defer func() { frames = frames[:0] }()
		for _, l := range idleLeaves {
			if strings.HasPrefix(frames[0], l) {
				return
			}
		}
		s.busyNS += period
		if fwPID != 0 && pid == fwPID {
			s.firewallNS += period
			if userLeaf {
				s.firewallUserNS += period
			}
		}
		for i, p := range costParts {
			if holdsAny(frames, p.funcs) {
				s.partNS[i] += period
			}
		}
	}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		switch {
		case strings.TrimSpace(line) == "":
			flush()
		case line[0] == '\t':
			// "\tffffffff8224215b pv_native_safe_halt": the address, then the symbol.
			f := strings.Fields(line)
			if len(f) >= 2 {
				if len(frames) == 0 {
					// x86-64 kernel addresses are the upper half: ffff...
					userLeaf = !strings.HasPrefix(f[0], "ffff")
				}
				frames = append(frames, f[1])
			}
		default:
			// The sample's header: "  1234     250000 " (pid, period).
			flush()
			f := strings.Fields(line)
			if len(f) < 2 {
				return s, fmt.Errorf("perf script: unexpected sample header %q", line)
			}
			var err1, err2 error
			pid, err1 = strconv.Atoi(f[0])
			period, err2 = strconv.ParseUint(f[1], 10, 64)
			if err1 != nil || err2 != nil {
				return s, fmt.Errorf("perf script: unexpected sample header %q", line)
			}
		}
	}
	flush()
	return s, sc.Err()
}

func holdsAny(frames, funcs []string) bool {
	for _, fr := range frames {
		for _, f := range funcs {
			if strings.HasPrefix(fr, f) {
				return true
			}
		}
	}
	return false
}

// writeSplit prints the split per operation.
func writeSplit(w io.Writer, s perfSplit, ops uint64) {
	if ops == 0 {
		fmt.Fprintln(w, "no operations counted")
		return
	}
	per := func(ns uint64) string { return strconv.FormatFloat(usPerOp(ns, ops), 'f', 2, 64) }
	fmt.Fprintf(w, "CPU time per operation (%d operations) by what the sampled stacks held; a sample counts in every\n"+
		"line whose function its stack holds, so the lines overlap.\n\n", ops)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "PART\tµs/OP")
	fmt.Fprintf(tw, "machine busy (every process, kernel and user)\t%s\n", per(s.busyNS))
	fmt.Fprintf(tw, "firewall process (kernel and user)\t%s\n", per(s.firewallNS))
	fmt.Fprintf(tw, "  of it in user space (its own code and the Go runtime)\t%s\n", per(s.firewallUserNS))
	for i, p := range costParts {
		fmt.Fprintf(tw, "%s\t%s\n", p.name, per(s.partNS[i]))
	}
	tw.Flush()
}

// summary is the split per operation in one line, for the progress log.
func (s perfSplit) summary(ops uint64) string {
	if ops == 0 {
		return "no operations counted"
	}
	var b strings.Builder
	fmt.Fprintf(&b, "busy %.1f µs, firewall %.1f (user %.1f)", usPerOp(s.busyNS, ops), usPerOp(s.firewallNS, ops),
		usPerOp(s.firewallUserNS, ops))
	for i, p := range costParts {
		if p.short != "" {
			fmt.Fprintf(&b, ", %s %.1f", p.short, usPerOp(s.partNS[i], ops))
		}
	}
	return b.String()
}

// usPerOp is ns nanoseconds of CPU time in microseconds per operation (ops > 0).
func usPerOp(ns, ops uint64) float64 { return float64(ns) / 1e3 / float64(ops) }
