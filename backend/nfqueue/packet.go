package nfqueue

import (
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/warden-fw/warden/backend"
)

// verdicter answers the kernel for one queue: NF_ACCEPT with a packet mark. The Linux queue implements it;
// tests use a fake.
type verdicter interface {
	// verdict accepts the packet with mark, or with keepForeignMark lets the queue's hook run again with the
	// packet's own mark untouched (NF_REPEAT), which the rules take as "accepted" for a foreign-marked packet.
	verdict(id uint32, mark uint32) error
}

// keepForeignMark is the verdict "accept, keeping the packet's foreign mark". 0 is never a verdict mark.
const keepForeignMark = 0

// Packet states. A packet moves pending → applying → done exactly once; whoever wins the first step (the
// pipeline's Apply, the verdict timeout or Stop) answers the kernel.
const (
	statePending uint32 = iota
	stateApplying
	stateDone
)

// packet is the nfqueue backend's backend.Packet. It is pooled. A packet the pipeline answered is recycled once
// it is recycleGrace old (swept from the deadline ring as new packets arrive), so a pipeline that calls Apply a
// second time within that grace reliably gets ErrAlreadyApplied, while the ring and the pool hold only the
// packets of the last moments, not of the whole verdict timeout. One answered by the timeout (the pipeline may
// still answer later) is never recycled.
type packet struct {
	info    backend.Info
	hdr     headers
	payload []byte
	id      uint32
	q       verdicter
	e       *engine
	state   atomic.Uint32
}

var _ backend.Packet = (*packet)(nil)

// Info returns the parsed connection info.
func (p *packet) Info() *backend.Info { return &p.info }

// Payload returns the packet's first bytes (the queue's copy range).
func (p *packet) Payload() []byte { return p.payload }

// Apply answers the kernel with the decision's mark.
func (p *packet) Apply(d backend.Decision) error {
	if !p.state.CompareAndSwap(statePending, stateApplying) {
		return backend.ErrAlreadyApplied
	}
	mark, err := markFor(d, p.e.failMode)
	if p.info.Mark != 0 && err == nil && d.Verdict == backend.Accept && !d.Final {
		// Another program's mark (a VPN's routing mark) on a connection's first packet: replacing it would
		// route the packet as if it had none. The hook runs again with the mark intact and records the accept
		// in the connmark only.
		mark = keepForeignMark
	}
	if verr := p.q.verdict(p.id, mark); verr != nil {
		p.e.verdictErrors.Add(1)
		err = errors.Join(err, fmt.Errorf("setting verdict for packet %d: %w", p.id, verr))
	}
	p.state.Store(stateDone)
	return err
}

// applyFailMode answers with the fail-mode verdict unless someone already answered. It reports whether it
// answered.
func (p *packet) applyFailMode() bool {
	if !p.state.CompareAndSwap(statePending, stateApplying) {
		return false
	}
	if err := p.q.verdict(p.id, failMark(p.e.failMode)); err != nil {
		p.e.verdictErrors.Add(1)
	}
	p.state.Store(stateDone)
	return true
}

// meta is what the queue tells about a packet besides its bytes.
type meta struct {
	id      uint32
	out     bool // the packet leaves this host (output hook)
	dir     backend.Direction
	ifIndex int
	uid     int32
	mark    uint32
}

// engine is the OS-neutral heart of the backend: it turns queued packets into pooled packet handles, hands
// them to the pipeline, and guarantees each gets exactly one verdict (the pipeline's, the timeout's or
// Stop's).
type engine struct {
	log      *slog.Logger
	failMode backend.FailMode
	handler  backend.Handler
	dl       *deadlines

	// pool recycles packet handles: every queued packet needs one, and at new-connection rates the garbage
	// would otherwise dominate the hot path.
	pool sync.Pool

	stopping atomic.Bool

	packets       atomic.Uint64
	parseErrors   atomic.Uint64
	timeouts      atomic.Uint64
	verdictErrors atomic.Uint64
}

func newEngine(log *slog.Logger, fm backend.FailMode, timeout time.Duration, h backend.Handler) *engine {
	e := &engine{log: log, failMode: fm, handler: h}
	e.pool.New = func() any { return new(packet) }
	e.dl = newDeadlines(timeout, e.expire)
	e.dl.recycle = e.recycle
	return e
}

// receive handles one queued packet. It runs on the queue's reading goroutine and must not block.
func (e *engine) receive(q verdicter, m *meta, payload []byte) {
	e.packets.Add(1)
	p := e.pool.Get().(*packet)
	p.q, p.e, p.id, p.payload = q, e, m.id, payload
	p.state.Store(statePending)
	if err := parseHeaders(payload, &p.hdr); err != nil {
		e.parseErrors.Add(1)
		// Nothing to decide on: the fail-mode verdict, and the handle goes straight back.
		p.applyFailMode()
		e.recycle(p)
		return
	}
	p.info = backend.Info{IfIndex: m.ifIndex, PID: backend.Unknown, UID: m.uid, Mark: m.mark}
	fillInfo(&p.hdr, m.out, m.dir, &p.info)
	if e.stopping.Load() {
		p.applyFailMode()
		e.recycle(p)
		return
	}
	if !e.dl.push(p) {
		// Stop closed the deadlines between the check above and now.
		p.applyFailMode()
		e.recycle(p)
		return
	}
	e.handler.HandlePacket(p)
}

// expire is called by the deadline goroutine when a packet's deadline passed.
func (e *engine) expire(p *packet) {
	if p.applyFailMode() {
		e.timeouts.Add(1)
		// Not recycled: the pipeline may still hold it and call Apply late; it must see ErrAlreadyApplied.
		return
	}
	if p.state.Load() == stateDone {
		e.recycle(p)
	}
}

