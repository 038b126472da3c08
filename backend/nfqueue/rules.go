package nfqueue

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"

	"github.com/warden-fw/warden/backend"
	"github.com/warden-fw/warden/backend/nfqueue/marks"
)

// Chain names. They are Warden's own; a crashed run's leftovers are found by these names.
const (
	chainIngestOutput = "WARDEN-INGEST-OUTPUT"
	chainIngestInput  = "WARDEN-INGEST-INPUT"
	// The ingest chains' branches for packets that already carry a mark.
	chainForeignOutput = "WARDEN-FOREIGN-OUTPUT"
	chainForeignInput  = "WARDEN-FOREIGN-INPUT"
	chainFilter        = "WARDEN-FILTER"
	chainRedirect      = "WARDEN-REDIRECT"
	chainSplitSNAT     = "WARDEN-SPLIT-SNAT"
)

// chainRules is one of our chains and its rules, in order.
type chainRules struct {
	Table string
	Chain string
	Rules [][]string
}

// jumpRule is a jump from a built-in chain into one of ours, always kept at position 1.
type jumpRule struct {
	Table   string
	Builtin string
	Target  string
	// Unless is a connmark whose packets do not jump (0: every packet jumps); see skipJump.
	Unless uint32
}

// args renders the jump's rule specification (what follows `-I BUILTIN 1`).
func (j jumpRule) args() []string {
	if j.Unless == 0 {
		return []string{"-j", j.Target}
	}
	return []string{"-m", "connmark", "!", "--mark", strconv.FormatUint(uint64(j.Unless), 10), "-j", j.Target}
}

// queueRange is a contiguous range of queue numbers.
type queueRange struct{ First, Last uint16 }

// args renders the NFQUEUE target's options. --queue-bypass lets packets through (to the filter chain, which
// then applies fail_mode) while nothing listens on the queue, i.e. while the daemon is down.
func (q queueRange) args() []string {
	if q.First == q.Last {
		return []string{"-j", "NFQUEUE", "--queue-num", strconv.Itoa(int(q.First)), "--queue-bypass"}
	}
	return []string{"-j", "NFQUEUE", "--queue-balance", fmt.Sprintf("%d:%d", q.First, q.Last), "--queue-bypass"}
}

// ruleParams is everything the rule set depends on.
type ruleParams struct {
	// Out receives packets of connections this host opened; In those of connections opened from outside.
	Out, In  queueRange
	FailMode backend.FailMode
	// Ports of the local endpoints the reroute verdicts DNAT to.
	TunnelPort, SplitPort, NameserverPort uint16
	// SplitSNAT installs the source NAT of kernel-routed split connections (chainSplitSNAT).
	SplitSNAT bool
}

func mark(m uint32) []string {
	return []string{"-m", "mark", "--mark", strconv.FormatUint(uint64(m), 10)}
}

func connmark(m uint32) []string {
	return []string{"-m", "connmark", "--mark", strconv.FormatUint(uint64(m), 10)}
}

