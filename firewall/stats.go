package firewall

import (
	"os"
	"sync/atomic"

	"github.com/warden-fw/warden/backend"
)

func osGetpid() int { return os.Getpid() }

// counters are the pipeline's own counters; each is one atomic add on its path.
type counters struct {
	packets        atomic.Uint64
	known          atomic.Uint64
	failures       atomic.Uint64
	panics         atomic.Uint64
	late           atomic.Uint64
	applyErrors    atomic.Uint64
	lookups        atomic.Uint64
	lookupsUnknown atomic.Uint64
	lookupsSkipped atomic.Uint64
	lookupsInline  atomic.Uint64
	// verdicts counts applied decisions by kind: the verdict, with accept-final and the permanent variants
	// counted under their verdict and finals also under finalCount.
	verdicts   [backend.NumVerdicts]atomic.Uint64
	finalCount atomic.Uint64
	// ended counts connections forgotten because the kernel no longer tracked them; listingErrors the
	// listings of live connections that failed.
	ended         atomic.Uint64
	listingErrors atomic.Uint64
}

func (c *counters) count(d backend.Decision) {
	if d.Verdict.Valid() {
		c.verdicts[d.Verdict].Add(1)
	}
	if d.Final {
		c.finalCount.Add(1)
	}
}

// Stats is a snapshot of the pipeline's counters.
type Stats struct {
	Packets uint64 `json:"packets"`
	// KnownPackets counts packets of connections already decided.
	KnownPackets uint64            `json:"known_packets"`
	Verdicts     map[string]uint64 `json:"verdicts"`
	// Failures counts packets answered with the fail-mode verdict because deciding failed.
	Failures uint64 `json:"failures"`
	Panics   uint64 `json:"panics"`
	// LateDecisions counts decisions that arrived after the backend had answered (verdict timeout).
	LateDecisions  uint64 `json:"late_decisions"`
	ApplyErrors    uint64 `json:"apply_errors"`
	ProcessLookups uint64 `json:"process_lookups"`
	ProcessUnknown uint64 `json:"process_unknown"`
	ProcessSkipped uint64 `json:"process_lookups_skipped"`
	// ProcessInline counts lookups answered at once on the packet's goroutine, without a worker.
	ProcessInline uint64 `json:"process_lookups_inline"`
	Connections   int    `json:"connections"`
	Evicted       uint64 `json:"connections_evicted"`
	// Ended counts connections forgotten because the kernel stopped tracking them (they ended);
	// ListingErrors counts failed listings of the kernel's live connections.
	Ended         uint64 `json:"connections_ended"`
	ListingErrors uint64 `json:"live_listing_errors"`
	Rules         int    `json:"rules"`
}

// Stats returns a snapshot of the counters.
func (p *Pipeline) Stats() Stats {
	s := Stats{
		Packets: p.stats.packets.Load(), KnownPackets: p.stats.known.Load(),
		Verdicts: make(map[string]uint64, backend.NumVerdicts+1),
		Failures: p.stats.failures.Load(), Panics: p.stats.panics.Load(), LateDecisions: p.stats.late.Load(),
		ApplyErrors: p.stats.applyErrors.Load(), ProcessLookups: p.stats.lookups.Load(),
		ProcessUnknown: p.stats.lookupsUnknown.Load(), ProcessSkipped: p.stats.lookupsSkipped.Load(),
		ProcessInline: p.stats.lookupsInline.Load(),
		Connections:   p.conns.len(), Evicted: p.conns.evicted.Load(), Rules: p.policy.Load().Len(),
		Ended: p.stats.ended.Load(), ListingErrors: p.stats.listingErrors.Load(),
	}
	for v := range p.stats.verdicts {
		if n := p.stats.verdicts[v].Load(); n > 0 {
			s.Verdicts[backend.Verdict(v).String()] = n
		}
	}
	if n := p.stats.finalCount.Load(); n > 0 {
		s.Verdicts["accept-final"] = n
	}
	return s
}

// ConnInfo is a tracked connection as the control API shows it.
type ConnInfo struct {
	Protocol  string `json:"protocol"`
	Direction string `json:"direction"`
	Local     string `json:"local"`
	Remote    string `json:"remote"`
	PID       int32  `json:"pid"`
	App       string `json:"app,omitempty"`
	UID       int32  `json:"uid"`
	Interface string `json:"interface,omitempty"`
	Domain    string `json:"domain,omitempty"`
	Verdict   string `json:"verdict"`
	Rule      string `json:"rule"`
	Source    string `json:"source"`
	Created   int64  `json:"created_unix_ns"`
	// BytesTx and BytesRx are what the connection sent and received, where the backend knows (the Windows
	// driver counts; on Linux, conntrack when its accounting is on); absent otherwise.
	BytesTx *uint64 `json:"bytes_tx,omitempty"`
	BytesRx *uint64 `json:"bytes_rx,omitempty"`
	// Key identifies the connection for backends that keep per-connection data.
	Key backend.ConnKey `json:"-"`
}

// Info renders a connection for display.
func (c *Conn) Info() ConnInfo {
	name, _, source := c.Rule()
	return ConnInfo{
		Protocol: c.Key.Protocol.String(), Direction: c.Direction.String(),
		Local: c.Key.Local.String(), Remote: c.Key.Remote.String(),
		PID: c.PID, App: c.App, UID: c.UID, Interface: c.Interface, Domain: c.Domain,
		Verdict: c.Decision().String(), Rule: name, Source: source, Created: c.Created, Key: c.Key,
	}
}

// Connections returns every tracked connection.
func (p *Pipeline) Connections() []ConnInfo {
	out := make([]ConnInfo, 0, p.conns.len())
	p.conns.each(func(c *Conn) { out = append(out, c.Info()) })
	return out
}

// Lookup returns a copy of the tracked connection with key k, or nil.
func (p *Pipeline) Lookup(k backend.ConnKey) *Conn {
	c, ok := p.conns.get(k)
	if !ok {
		return nil
	}
	return &c
}
