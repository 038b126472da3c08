package backend

import (
	"fmt"
)

// Verdict is what the pipeline decided for a connection. The numbering is Warden's own and stable; each backend
// translates it into its kernel's language (a packet mark on Linux, a kext verdict byte on Windows).
type Verdict uint8

// The verdicts, in the order of the table in docs/design (design.md).
const (
	// Undecided means no decision has been made yet.
	Undecided Verdict = iota
	// Undeterminable means the pipeline cannot decide (e.g. the packet could not be parsed).
	Undeterminable
	// Accept lets the connection through.
	Accept
	// Block refuses the connection actively (TCP RST or ICMP administratively prohibited).
	Block
	// Drop discards the connection silently.
	Drop
	// RerouteToNameserver sends the connection (DNS) to the local nameserver.
	RerouteToNameserver
	// RerouteToTunnel sends the connection to the local tunnel endpoint (port 717).
	RerouteToTunnel
	// RerouteToSplitTun sends the connection to the split-tunnel proxy (port 719).
	RerouteToSplitTun
	// Failed means an internal error occurred while deciding; backends apply the fail-mode verdict.
	Failed

	numVerdicts
)

// NumVerdicts is the number of defined verdicts, for tables indexed by Verdict.
const NumVerdicts = int(numVerdicts)

var verdictNames = [numVerdicts]string{
	Undecided:           "undecided",
	Undeterminable:      "undeterminable",
	Accept:              "accept",
	Block:               "block",
	Drop:                "drop",
	RerouteToNameserver: "reroute-nameserver",
	RerouteToTunnel:     "reroute-tunnel",
	RerouteToSplitTun:   "reroute-split",
	Failed:              "failed",
}

// String returns the verdict's lower-case name.
func (v Verdict) String() string {
	if v < numVerdicts {
		return verdictNames[v]
	}
	return fmt.Sprintf("verdict(%d)", uint8(v))
}

// Valid reports whether v is one of the defined verdicts.
func (v Verdict) Valid() bool { return v < numVerdicts }

// IsReroute reports whether v sends the connection to a local endpoint.
func (v Verdict) IsReroute() bool {
	return v == RerouteToNameserver || v == RerouteToTunnel || v == RerouteToSplitTun
}

// Decision is a verdict plus how long the kernel should keep it.
type Decision struct {
	Verdict Verdict
	// Permanent asks the kernel to keep the verdict for the whole connection, so that no later packet of it
	// reaches user space. Without it only the one packet is decided.
	Permanent bool
	// Final marks Warden's own traffic: accepted in a way that rules other software adds later cannot
	// override. Only valid with Accept; it implies Permanent.
	Final bool
	// Route, on RerouteToSplitTun only, names the kernel route (1..MaxSplitRoutes) that carries the connection
	// out of its split interface without the proxy (Linux policy routing). 0 sends it to the proxy.
	Route uint8
}

// MaxSplitRoutes is the number of kernel routes split connections can be given (Decision.Route).
const MaxSplitRoutes = 16

// Common decisions.
var (
	AcceptFinal = Decision{Verdict: Accept, Permanent: true, Final: true}
)

// Validate reports whether the decision is one a backend can apply.
func (d Decision) Validate() error {
	if !d.Verdict.Valid() {
		return fmt.Errorf("invalid verdict %d", uint8(d.Verdict))
	}
	if d.Final && (d.Verdict != Accept || !d.Permanent) {
		return fmt.Errorf("final is only valid on a permanent accept, not on %s", d)
	}
	if d.Route != 0 && (d.Verdict != RerouteToSplitTun || d.Route > MaxSplitRoutes) {
		return fmt.Errorf("route %d is only valid on reroute-split, 1 to %d", d.Route, MaxSplitRoutes)
	}
	return nil
}

// String renders the decision as e.g. "accept", "block-permanent" or "accept-final".
func (d Decision) String() string {
	switch {
	case d.Final:
		return d.Verdict.String() + "-final"
	case d.Permanent:
		return d.Verdict.String() + "-permanent"
	default:
		return d.Verdict.String()
	}
}
