package windowskext

import (
	"errors"
	"sync/atomic"
	"time"

	"github.com/warden-fw/warden/backend"
)

// packet is a connection info waiting for its verdict.
type packet struct {
	r       *run
	id      uint64
	info    backend.Info
	payload []byte

	// done is set by whoever answers first: Apply, the timeout or Stop.
	done atomic.Bool

	deadline time.Time
	index    int // position in run.pending, -1 when not queued; guarded by run.pmu
}

var _ backend.Packet = (*packet)(nil)

// Info returns the parsed connection info.
func (p *packet) Info() *backend.Info { return &p.info }

// Payload returns the packet the driver delivered: empty for an outbound TCP connect at the ALE layer, the
// transport packet (payload layer 4) or the whole IP packet (layer 3) otherwise.
func (p *packet) Payload() []byte { return p.payload }

// Apply sends the decision's verdict for this packet. Only the first call takes effect.
func (p *packet) Apply(d backend.Decision) error {
	if !p.done.CompareAndSwap(false, true) {
		return backend.ErrAlreadyApplied
	}
	p.r.dequeue(p)
	v, verr := KextVerdict(d, p.r.b.opts.FailMode)
	return errors.Join(verr, p.r.sendVerdict(p.id, v))
}

// pendingHeap orders pending packets by deadline.
type pendingHeap []*packet

func (h pendingHeap) less(i, j int) bool { return h[i].deadline.Before(h[j].deadline) }

func (h pendingHeap) swap(i, j int) {
	h[i], h[j] = h[j], h[i]
	h[i].index = i
	h[j].index = j
}

func (h pendingHeap) up(i int) {
	for i > 0 {
		parent := (i - 1) / 2
		if !h.less(i, parent) {
			return
		}
		h.swap(i, parent)
		i = parent
	}
}

func (h pendingHeap) down(i int) {
	for {
		l := 2*i + 1
		if l >= len(h) {
			return
		}
		m := l
		if r := l + 1; r < len(h) && h.less(r, l) {
			m = r
		}
		if !h.less(m, i) {
			return
		}
		h.swap(i, m)
		i = m
	}
}

func (h *pendingHeap) push(p *packet) {
	p.index = len(*h)
	*h = append(*h, p)
	h.up(p.index)
}

// remove takes out the packet at i.
func (h *pendingHeap) remove(i int) *packet {
	old := *h
	n := len(old) - 1
	p := old[i]
	if i != n {
		old.swap(i, n)
	}
	old[n] = nil
	*h = old[:n]
	if i != n {
		h.down(i)
		h.up(i)
	}
	p.index = -1
	return p
}

// enqueue adds p to the pending packets, waking the timeout goroutine if p is now the first to expire. It
// reports false when the run is draining and p must be answered at once.
func (r *run) enqueue(p *packet) bool {
	r.pmu.Lock()
	if r.draining {
		r.pmu.Unlock()
		return false
	}
	r.pending.push(p)
	first := p.index == 0
	r.pmu.Unlock()
	if first {
		select {
		case r.wake <- struct{}{}:
		default:
		}
	}
	return true
}

func (r *run) dequeue(p *packet) {
	r.pmu.Lock()
	if p.index >= 0 {
		r.pending.remove(p.index)
	}
	r.pmu.Unlock()
}

// timeouts is the one goroutine and one timer behind every pending packet's deadline.
func (r *run) timeouts(t Timer) {
	defer r.wg.Done()
	defer t.Stop()
	var scratch []*packet
	for {
		r.pmu.Lock()
		var next time.Time
		if len(r.pending) > 0 {
			next = r.pending[0].deadline
		}
		r.pmu.Unlock()
		if !next.IsZero() {
			t.Reset(next.Sub(r.clock.Now()))
		}
		select {
		case <-r.stop:
			return
		case <-r.wake:
			t.Stop()
		case <-t.C():
			scratch = r.expire(r.clock.Now(), scratch)
		}
	}
}

// expire answers every packet whose deadline has passed with the fail-mode verdict. scratch is reused
// between calls to avoid an allocation per expiry.
func (r *run) expire(now time.Time, scratch []*packet) []*packet {
	exp := scratch[:0]
	r.pmu.Lock()
	for len(r.pending) > 0 && !r.pending[0].deadline.After(now) {
		exp = append(exp, r.pending.remove(0))
	}
	r.pmu.Unlock()
	for i, p := range exp {
		exp[i] = nil
		if !p.done.CompareAndSwap(false, true) {
			continue // Apply won the race
		}
		r.b.timeouts.Add(1)
		if err := r.sendVerdict(p.id, r.failV); err != nil {
			r.b.log.Warn("answering a timed-out packet failed", "packet", p.id, "err", err)
		}
		r.b.log.Debug("verdict timeout", "packet", p.id, "conn", &p.info, "verdict", r.failV)
	}
	return exp[:0]
}

// answerPending stops queueing and answers every pending packet with the fail-mode verdict.
func (r *run) answerPending() {
	r.pmu.Lock()
	r.draining = true
	ps := r.pending
	r.pending = nil
	for _, p := range ps {
		p.index = -1
	}
	r.pmu.Unlock()
	for _, p := range ps {
		if p.done.CompareAndSwap(false, true) {
			if err := r.sendVerdict(p.id, r.failV); err != nil {
				r.b.log.Warn("answering a pending packet at stop failed", "packet", p.id, "err", err)
			}
		}
	}
}
