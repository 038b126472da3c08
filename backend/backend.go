// Package backend declares the contract between Warden's verdict pipeline and the interception backends
// (NFQUEUE on Linux, the Portmaster kernel driver on Windows): the verdicts, the parsed packet info, the packet
// handle a backend hands to the pipeline, the Backend interface and a registry the OS packages join.
//
// No OS code lives here. A backend's Start may be called again after Stop and must converge to the same state
// as a fresh start.
package backend

import (
	"context"
	"errors"
	"log/slog"
	"time"
)

// ErrUnsupported is returned (wrapped) when this OS has no backend of the requested kind.
var ErrUnsupported = errors.New("not supported on this platform")

// ErrAlreadyApplied is returned by Packet.Apply when the packet was already answered.
var ErrAlreadyApplied = errors.New("packet already has a verdict")

// Packet is one intercepted packet waiting for a verdict. Each backend supplies its own implementation, which
// carries what it needs to answer the kernel.
type Packet interface {
	// Info returns the parsed connection info. The pointer stays valid until Apply returns; the pipeline may
	// fill in fields the kernel did not give (PID, Interface).
	Info() *Info
	// Payload returns the raw packet as the kernel delivered it (possibly truncated to the headers), or nil
	// when the backend has none.
	Payload() []byte
	// Apply answers the kernel. Only the first call takes effect; later calls return ErrAlreadyApplied.
	Apply(Decision) error
}

// Handler receives every intercepted packet. It must answer each packet exactly once (Apply), possibly
// later and from another goroutine; it must not block the backend for long.
type Handler interface {
	HandlePacket(Packet)
}

// HandlerFunc adapts a function to Handler.
type HandlerFunc func(Packet)

// HandlePacket calls f(p).
func (f HandlerFunc) HandlePacket(p Packet) { f(p) }

// Capabilities describes what a backend's kernel side can tell and do.
type Capabilities struct {
	// ProcessID reports whether packets carry the owning PID.
	ProcessID bool
	// UserID reports whether packets carry the owning UID.
	UserID bool
	// Reroute reports whether the reroute verdicts (nameserver, tunnel, split tunnel) are supported.
	Reroute bool
	// LiveUpdate reports whether the verdict of a live connection can be changed (see Reevaluator).
	LiveUpdate bool
}

// Backend is one interception mechanism.
type Backend interface {
	// Name returns the backend's registry name, e.g. "nfqueue".
	Name() string
	// Capabilities tells what the backend supports.
	Capabilities() Capabilities
	// Start installs whatever the kernel needs (cleaning leftovers of a crashed run first) and starts
	// delivering packets to h. It returns once packets flow, or with an error after undoing what it did.
	Start(ctx context.Context, h Handler) error
	// Stop stops taking new packets, answers every pending one, removes every rule and object the backend
	// added and releases its resources. It is safe to call more than once.
	Stop() error
}

// ConnChange is a live connection whose decision changed after a policy change.
type ConnChange struct {
	Key ConnKey
	Old Decision
	New Decision
}

// Reevaluator is implemented by backends that can make live connections feel a new decision: on Linux by
// deleting exactly their conntrack entries (so their next packet is queued again), on Windows by updating the
// driver's cached verdict.
type Reevaluator interface {
	Reevaluate(changes []ConnChange) error
}

// Resetter is implemented by backends that can forget every cached decision at once.
type Resetter interface {
	ResetAll() error
}

// Stats is a snapshot of a backend's own counters.
type Stats struct {
	// QueueOverruns counts packets the kernel could not hand to Warden (socket buffer full).
	QueueOverruns uint64 `json:"queue_overruns"`
	// VerdictTimeouts counts packets answered with the fail-mode verdict because no decision came in time.
	VerdictTimeouts uint64 `json:"verdict_timeouts"`
	// Packets counts packets received from the kernel.
	Packets uint64 `json:"packets"`
	// ParseErrors counts packets or driver records that could not be parsed.
	ParseErrors uint64 `json:"parse_errors"`
}

// StatsReporter is implemented by backends that keep counters.
type StatsReporter interface {
	Stats() Stats
}

// FailMode says what happens to traffic when Warden cannot decide: "open" lets it pass, "closed" blocks it.
type FailMode uint8

// The fail modes.
const (
	FailOpen FailMode = iota
	FailClosed
)

// String returns "open" or "closed".
func (m FailMode) String() string {
	if m == FailClosed {
		return "closed"
	}
	return "open"
}

// Decision returns the decision for a packet that could not be decided: not permanent, so the connection's
// next packet is asked about again.
func (m FailMode) Decision() Decision {
	if m == FailClosed {
		return Decision{Verdict: Drop}
	}
	return Decision{Verdict: Accept}
}

// Options configures a backend. Fields a backend does not use are ignored.
type Options struct {
	Logger   *slog.Logger
	FailMode FailMode
	// VerdictTimeout bounds how long a packet may wait for a decision before it gets the fail-mode verdict.
	VerdictTimeout time.Duration
	// OwnPID is the daemon's PID; its connections are accepted as final.
	OwnPID int

	// NFQueue: the first queue number and how many queues to balance over.
	QueueBase  uint16
	QueueCount int
	// NFQueue: the split-tunnel proxy's, tunnel's and nameserver's ports for the DNAT rules.
	SplitTunnelPort uint16
	TunnelPort      uint16
	NameserverPort  uint16
	// NFQueue: split connections are carried by kernel routing (split_tunnel.mode route or auto) and the
	// policy has split rules, so they need source NAT. Without it no NAT hook is installed after routing:
	// every new connection would pay for an empty one (a null binding). RouteSplitter changes it while running.
	RouteSplit bool

	// WindowsKext: the driver file to install as a service.
	DriverPath string
}

// Cleaner is implemented by backends that can remove whatever a previous run left behind (rules, chains,
// saved conntrack marks, driver objects) without starting. It is safe to call at any time the backend is not
// running, and when there is nothing to remove.
type Cleaner interface {
	Cleanup() error
}

// EndNotifier is implemented by backends that see connections end (the Windows driver's end events); the
// daemon hands them the pipeline's ConnectionEnded so the connection table stays exact.
type EndNotifier interface {
	SetConnectionEndHandler(func(ConnKey))
}

// RouteSplitter is implemented by backends that need rules of their own for split connections routed in the
// kernel (the nfqueue backend's source NAT). The daemon turns them on before a policy that splits takes effect
// and off once none does.
type RouteSplitter interface {
	SetRouteSplit(on bool) error
}

// LiveReporter is implemented by backends whose kernel keeps the table of live connections (conntrack, on
// Linux). Only a connection's first packets reach user space there, so the end of an accepted connection is
// known to the kernel alone; the pipeline asks now and then, to forget connections that ended and to keep
// long-lived ones from looking idle.
type LiveReporter interface {
	// LiveConnections calls live with the key of every connection the kernel tracks that can still carry
	// packets. A key that matches no connection is harmless; a live connection left out will be forgotten.
	LiveConnections(live func(ConnKey)) error
}

// ByteCounter is implemented by backends that count bytes per connection.
type ByteCounter interface {
	ConnBytes(ConnKey) (tx, rx uint64, ok bool)
}
