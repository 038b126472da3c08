package splittun

import (
	"errors"
	"testing"
	"time"
)

// markRecorder stands in for the socket option: it records the marks set and fails when told to.
type markRecorder struct {
	marks  []int
	fail   bool
	rcvbuf int
}

func (r *markRecorder) buffer() int { return r.rcvbuf }

func (r *markRecorder) set(mark int) error {
	if r.fail {
		return errors.New("refused")
	}
	r.marks = append(r.marks, mark)
	return nil
}

func TestGathererStartsOnlyForBulk(t *testing.T) {
	r := &markRecorder{rcvbuf: 8 << 20}
	g := gatherer{set: r.set, rcvbuf: r.buffer}
	if g.chunk() != relayChunk || !g.deadline(time.Unix(0, 0), time.Minute).Equal(time.Unix(60, 0)) {
		t.Fatalf("idle gatherer: chunk %d, deadline %v", g.chunk(), g.deadline(time.Unix(0, 0), time.Minute))
	}
	if g.filled(gatherEnter + time.Microsecond) {
		t.Fatal("a chunk slower than gatherEnter started gathering")
	}
	if !g.filled(gatherEnter) || !g.gathering() {
		t.Fatal("a chunk within gatherEnter did not start gathering")
	}
	if g.filled(time.Microsecond) {
		t.Fatal("started twice")
	}
	if g.chunk() != gatherChunk || !g.deadline(time.Unix(0, 0), time.Minute).Equal(time.Unix(0, 0).Add(gatherWait)) {
		t.Fatalf("gathering: chunk %d, deadline %v", g.chunk(), g.deadline(time.Unix(0, 0), time.Minute))
	}
	// Slow reads: one, or a few in a row, are a sender descheduled for a moment; a read at bulk pace in
	// between starts the count again.
	for range gatherSlowReads - 1 {
		g.expired(gatherMin - 1)
	}
	g.expired(gatherMin)
	for range gatherSlowReads - 1 {
		g.expired(0)
	}
	if !g.gathering() {
		t.Fatalf("stopped gathering after fewer than %d slow reads in a row", gatherSlowReads)
	}
	g.expired(0) // the flow paused, or slowed down for good
	if g.gathering() {
		t.Fatalf("%d slow reads in a row kept gathering", gatherSlowReads)
	}
	if want := []int{gatherMark, 1}; len(r.marks) != 2 || r.marks[0] != want[0] || r.marks[1] != want[1] {
		t.Fatalf("marks set %v, want %v", r.marks, want)
	}
}

func TestGathererFailures(t *testing.T) {
	// The option refused when starting: this socket never gathers.
	r := &markRecorder{fail: true, rcvbuf: 8 << 20}
	g := gatherer{set: r.set, rcvbuf: r.buffer}
	if g.filled(0) || g.gathering() || g.possible() {
		t.Fatalf("gathering %v, possible %v after a refused mark", g.gathering(), g.possible())
	}
	// Refused when stopping: keep the short deadline rather than leave data behind a mark with a long one.
	r = &markRecorder{rcvbuf: 8 << 20}
	g = gatherer{set: r.set, rcvbuf: r.buffer}
	g.filled(0)
	r.fail = true
	for range gatherSlowReads {
		g.expired(0)
	}
	if !g.gathering() || !g.deadline(time.Unix(0, 0), time.Hour).Equal(time.Unix(0, 0).Add(gatherWait)) {
		t.Fatal("a failed reset left the gatherer waiting a whole round behind its mark")
	}
	// Where the platform has no mark, nothing gathers.
	var none gatherer
	if none.possible() || none.filled(0) {
		t.Fatal("a gatherer without a setter gathered")
	}
}

// TestGathererMarkFollowsBuffer: the mark stays at an eighth of the receive buffer, well inside the window, and
// rises as autotuning grows the buffer.
func TestGathererMarkFollowsBuffer(t *testing.T) {
	for _, c := range []struct{ rcvbuf, mark int }{
		{128 << 10, 0}, {511 << 10, 0}, {512 << 10, 64 << 10}, {1282025, 128 << 10}, {4 << 20, 512 << 10}, {8 << 20, 1 << 20}, {32 << 20, gatherMark},
	} {
		if got := markFor(c.rcvbuf); got != c.mark {
			t.Errorf("markFor(%d) = %d, want %d", c.rcvbuf, got, c.mark)
		}
	}
	r := &markRecorder{rcvbuf: 128 << 10}
	g := gatherer{set: r.set, rcvbuf: r.buffer}
	if g.filled(0) || g.gathering() {
		t.Fatal("gathered with a buffer too small for a useful mark")
	}
	r.rcvbuf = 2 << 20
	if !g.filled(0) {
		t.Fatal("did not gather once the buffer had grown")
	}
	r.rcvbuf = 8 << 20
	if g.filled(0) {
		t.Fatal("raising the mark reported a new start")
	}
	r.rcvbuf = 4 << 20 // buffers do not shrink under autotuning; if one did, the mark would stay
	g.filled(0)
	if want := []int{256 << 10, 1 << 20}; len(r.marks) != 2 || r.marks[0] != want[0] || r.marks[1] != want[1] {
		t.Fatalf("marks set %v, want %v", r.marks, want)
	}

	// Reads while gathering mostly end at their deadline: those at bulk pace raise the mark too.
	r = &markRecorder{rcvbuf: 2 << 20}
	g = gatherer{set: r.set, rcvbuf: r.buffer}
	g.filled(0)
	r.rcvbuf = 8 << 20
	g.expired(gatherMin - 1) // a slow read: no system call
	g.expired(gatherMin)
	if want := []int{256 << 10, 1 << 20}; len(r.marks) != 2 || r.marks[0] != want[0] || r.marks[1] != want[1] {
		t.Fatalf("marks set %v, want %v", r.marks, want)
	}
}

func TestHandoffWindow(t *testing.T) {
	for in, want := range map[string]int{
		"4096\t131072\t33554432\n": 33554432, "4096 87380 6291456": 6291456,
		"": 0, "4096 131072": 0, "4096 131072 x": 0, "4096 131072 -1": 0, "1 2 3 4": 0,
	} {
		if got := parseRmemMax([]byte(in)); got != want {
			t.Errorf("parseRmemMax(%q) = %d, want %d", in, got, want)
		}
	}
	if w := handoffWindow(); w < handoffWindowMin {
		t.Fatalf("handoffWindow() = %d, under the minimum %d", w, handoffWindowMin)
	}
	handoffWindowOverride = 1 << 16
	defer func() { handoffWindowOverride = 0 }()
	if w := handoffWindow(); w != 1<<16 {
		t.Fatalf("handoffWindow() = %d with the override set", w)
	}
}
