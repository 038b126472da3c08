package main

import (
	"fmt"
	"math/rand/v2"
	"strings"
)

// policyParams are what the generated Warden configuration depends on.
type policyParams struct {
	Socket string // control socket path
	// SplitRemote is split through SplitVia (the proxy workloads' destination).
	SplitRemote string
	SplitVia    string
	// SplitMode is split_tunnel.mode: "proxy" measures the relay, "route" kernel routing.
	SplitMode string
	// KernelHandoff sets split_tunnel.kernel_handoff (with SplitMode "proxy").
	KernelHandoff bool
	Rules         int // total rules, about 1000
	// NoApps replaces the application rules by domain rules (a diagnosis: without application rules Warden
	// never looks up the process behind a connection).
	NoApps bool
}

// wardenConfig renders a realistic policy of about p.Rules rules in YAML: address, domain, port, application,
// user, interface and inbound rules of the kind a desktop or server firewall carries, plus one split rule.
// None of them blocks the benchmark's traffic (10.201.0.0/24 and 10.202.0.0/24 over ports 5000-5099, and
// SplitRemote), which TestPolicyAllowsBenchmarkTraffic proves against the compiled policy. The rules are
// generated from a fixed seed, so every run uses the same policy.
func wardenConfig(p policyParams) string {
	r := rand.New(rand.NewPCG(9, 1000))
	var b strings.Builder
	fmt.Fprintf(&b, "fail_mode: open\ndefault_action: allow\ninbound_default: allow\n")
	fmt.Fprintf(&b, "control: {socket: %q}\nlog: {level: warn}\n", p.Socket)
	mode := p.SplitMode
	if mode == "" {
		mode = "proxy"
	}
	handoff := ""
	if p.KernelHandoff {
		handoff = ", kernel_handoff: true" // only then: a --compare build from before the option rejects the key
	}
	fmt.Fprintf(&b, "split_tunnel: {interface: %s, mode: %s, max_sessions: 4096%s}\nrules:\n", p.SplitVia, mode, handoff)
	n := 0
	rule := func(format string, args ...any) {
		fmt.Fprintf(&b, "  - {name: r%04d, %s}\n", n, fmt.Sprintf(format, args...))
		n++
	}
	// Public addresses only: nothing in 10/8, 127/8 or 192.0.2/24, where the benchmark runs.
	cidr := func() string {
		a := 20 + r.IntN(180)
		switch bits := []int{32, 32, 24, 24, 16, 20}[r.IntN(6)]; bits {
		case 32:
			return fmt.Sprintf("%d.%d.%d.%d", a, r.IntN(256), r.IntN(256), 1+r.IntN(254))
		case 24:
			return fmt.Sprintf("%d.%d.%d.0/24", a, r.IntN(256), r.IntN(256))
		case 20:
			return fmt.Sprintf("%d.%d.%d.0/20", a, r.IntN(256), r.IntN(16)*16)
		default:
			return fmt.Sprintf("%d.%d.0.0/16", a, r.IntN(256))
		}
	}
	cidrs := func(k int) string {
		s := make([]string, k)
		for i := range s {
			s[i] = cidr()
		}
		return strings.Join(s, ", ")
	}
	// Service ports outside the benchmark's 5000-5099 and the proxy's 719.
	port := func() int {
		for {
			if q := 1 + r.IntN(65535); (q < 5000 || q > 5099) && q != 719 {
				return q
			}
		}
	}
	domainRule := func() {
		rule("action: block, remote: [\"*.tracker%d.example\", ads%d.example.net, \"*.cdn%d.example.org\"]", n, n, n)
	}
	actions := []string{"block", "block", "drop"}
	target := p.Rules - 1 // the split rule comes last
	for n < target {
		switch k := n % 10; k {
		case 0, 1, 2: // address block lists (ad and malware feeds)
			rule("action: %s, remote: [%s]", actions[r.IntN(3)], cidrs(1+r.IntN(8)))
		case 3: // domain block lists
			domainRule()
		case 4: // applications: allow-listed to their ports, or blocked
			switch pick := r.IntN(2); {
			case p.NoApps: // the same draws, so every other rule stays the same
				domainRule()
			case pick == 0:
				rule("action: block, app: \"/opt/vendor%d/**\", protocol: tcp, ports: [\"1-442\", \"444-65535\"]", n)
			default:
				rule("action: block, app: /usr/bin/tool%d", n)
			}
		case 5: // ports
			rule("action: block, protocol: %s, ports: [%d, \"%d-%d\"]", []string{"tcp", "udp"}[r.IntN(2)], port(), 6000+n, 6000+n+3)
		case 6: // users
			rule("action: block, user: \"%d\", remote: [%s]", 20000+n, cidrs(1))
		case 7: // inbound services
			rule("action: %s, direction: inbound, protocol: tcp, ports: [%d]", []string{"allow", "block"}[r.IntN(2)], port())
		case 8: // interfaces (a VPN that must not carry some destinations)
			rule("action: drop, interface: wg%d, remote: [%s]", n%4, cidrs(2))
		case 9: // allows for known services
			rule("action: allow, protocol: tcp, remote: [%s], ports: [443, 80]", cidrs(2))
		}
	}
	rule("action: split, remote: [%s], via: %s", p.SplitRemote, p.SplitVia)
	return b.String()
}
