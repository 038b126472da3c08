package nfqueue

import (
	"fmt"

	"github.com/warden-fw/warden/backend"
	"github.com/warden-fw/warden/backend/nfqueue/marks"
)

// markFor translates a decision into the packet mark the iptables rules enforce. Every packet is answered
// NF_ACCEPT with one of these marks; there is no path that yields a mark the rules do not know. Decisions
// that do not decide (undecided, undeterminable, failed) and invalid ones get the fail mode's mark; an invalid
// decision also returns an error so the caller hears about the bug.
func markFor(d backend.Decision, fm backend.FailMode) (uint32, error) {
	if err := d.Validate(); err != nil {
		return failMark(fm), fmt.Errorf("applying fail-mode verdict instead: %w", err)
	}
	switch d.Verdict {
	case backend.Accept:
		switch {
		case d.Final:
			return marks.AcceptFinal, nil
		case d.Permanent:
			return marks.AcceptAlways, nil
		}
		return marks.Accept, nil
	case backend.Block:
		if d.Permanent {
			return marks.BlockAlways, nil
		}
		return marks.Block, nil
	case backend.Drop:
		if d.Permanent {
			return marks.DropAlways, nil
		}
		return marks.Drop, nil
	// The reroute marks are always saved to the connmark: a connection is either redirected as a whole or
	// not at all, since the NAT binding is made on its first packet anyway.
	case backend.RerouteToTunnel:
		return marks.RerouteTunnel, nil
	case backend.RerouteToSplitTun:
		if d.Route != 0 {
			return marks.SplitRoute(d.Route), nil
		}
		return marks.RerouteSplit, nil
	case backend.RerouteToNameserver:
		return marks.RerouteNS, nil
	}
	// Undecided, Undeterminable, Failed.
	return failMark(fm), nil
}

// failMark is the mark of the fail mode's decision (never permanent, so the next packet is asked again).
func failMark(fm backend.FailMode) uint32 {
	if fm.Decision().Verdict == backend.Accept {
		return marks.Accept
	}
	return marks.Drop
}
