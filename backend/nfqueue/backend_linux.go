package nfqueue

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/warden-fw/warden/backend"
	"github.com/warden-fw/warden/backend/nfqueue/ctdump"
	"github.com/warden-fw/warden/backend/nslock"
)

func init() {
	backend.Register("nfqueue", true, func(o backend.Options) (backend.Backend, error) {
		b, err := New(o, Config{})
		if err != nil {
			// Return a nil interface, not a typed nil.
			return nil, err
		}
		return b, nil
	})
}

// Backend is the NFQUEUE backend. Create it with New; Start and Stop may alternate.
type Backend struct {
	s settings

	// mu guards the running state below; Start and Stop hold it throughout.
	mu      sync.Mutex
	running bool
	eng     *engine
	fw      *firewall
	queues  []*queue
	nums    map[uint16]bool
	cancel  context.CancelFunc
	stopDL  chan struct{}
	stopW   chan struct{}
	wg      sync.WaitGroup

	// lock is the namespace's instance lock, held while running (see lockInstance).
	lock *nslock.Lock

	// bytes reads connections' byte counts from conntrack (ConnBytes); it has its own lock.
	bytes byteCounter

	// Counters that outlive one Start/Stop cycle.
	prev struct {
		stats    backend.Stats
		overruns uint64
	}
}

var (
	_ backend.Backend       = (*Backend)(nil)
	_ backend.Reevaluator   = (*Backend)(nil)
	_ backend.Resetter      = (*Backend)(nil)
	_ backend.StatsReporter = (*Backend)(nil)
	_ backend.LiveReporter  = (*Backend)(nil)
)

// New returns an NFQUEUE backend with o's options and c's nfqueue-specific settings. It touches nothing in
// the kernel until Start.
func New(o backend.Options, c Config) (*Backend, error) {
	s, err := resolve(o, c)
	if err != nil {
		return nil, err
	}
	return &Backend{s: s}, nil
}

// Name returns "nfqueue".
func (b *Backend) Name() string { return "nfqueue" }

// Capabilities reports what NFQUEUE tells and can do: the socket's UID, not its PID.
func (b *Backend) Capabilities() backend.Capabilities {
	return backend.Capabilities{UserID: true, Reroute: true, LiveUpdate: true}
}

// Start cleans up whatever a crashed run left, binds the queues and installs the rules, then keeps the jump
// rules first until Stop. ctx bounds the start only.
func (b *Backend) Start(ctx context.Context, h backend.Handler) (err error) {
	if h == nil {
		return errors.New("nfqueue: nil handler")
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.running {
		return errors.New("nfqueue: already started")
	}
	// Before anything is touched: what looks like a crashed run's leftovers may be another instance's rules.
	if b.lock, err = lockInstance(); err != nil {
		return err
	}
	defer func() {
		if err != nil {
			b.unlockInstance()
		}
	}()
	fw, err := newFirewall(b.s.log, b.s.ruleParams(), b.s.cfg.NoIPv6)
	if err != nil {
		return err
	}
	// Leftovers of a crashed run: rules first (nothing is queued or marked any more), then the decisions it
	// saved in conntrack.
	if err := fw.remove(); err != nil {
		return fmt.Errorf("removing leftover rules: %w", err)
	}
	if err := flushMarked(); err != nil {
		return fmt.Errorf("removing leftover conntrack marks: %w", err)
	}
	if err := ctx.Err(); err != nil {
		return err
	}

	eng := newEngine(b.s.log, b.s.failMode, b.s.timeout, h)
	stopDL := make(chan struct{})
	b.stopDL = stopDL
	b.wg.Add(1)
	go func() {
		defer b.wg.Done()
		eng.dl.run(stopDL)
	}()
	qctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	b.eng, b.fw, b.cancel = eng, fw, cancel
	b.nums = make(map[uint16]bool)
	defer func() {
		if err != nil {
			b.teardownLocked()
		}
	}()
	// Queues are bound before any rule sends packets to them, so no first packet is bypassed.
	for _, r := range []struct {
		qr  queueRange
		dir backend.Direction
	}{{b.s.out, backend.Outbound}, {b.s.in, backend.Inbound}} {
		for n := r.qr.First; ; n++ {
			q, err := openQueue(qctx, n, r.dir, &b.s, eng)
			if err != nil {
				return err
			}
			b.queues = append(b.queues, q)
			b.nums[n] = true
			if n == r.qr.Last {
				break
			}
		}
	}
	if err := fw.install(); err != nil {
		return err
	}
	stopW := make(chan struct{})
	b.stopW = stopW
	b.wg.Add(1)
	go func() {
		defer b.wg.Done()
		b.watch(fw, stopW)
	}()
	b.running = true
	b.s.log.Info("nfqueue backend started", "out_queues", fmt.Sprintf("%d-%d", b.s.out.First, b.s.out.Last),
		"in_queues", fmt.Sprintf("%d-%d", b.s.in.First, b.s.in.Last), "fail_mode", b.s.failMode.String())
	return nil
}

// Stop stops taking new packets, removes every rule, answers every pending packet with the fail-mode
// verdict and closes the queues. It is safe to call more than once.
func (b *Backend) Stop() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.running {
		return nil
	}
	b.running = false
	b.bytes.close()
	err := b.teardownLocked()
	b.unlockInstance()
	return err
}

// unlockInstance releases the instance lock, once every rule is gone.
func (b *Backend) unlockInstance() {
	b.lock.Release()
	b.lock = nil
}

