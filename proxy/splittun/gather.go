package splittun

import "time"

// A relay direction carrying a bulk flow gathers: it raises its source socket's receive low-water mark, so the
// kernel wakes the relay once per large piece instead of once per arriving burst. Every wake-up is a trip
// through the scheduler for the relay, and on the far side for the application (one redirected message per
// splice with the kernel handoff, one loopback transfer without it); measured on 2 CPUs, gathering cut the
// relay's CPU per proxied MB by about a third (docs/performance.md).
//
// The mark holds data back until more arrives, the sender closes, or the receive buffer fills, so a sender
// that pauses mid-stream would leave its last bytes waiting. While gathering, every read therefore ends after
// gatherWait, and the next one's first splice takes whatever waits (splice does not honour the mark): a
// burst's tail waits at most gatherWait. Gathering stops after gatherSlowReads reads in a row moved less than
// gatherMin each (the flow is no longer bulk, or it paused: on 2 busy CPUs a sender is often descheduled for
// a millisecond, so one slow read proves little), and starts again only when a whole relayChunk arrives within
// gatherEnter. So request and response traffic, and flows slower than relayChunk per gatherEnter (128 MB/s),
// never gather and are not delayed.
const (
	relayChunk  = 1 << 20 // what one read moves at most while not gathering, so the relay sees a flow's pace
	gatherChunk = 4 << 20 // the same while gathering (the deadline usually ends a read first)
	gatherMark  = 1 << 20 // the receive low-water mark while gathering (the kernel caps it at half tcp_rmem's maximum)
	gatherWait  = time.Millisecond
	gatherEnter = 8 * time.Millisecond
	// gatherMin per gatherWait is 64 MB/s.
	gatherMin       = 64 << 10
	gatherSlowReads = 4
)

// gatherer is one relay direction's gathering state.
type gatherer struct {
	// set changes the source socket's receive low-water mark; nil where the platform cannot, and the relay
	// then never gathers.
	set  func(mark int) error
	on   bool
	slow int // gathering reads in a row that moved less than gatherMin
}

func (g *gatherer) possible() bool  { return g.set != nil }
func (g *gatherer) gathering() bool { return g.on }

// chunk is the most the next read may move.
func (g *gatherer) chunk() int64 {
	if g.on {
		return gatherChunk
	}
	return relayChunk
}

// deadline is the read deadline for a read starting at start: gatherWait while gathering, else round.
func (g *gatherer) deadline(start time.Time, round time.Duration) time.Time {
	if g.on {
		return start.Add(gatherWait)
	}
	return start.Add(round)
}

// filled is told that a read moved a whole chunk in took; it reports whether gathering started.
func (g *gatherer) filled(took time.Duration) (started bool) {
	g.slow = 0
	if g.on || g.set == nil || took > gatherEnter {
		return false
	}
	if err := g.set(gatherMark); err != nil {
		g.set = nil // the platform refused the option, or the socket is closing: never again on this socket
		return false
	}
	g.on = true
	return true
}

// expired is told that a gathering read reached its deadline having moved n bytes.
func (g *gatherer) expired(n int64) {
	if !g.on {
		return
	}
	if n >= gatherMin {
		g.slow = 0
		return
	}
	if g.slow++; g.slow < gatherSlowReads {
		return
	}
	// 1 is the kernel's default: wake at the first byte. Should that fail (the socket is closing), stay
	// gathering: the short deadline still bounds every wait.
	if g.set(1) == nil {
		g.on, g.slow = false, 0
	}
}