func (e *engine) recycle(p *packet) {
	p.payload, p.q = nil, nil
	e.pool.Put(p)
}

// drain answers every pending packet with the fail-mode verdict (used by Stop).
func (e *engine) drain() {
	e.dl.drain(func(p *packet) { p.applyFailMode() })
}

func (e *engine) stats() backend.Stats {
	return backend.Stats{
		Packets:         e.packets.Load(),
		ParseErrors:     e.parseErrors.Load(),
		VerdictTimeouts: e.timeouts.Load(),
	}
}

// recycleGrace is how long after its arrival an answered packet stays out of the pool (see packet). A pipeline
// drops a packet within microseconds of answering it; the grace is there to catch one that answers twice.
// It is short because the sweep reads each packet again when it leaves the ring: with 250 ms, at 15 000 new
// flows per second, that read found a packet 250 ms old, out of the cache, and the deadline ring cost 0.77 µs
// of the daemon's CPU per flow; with 20 ms, 0.27 µs (a 20 s profiled udp_flows run of wardenbench each).
const recycleGrace = 20 * time.Millisecond

// deadlines is the one timer structure for verdict timeouts: a FIFO ring of (deadline, packet) serviced by a
// single goroutine. Every packet gets the same timeout and deadlines are computed under the lock, so
// insertion order is deadline order and a FIFO is as good as a heap, at O(1) per packet and no allocation once
// the ring has grown. Each push also sweeps answered packets older than recycleGrace off the head of the ring
// (decisions take well under that, so the head is almost always answered): the ring holds about
// rate x recycleGrace packets instead of rate x timeout.
type deadlines struct {
	timeout time.Duration
	expire  func(*packet)
	// recycle, when set, takes back answered packets swept off the ring early.
	recycle func(*packet)
	epoch   time.Time
	// now returns the time since epoch; tests replace it.
	now  func() time.Duration
	wake chan struct{}

	mu     sync.Mutex
	ring   []dlEntry
	head   int
	n      int
	closed bool
}

type dlEntry struct {
	at time.Duration // since epoch (monotonic)
	p  *packet
}

func newDeadlines(timeout time.Duration, expire func(*packet)) *deadlines {
	d := &deadlines{
		timeout: timeout,
		expire:  expire,
		epoch:   time.Now(),
		wake:    make(chan struct{}, 1),
		ring:    make([]dlEntry, 1024),
	}
	d.now = func() time.Duration { return time.Since(d.epoch) }
	return d
}

// push schedules p's deadline. It reports false, scheduling nothing, after drain.
func (d *deadlines) push(p *packet) bool {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return false
	}
	now := d.now()
	if d.recycle != nil {
		d.sweepLocked(now)
	}
	if d.n == len(d.ring) {
		d.growLocked()
	}
	d.ring[(d.head+d.n)%len(d.ring)] = dlEntry{at: now + d.timeout, p: p}
	d.n++
	wasEmpty := d.n == 1
	d.mu.Unlock()
	if wasEmpty {
		select {
		case d.wake <- struct{}{}:
		default:
		}
	}
	return true
}

// sweepLocked recycles answered packets pushed at least recycleGrace ago from the head of the ring, stopping
// at the first that is younger or still pending. Bounded: at most a few per push in the steady state.
func (d *deadlines) sweepLocked(now time.Duration) {
	for d.n > 0 {
		e := &d.ring[d.head]
		if now-(e.at-d.timeout) < recycleGrace || e.p.state.Load() != stateDone {
			return
		}
		p := e.p
		e.p = nil
		d.head = (d.head + 1) % len(d.ring)
		d.n--
		d.recycle(p)
	}
}

func (d *deadlines) growLocked() {
	ring := make([]dlEntry, 2*len(d.ring))
	for i := range d.n {
		ring[i] = d.ring[(d.head+i)%len(d.ring)]
	}
	d.ring, d.head = ring, 0
}

// popExpiredLocked removes and returns the head entry if its deadline is at or before now; otherwise it
// returns the time to wait (or -1 when empty).
func (d *deadlines) popExpiredLocked(now time.Duration) (*packet, time.Duration) {
	if d.n == 0 {
		return nil, -1
	}
	e := &d.ring[d.head]
	if e.at > now {
		return nil, e.at - now
	}
	p := e.p
	e.p = nil
	d.head = (d.head + 1) % len(d.ring)
	d.n--
	return p, 0
}

// run services the deadlines until stop is closed.
func (d *deadlines) run(stop <-chan struct{}) {
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		d.mu.Lock()
		p, wait := d.popExpiredLocked(d.now())
		d.mu.Unlock()
		if p != nil {
			d.expire(p)
			continue
		}
		if wait < 0 {
			select {
			case <-d.wake:
			case <-stop:
				return
			}
			continue
		}
		timer.Reset(wait)
		select {
		case <-timer.C:
		case <-d.wake:
			// A push into an empty ring cannot have an earlier deadline than what we wait for, but a
			// spurious wake is harmless: loop and recompute.
		case <-stop:
			return
		}
	}
}

// drain closes the structure and hands every remaining packet to f. Later pushes answer at once.
func (d *deadlines) drain(f func(*packet)) {
	d.mu.Lock()
	d.closed = true
	entries := make([]*packet, 0, d.n)
	for d.n > 0 {
		e := &d.ring[d.head]
		entries = append(entries, e.p)
		e.p = nil
		d.head = (d.head + 1) % len(d.ring)
		d.n--
	}
	d.mu.Unlock()
	for _, p := range entries {
		f(p)
	}
}