// teardownLocked undoes whatever Start did so far, in the order that never lets an undecided packet pass
// unenforced longer than necessary.
func (b *Backend) teardownLocked() error {
	var errs []error
	eng := b.eng
	eng.stopping.Store(true)
	if b.stopW != nil {
		close(b.stopW)
		b.stopW = nil
	}
	if b.fw != nil {
		if err := b.fw.remove(); err != nil {
			errs = append(errs, err)
		}
	}
	eng.drain()
	drops, derr := queueDrops(b.nums)
	if derr == nil {
		b.prev.overruns += drops
	}
	b.cancel()
	for _, q := range b.queues {
		b.prev.overruns += q.enobufs.Load()
		b.prev.stats.ParseErrors += q.reader.Malformed.Load()
		if err := q.close(); err != nil {
			errs = append(errs, fmt.Errorf("closing queue %d: %w", q.num, err))
		}
	}
	close(b.stopDL)
	b.wg.Wait()
	st := eng.stats()
	b.prev.stats.Packets += st.Packets
	b.prev.stats.ParseErrors += st.ParseErrors
	b.prev.stats.VerdictTimeouts += st.VerdictTimeouts
	b.queues, b.eng, b.fw, b.cancel, b.nums = nil, nil, nil, nil, nil
	return errors.Join(errs...)
}

// watch keeps the jump rules first. It reads the nf_tables generation every interval; when the ruleset
// changed, it reads the chains through nf_tables netlink and runs iptables (to list and repair) only when a
// jump is not first. With legacy iptables, where the generation says nothing, it lists with iptables every
// interval.
func (b *Backend) watch(fw *firewall, stop <-chan struct{}) {
	var gw *genWatcher
	if iptablesIsNFT() {
		if g, err := dialGenWatcher(); err == nil {
			gw = g
			defer gw.Close()
		} else {
			b.s.log.Warn("watching jump rules without the nf_tables generation", "err", err)
		}
	}
	// With the kernel's change announcements a change is checked at once, and the ticker is only the
	// safety net: it runs ten times slower, so an idle daemon wakes less.
	interval := b.s.cfg.WatchInterval
	wake := make(chan struct{}, 1)
	if gw != nil {
		if unsubscribe, err := notifyChanges(wake); err == nil {
			defer unsubscribe()
			interval *= 10
		} else {
			b.s.log.Debug("watching the rules by polling alone", "err", err)
		}
	}
	var lastGen uint32
	haveGen := false
	t := time.NewTicker(interval)
	defer t.Stop()
	for tick := 0; ; tick++ {
		select {
		case <-stop:
			return
		case <-t.C:
		case <-wake:
		}
		// Without the generation, listing every chain costs an iptables run each: the chains are checked on
		// every tenth tick, the jumps (which other programs move far more often) on every one.
		checkChains := gw != nil || tick%10 == 0
		if gw != nil {
			g, err := gw.generation()
			if err == nil && haveGen && g == lastGen {
				continue
			}
			// Remember the generation read before checking: a change during the check is seen next time.
			lastGen, haveGen = g, err == nil
			// One netlink dump per chain tells whether anything needs a closer look; iptables runs only then.
			if ok, err := fw.jumpsFirst(gw); err == nil && ok {
				continue
			} else if err != nil {
				b.s.log.Debug("reading the jump rules through nf_tables netlink", "err", err)
			}
		}
		if checkChains {
			if _, err := fw.enforceChains(); err != nil {
				b.s.log.Warn("checking Warden's chains", "err", err)
			}
		}
		if _, err := fw.enforceFirst(); err != nil {
			b.s.log.Warn("checking jump rules", "err", err)
		}
	}
}

// SetRouteSplit installs or removes the source NAT of split connections routed in the kernel
// (backend.RouteSplitter). Stopped, it changes what the next Start installs.
func (b *Backend) SetRouteSplit(on bool) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.s.routeSplit = on
	if b.fw == nil {
		return nil
	}
	return b.fw.setSplitSNAT(on)
}

// Reevaluate deletes the conntrack entries of exactly the changed connections, so their next packet is
// queued again and meets the new decision.
func (b *Backend) Reevaluate(changes []backend.ConnChange) error {
	return deleteFlows(changes)
}

// LiveConnections lists the namespace's conntrack table (backend.LiveReporter). For every entry that can still
// carry packets (a TCP entry in TIME_WAIT or CLOSE is over) it reports two keys: the original tuple, which is
// how Warden keys an outbound connection (the tuple before any NAT of ours), and the reply tuple, which is how it
// keys an inbound one (what this host sees, after any DNAT in front of it).
func (b *Backend) LiveConnections(live func(backend.ConnKey)) error {
	return ctdump.Dump(func(f *ctdump.Flow) {
		p := backend.Protocol(f.Proto)
		if !p.HasPorts() || f.Ended() {
			return
		}
		live(backend.ConnKey{Protocol: p, Local: f.Orig.Src, Remote: f.Orig.Dst})
		live(backend.ConnKey{Protocol: p, Local: f.Reply.Src, Remote: f.Reply.Dst})
	})
}

// ResetAll forgets every decision the kernel keeps (the conntrack entries carrying Warden's permanent marks).
func (b *Backend) ResetAll() error {
	return flushMarked()
}

// Stats returns the backend's counters, accumulated over every Start/Stop cycle.
func (b *Backend) Stats() backend.Stats {
	b.mu.Lock()
	defer b.mu.Unlock()
	st := b.prev.stats
	st.QueueOverruns = b.prev.overruns
	if b.eng != nil {
		cur := b.eng.stats()
		st.Packets += cur.Packets
		st.ParseErrors += cur.ParseErrors
		st.VerdictTimeouts += cur.VerdictTimeouts
		if drops, err := queueDrops(b.nums); err == nil {
			st.QueueOverruns += drops
		}
		for _, q := range b.queues {
			st.QueueOverruns += q.enobufs.Load()
			st.ParseErrors += q.reader.Malformed.Load() // queue messages that named no packet
		}
	}
	return st
}
