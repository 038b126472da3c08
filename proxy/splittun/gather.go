package splittun

import (
	"math/bits"
	"time"
)

// A relay direction carrying a bulk flow gathers: it raises its source socket's receive low-water mark, so the
// kernel wakes the relay once per large piece instead of once per arriving burst. Every wake-up is a trip
// through the scheduler for the relay, and on the far side for the application (one redirected message per
// splice with the kernel handoff, one loopback transfer without it); measured on 2 CPUs, with the kernel
// handoff, gathering cut the relay's CPU per proxied MB from about 320 to 180 µs (docs/performance.md).
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
	gatherMark  = 1 << 20 // the highest receive low-water mark; see markFor
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
	set func(mark int) error
	// rcvbuf returns the source socket's receive buffer size (which TCP autotuning grows), 0 if unknown.
	rcvbuf func() int
	mark   int // the mark in force while gathering; 0 while not
	slow   int // gathering reads in a row that moved less than gatherMin
}

// markFor is the mark for a receive buffer of rcvbuf bytes: an eighth of it (a power of two, at most
// gatherMark), 0 when that is under gatherMin. The socket's receive window is about half its buffer or more, so
// the mark stays at a quarter of the window or less and the sender keeps sending while the relay is being
// woken. A mark near the window makes every wake-up find the sender stopped at a closed window, and a mark
// whose buffer needs exceed the socket's is worse: the kernel grows the buffer and clamps the window to the
// mark itself (tcp_set_rcvlowat).
func markFor(rcvbuf int) int {
	m := min(rcvbuf/8, gatherMark)
	if m < gatherMin {
		return 0
	}
	return 1 << (bits.Len(uint(m)) - 1)
}

func (g *gatherer) possible() bool  { return g.set != nil }
func (g *gatherer) gathering() bool { return g.mark > 0 }

// chunk is the most the next read may move.
func (g *gatherer) chunk() int64 {
	if g.gathering() {
		return gatherChunk
	}
	return relayChunk
}

// deadline is the read deadline for a read starting at start: gatherWait while gathering, else round.
func (g *gatherer) deadline(start time.Time, round time.Duration) time.Time {
	if g.gathering() {
		return start.Add(gatherWait)
	}
	return start.Add(round)
}

// filled is told that a read moved a whole chunk in took; it starts gathering when that was fast enough. It
// reports whether gathering started.
func (g *gatherer) filled(took time.Duration) (started bool) {
	g.slow = 0
	if g.set == nil || !g.gathering() && took > gatherEnter {
		return false
	}
	return g.raise()
}

// raise sets the mark for the receive buffer in force, if that is higher than the mark set: autotuning grows
// the buffer during a bulk flow, often after gathering began. It reports whether gathering started.
func (g *gatherer) raise() (started bool) {
	if g.mark >= gatherMark {
		return false
	}
	mark := markFor(g.rcvbuf())
	if mark <= g.mark {
		return false // too small a buffer yet, or the mark is already right
	}
	if err := g.set(mark); err != nil {
		if !g.gathering() {
			g.set = nil // the platform refused the option, or the socket is closing: never again on this socket
		}
		return false
	}
	started, g.mark = !g.gathering(), mark
	return started
}

// expired is told that a gathering read reached its deadline having moved n bytes.
func (g *gatherer) expired(n int64) {
	if !g.gathering() {
		return
	}
	if n >= gatherMin {
		// Most gathering reads end at their deadline, not a full chunk: follow the buffer here.
		g.slow = 0
		g.raise()
		return
	}
	if g.slow++; g.slow < gatherSlowReads {
		return
	}
	// 1 is the kernel's default: wake at the first byte. Should that fail (the socket is closing), stay
	// gathering: the short deadline still bounds every wait.
	if g.set(1) == nil {
		g.mark, g.slow = 0, 0
	}
}
