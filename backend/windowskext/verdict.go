package windowskext

import (
	"fmt"

	"github.com/warden-fw/warden/backend"
	"github.com/warden-fw/warden/backend/windowskext/kextproto"
)

// KextVerdict translates a decision into the driver's verdict byte (design.md, kext-protocol.md 1.5):
//
//	Undecided 0, Undeterminable 1, Accept 2 (permanent or final: 3), Block 4 (5), Drop 6 (7),
//	RerouteToNameserver 8, RerouteToTunnel 9, RerouteToSplitTun 11, Failed 10 or per fail mode.
//
// Accept-final is 3: the driver itself hard-permits the connections of the process that opened its device, and
// Warden's WFP rule covers its executable. Failed is the driver's own Failed (a block) under fail-closed, and a
// plain accept under fail-open, as a failure to decide must not block when the user chose to fail open.
//
// The driver silently discards a packet whose verdict value it does not know, so an invalid decision is never
// passed through: it gets the fail mode's verdict, together with an error saying so.
func KextVerdict(d backend.Decision, fm backend.FailMode) (kextproto.Verdict, error) {
	if err := d.Validate(); err != nil {
		v, _ := KextVerdict(fm.Decision(), fm)
		return v, fmt.Errorf("%w; answered with the fail-mode verdict %s", err, v)
	}
	switch d.Verdict {
	case backend.Undecided:
		return kextproto.VerdictUndecided, nil
	case backend.Undeterminable:
		return kextproto.VerdictUndeterminable, nil
	case backend.Accept:
		if d.Permanent || d.Final {
			return kextproto.VerdictPermanentAccept, nil
		}
		return kextproto.VerdictAccept, nil
	case backend.Block:
		if d.Permanent {
			return kextproto.VerdictPermanentBlock, nil
		}
		return kextproto.VerdictBlock, nil
	case backend.Drop:
		if d.Permanent {
			return kextproto.VerdictPermanentDrop, nil
		}
		return kextproto.VerdictDrop, nil
	case backend.RerouteToNameserver:
		return kextproto.VerdictRerouteToNameserver, nil
	case backend.RerouteToTunnel:
		return kextproto.VerdictRerouteToTunnel, nil
	case backend.RerouteToSplitTun:
		return kextproto.VerdictRerouteToSplitTun, nil
	case backend.Failed:
		if fm == backend.FailClosed {
			return kextproto.VerdictFailed, nil
		}
		return kextproto.VerdictAccept, nil
	}
	// Unreachable while Validate and this switch agree; stay safe if a verdict is added to backend.
	v, _ := KextVerdict(fm.Decision(), fm)
	return v, fmt.Errorf("no kext verdict for %s; answered with the fail-mode verdict %s", d, v)
}