func cat(parts ...[]string) []string {
	var out []string
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

// permanentMarks are saved to the connmark so the connection's later packets (both directions) restore them
// and never reach user space.
var permanentMarks = []uint32{
	marks.AcceptFinal, marks.AcceptAlways, marks.BlockAlways, marks.DropAlways,
	marks.RerouteTunnel, marks.RerouteSplit, marks.RerouteNS,
}

// Later packets of some permanent decisions keep their own mark: restoring the connmark would change the packet
// mark, and a changed mark in mangle OUTPUT (an nf_tables route chain) makes the kernel look the route up again,
// once per packet. Split routes are policy-routed by their mark, and blocks and drops are enforced on it: those
// are restored. Two decisions need no packet mark:
//
//   - skipJump, accept-always: the bulk of all traffic. Its later packets do not even jump into the ingest and
//     filter chains, which could only return them untouched (the foreign chain too, for a packet with another
//     program's mark), so one match in the built-in chain spares each of them two jumps.
//   - unmarkedConnmarks, reroute-split: a connection rerouted to the split-tunnel proxy, which passes twice per
//     byte relayed (the application's leg on loopback); conntrack's DNAT needs no mark after the first packet.
//     Its packets do jump, and return at the top of both chains: one that carries another program's mark gets
//     its own mark restored by the foreign chain, which a skipped jump would change.
const skipJump = marks.AcceptAlways

var unmarkedConnmarks = []uint32{marks.RerouteSplit}

// splitRouteMarks matches every kernel-routed split mark (marks.SplitRoute) with one mask.
var splitRouteMarks = []string{"-m", "mark", "--mark", fmt.Sprintf("%d/0x%x", marks.SplitRouteBase, marks.SplitRouteMask)}

// buildRules returns our chains and the jumps into them for one address family. The order of the rules
// matters and is explained next to them.
func buildRules(v6 bool, p ruleParams) ([]chainRules, []jumpRule) {
	icmp := []string{"-p", "icmp"}
	reject := "icmp-admin-prohibited"
	loopback := netip.MustParseAddr("127.0.0.17")
	if v6 {
		icmp = []string{"-p", "ipv6-icmp"}
		reject = "icmp6-adm-prohibited"
		loopback = netip.IPv6Loopback()
	}
	related := []string{"-m", "conntrack", "--ctstate", "RELATED"}
	rst := []string{"-p", "tcp", "-m", "tcp", "--tcp-flags", "RST", "RST"}

	// Every packet of every connection passes the ingest chain and the filter chain, so the common cases are
	// decided by the first rules: a packet without a mark of its own costs three rule evaluations when its
	// connection is decided (no foreign mark, restore, return), an accepted one one more in filter.
	foreignChain := func(chain string, replies, rest queueRange) chainRules {
		// Reached by goto from the ingest chain for a packet that already carries a mark (another program's,
		// or SO_MARK 1709 on Warden's own sockets): a RETURN here, or the end of the chain, returns from the
		// ingest chain too.
		c := chainRules{Table: "mangle", Chain: chain}
		add := func(r ...[]string) { c.Rules = append(c.Rules, cat(r...)) }
		pending := connmark(marks.ForeignPending)
		// 1. A foreign mark (a WireGuard fwmark, say) on a connection's first packet: the packet was queued
		// with its mark intact (rule 4) and Warden accepted it by letting this hook run again (NF_REPEAT).
		// Record the accept in the connmark alone: the packet keeps the mark its routing depends on. Only a
		// connection whose first packet passed the queue unanswered (no daemon, fail_mode: open) can otherwise
		// reach this rule still pending, and fail open lets it through anyway; a start flushes such entries.
		// There is deliberately no narrower condition: whatever follows a repeat must not queue it again.
		add(pending, []string{"-j", "CONNMARK", "--set-mark", strconv.Itoa(int(marks.AcceptAlways))})
		// 2. A foreign mark on a connection already accepted for good: leave the packet alone, so the restore
		// below does not overwrite the mark other software routes by.
		for _, cm := range []uint32{marks.AcceptAlways, marks.AcceptFinal} {
			add(connmark(cm), []string{"-j", "RETURN"})
		}
		// 3. Warden's own sockets carry SO_MARK 1709: remember it on the connection and never queue them.
		// Saving here is safe because the packet returns before the restore.
		add(mark(marks.AcceptFinal), []string{"-j", "CONNMARK", "--save-mark"})
		add(mark(marks.AcceptFinal), []string{"-j", "RETURN"})
		// 4. A foreign mark on a new connection: ask Warden without restoring (which would zero the mark).
		add(connmark(0), []string{"-j", "CONNMARK", "--set-mark", strconv.Itoa(int(marks.ForeignPending))})
		add(pending, []string{"-m", "conntrack", "--ctdir", "REPLY"}, replies.args())
		add(pending, rest.args())
		// 5. Any other connection's verdict (a block, say) replaces the foreign mark.
		add([]string{"-j", "CONNMARK", "--restore-mark"})
		return c
	}
	ingest := func(chain, foreign string, replies, rest queueRange) chainRules {
		c := chainRules{Table: "mangle", Chain: chain}
		add := func(r ...[]string) { c.Rules = append(c.Rules, cat(r...)) }
		add([]string{"-m", "mark", "!", "--mark", "0", "-g", foreign})
		// Later packets of connections whose decision needs no packet mark and that jumped here leave with their
		// mark untouched (see unmarkedConnmarks).
		for _, cm := range unmarkedConnmarks {
			add(connmark(cm), []string{"-j", "RETURN"})
		}
		// Later packets of other decided connections get their permanent mark back from the connmark, and
		// leave: the split routes' policy routing and the filter's rejects and drops read the packet mark.
		add([]string{"-j", "CONNMARK", "--restore-mark"})
		add([]string{"-m", "mark", "!", "--mark", "0", "-j", "RETURN"})
		// ICMP errors and the TCP resets REJECT generates are RELATED to a connection already decided; they
		// are not queued (a queued reset would be rejected again and never leave).
		add(icmp, related, []string{"-j", "RETURN"})
		add(rst, related, []string{"-j", "RETURN"})
		// Undecided: ask Warden. Reply-direction packets belong to connections opened from the other side, so
		// they go to that direction's queues; the queue tells the connection's direction.
		add([]string{"-m", "conntrack", "--ctdir", "REPLY"}, replies.args())
		add(rest.args())
		return c
	}

	filter := chainRules{Table: "filter", Chain: chainFilter}
	addF := func(r ...[]string) { filter.Rules = append(filter.Rules, cat(r...)) }
	// Later packets of the connections the ingest chain left unmarked (a foreign mark, or none) and that jumped
	// here: nothing to save, and their connmark decides. They must return before the rules below read the packet mark, or
	// fail_mode closed would drop them as unmarked.
	for _, cm := range unmarkedConnmarks {
		addF(connmark(cm), []string{"-j", "RETURN"})
	}
	addF(mark(marks.AcceptFinal), connmark(marks.AcceptFinal), []string{"-j", "ACCEPT"})
	addF(splitRouteMarks, []string{"-m", "connmark", "--mark", fmt.Sprintf("%d/0x%x", marks.SplitRouteBase, marks.SplitRouteMask), "-j", "RETURN"})
	// The filter table runs after mangle, where the verdict's mark was set (and, for later packets, restored),
	// so saving here never races the restore. Saves come first because REJECT and DROP end the traversal.
	// The first packet of a connection accepted for good, the most common decision, is saved and leaves at
	// once (marks are exclusive, so its place among the others does not matter).
	addF(mark(marks.AcceptAlways), []string{"-j", "CONNMARK", "--save-mark"})
	addF(mark(marks.AcceptAlways), []string{"-j", "RETURN"})
	for _, m := range permanentMarks {
		if m != marks.AcceptAlways {
			addF(mark(m), []string{"-j", "CONNMARK", "--save-mark"})
		}
	}
	addF(splitRouteMarks, []string{"-j", "CONNMARK", "--save-mark"})
	// Own traffic is ACCEPTed, ending this table: later rules of other software cannot drop it.
	addF(mark(marks.AcceptFinal), []string{"-j", "ACCEPT"})
	// Accepts RETURN: the system's own rules still apply.
	addF(mark(marks.Accept), []string{"-j", "RETURN"})
	// The ICMP error or reset a REJECT sends belongs to the rejected connection and restores its block mark;
	// it must pass, or the reject turns into a silent drop.
	addF(icmp, related, []string{"-j", "RETURN"})
	addF(rst, related, []string{"-j", "RETURN"})
	for _, m := range []uint32{marks.Block, marks.BlockAlways} {
		addF([]string{"-p", "tcp"}, mark(m), []string{"-j", "REJECT", "--reject-with", "tcp-reset"})
		addF(mark(m), []string{"-j", "REJECT", "--reject-with", reject})
	}
	addF(mark(marks.Drop), []string{"-j", "DROP"})
	addF(mark(marks.DropAlways), []string{"-j", "DROP"})
	if p.FailMode == backend.FailClosed {
		// Mark 0 here means the queue was bypassed: nobody listens, the daemon is down. So does a foreign-marked
		// packet whose connection is still pending: had Warden accepted it, rule 1 of the ingest chain would have
		// replaced the pending connmark.
		addF(mark(0), []string{"-j", "DROP"})
		addF(connmark(marks.ForeignPending), []string{"-j", "DROP"})
	}

	redirect := chainRules{Table: "nat", Chain: chainRedirect}
	// Only a connection's first packet passes nat; most are accepted and leave at once.
	redirect.Rules = append(redirect.Rules, cat(mark(marks.AcceptAlways), []string{"-j", "RETURN"}))
	for _, r := range []struct {
		mark uint32
		port uint16
	}{{marks.RerouteTunnel, p.TunnelPort}, {marks.RerouteSplit, p.SplitPort}, {marks.RerouteNS, p.NameserverPort}} {
		to := netip.AddrPortFrom(loopback, r.port).String()
		for _, proto := range []string{"tcp", "udp"} {
			redirect.Rules = append(redirect.Rules, cat([]string{"-p", proto}, mark(r.mark),
				[]string{"-j", "DNAT", "--to-destination", to}))
		}
	}

	// Chains are created in this order and deleted in the reverse: a chain exists before a rule jumps to it.
	chains := []chainRules{
		foreignChain(chainForeignOutput, p.In, p.Out),
		foreignChain(chainForeignInput, p.Out, p.In),
		ingest(chainIngestOutput, chainForeignOutput, p.In, p.Out),
		ingest(chainIngestInput, chainForeignInput, p.Out, p.In),
		filter,
		redirect,
	}
	// Installation order: filter first, so that no verdict mark is ever set without being enforced.
	jumps := []jumpRule{
		{"filter", "OUTPUT", chainFilter, skipJump},
		{"filter", "INPUT", chainFilter, skipJump},
		{"nat", "OUTPUT", chainRedirect, 0},
	}
	if p.SplitSNAT {
		// Only then: a nat chain after routing gives every new connection a null binding.
		c, j := splitSNATRules()
		chains, jumps = append(chains, c), append(jumps, j)
	}
	jumps = append(jumps, jumpRule{"mangle", "OUTPUT", chainIngestOutput, skipJump}, jumpRule{"mangle", "INPUT", chainIngestInput, skipJump})
	return chains, jumps
}

// splitSNATRules returns the source NAT of kernel-routed split connections: they leave through another interface
// than the one whose address the socket chose, and get that interface's address. Only a connection's first
// packet passes nat. The same for both address families.
func splitSNATRules() (chainRules, jumpRule) {
	return chainRules{Table: "nat", Chain: chainSplitSNAT, Rules: [][]string{cat(splitRouteMarks, []string{"-j", "MASQUERADE"})}},
		jumpRule{"nat", "POSTROUTING", chainSplitSNAT, 0}
}

// cleanupRules returns every chain and jump any configuration of Warden installs for one address family: what a
// stop or a crash cleanup removes, whatever the configuration that installed them was.
func cleanupRules(v6 bool, p ruleParams) ([]chainRules, []jumpRule) {
	p.SplitSNAT = true
	return buildRules(v6, p)
}

// renderRules renders a rule set as iptables-restore-like text, for tests and debugging.
func renderRules(chains []chainRules, jumps []jumpRule) string {
	var b strings.Builder
	for _, c := range chains {
		fmt.Fprintf(&b, "*%s -N %s\n", c.Table, c.Chain)
		for _, r := range c.Rules {
			fmt.Fprintf(&b, "-A %s %s\n", c.Chain, strings.Join(r, " "))
		}
	}
	for _, j := range jumps {
		fmt.Fprintf(&b, "*%s -I %s 1 %s\n", j.Table, j.Builtin, strings.Join(j.args(), " "))
	}
	return b.String()
}
