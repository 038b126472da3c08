package main

import (
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// A perf script text as `perf script -F pid,period,ip,sym` prints call chains: a header per sample, then one
// frame per line, leaf first, and an empty line.
const perfScriptText = `    0     250000 
	ffffffff8224215b pv_native_safe_halt
	ffffffff82243c75 default_idle
	ffffffff813d09d6 do_idle

    0     250000 
	ffffffff82242055 pvm_safe_halt_hc
	ffffffff82243c75 default_idle
	ffffffff813d09d6 do_idle

    0     250000 
	ffffffff81aa0030 __nfqnl_enqueue_packet
	ffffffff81aa0031 nf_queue
	ffffffff81aa0001 nft_do_chain
	ffffffff81aa0002 nf_hook_slow
	ffffffff81aa0003 ip_local_deliver
	ffffffff81aa0009 handle_softirqs
	ffffffff813d09d6 do_idle

  4242     250000 
	ffffffff81aa0010 nft_match_eval
	ffffffff81aa0001 nft_do_chain
	ffffffff81aa0011 nft_nat_do_chain
	ffffffff81aa0012 nf_nat_inet_fn
	ffffffff81aa0013 nf_reinject
	ffffffff81aa0014 nfqnl_recv_verdict
	0000000000412345 internal/runtime/syscall/linux.Syscall6

  4242     500000 
	0000000000498765 github.com/warden-fw/warden/firewall.(*Pipeline).decide

  5555     250000 
	ffffffff81aa0020 nf_conntrack_tuple_taken
	ffffffff81aa0021 nf_nat_setup_info
	ffffffff81aa0022 __nf_nat_alloc_null_binding
	ffffffff81aa0012 nf_nat_inet_fn
	ffffffff81aa0023 nf_hook_slow

  7777     250000 
	ffffffff81bb0001 __cgroup_bpf_run_filter_sock_ops
	ffffffff81bb0002 tcp_connect

  7777     250000 
	ffffffff81cc0001 finish_task_switch.isra.0
	ffffffff81cc0002 __schedule
`

func TestSplitPerfScript(t *testing.T) {
	s, err := splitPerfScript(strings.NewReader(perfScriptText), 4242)
	if err != nil {
		t.Fatal(err)
	}
	// Every sample but the two idle ones is busy: 6 samples, 250 µs each, one of them 500 µs. Of the
	// firewall's two, the one that ended in its own code is user space; the one in the kernel under its
	// system call is not.
	if s.busyNS != 1_750_000 || s.firewallNS != 750_000 || s.firewallUserNS != 500_000 {
		t.Errorf("busy %d ns, firewall %d ns, of it user %d ns; want 1750000, 750000, 500000", s.busyNS,
			s.firewallNS, s.firewallUserNS)
	}
	want := map[string]uint64{
		"netfilter rule chains (nft_do_chain)":                                500_000, // the softirq's and the verdict's
		"  of them xtables matches and targets":                               250_000,
		"NAT hooks (nf_nat_inet_fn)":                                          500_000,
		"  of them null bindings (connections no NAT rule changes)":           250_000,
		"conntrack (nf_conntrack_in, confirm)":                                0,
		"queueing packets to user space":                                      250_000, // the softirq's NFQUEUE
		"verdicts (nfqnl_recv_verdict and the path it carries the packet on)": 250_000,
		"cgroup eBPF programs (attribution)":                                  250_000,
		"context switches (finish_task_switch)":                               250_000,
	}
	// Every part is expected: a part added or renamed without a case here fails.
	got := map[string]uint64{}
	for i, p := range costParts {
		got[p.name] = s.partNS[i]
	}
	if d := cmp.Diff(want, got); d != "" {
		t.Errorf("parts in ns (-want +got):\n%s", d)
	}
	var b strings.Builder
	writeSplit(&b, s, 100) // 100 operations: 1.75 ms busy is 17.5 µs each
	rows := map[string]string{}
	for _, line := range strings.Split(b.String(), "\n") {
		if name, v, ok := strings.Cut(strings.TrimSpace(line), "  "); ok {
			rows[name] = strings.TrimSpace(v)
		}
	}
	if rows["machine busy (every process, kernel and user)"] != "17.50" || rows["NAT hooks (nf_nat_inet_fn)"] != "5.00" ||
		rows["of it in user space (its own code and the Go runtime)"] != "5.00" {
		t.Errorf("split table:\n%s", b.String())
	}
	if got := s.summary(100); !strings.HasPrefix(got, "busy 17.5 µs, firewall 7.5 (user 5.0), rule chains 5.0, NAT 5.0") {
		t.Errorf("summary %q", got)
	}
}

func TestSplitPerfScriptRejectsGarbage(t *testing.T) {
	if _, err := splitPerfScript(strings.NewReader("not a header\n\tffff frame\n"), 0); err == nil {
		t.Error("a malformed sample header was accepted")
	}
}
