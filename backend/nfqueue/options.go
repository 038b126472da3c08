// Package nfqueue is Warden's Linux backend: iptables rules (IPv4 and IPv6) send the first packets of every
// connection to NFQUEUE queues, the pipeline decides, and the verdict comes back as a packet mark that the
// rules enforce and, for permanent decisions, save to the connmark so the rest of the connection never
// leaves the kernel. See linux-rules.md for the rule layout.
//
// Queue numbering: with base B and count N, connections this host opens are queued on B..B+N-1 and
// connections opened from outside on B+N..B+2N-1 (both address families share the queues). The defaults,
// B=1700 and N=2 or the number of CPUs up to 8, stay clear of Portmaster's 17040/17060/17140/17160.
package nfqueue

import (
	"fmt"
	"log/slog"
	"runtime"
	"time"

	"github.com/warden-fw/warden/backend"
)

// Defaults for zero-valued options.
const (
	DefaultQueueBase      uint16 = 1700
	DefaultVerdictTimeout        = 3 * time.Second
	DefaultCopyRange      uint32 = 128
	DefaultMaxQueueLen    uint32 = 4096
	DefaultReadBuffer            = 8 << 20
	DefaultWatchInterval         = time.Second
	DefaultTunnelPort     uint16 = 717
	DefaultSplitPort      uint16 = 719
	DefaultNameserverPort uint16 = 53
)

// Config holds the nfqueue-specific settings that backend.Options does not carry. The zero value is what
// production uses.
type Config struct {
	// FailOpenOnOverload sets the kernel's fail-open flag on the queues: when a queue is full, packets pass
	// uninspected instead of being dropped. Off by default: under a flood almost everything would pass.
	FailOpenOnOverload bool
	// CopyRange is how many bytes of each packet are copied to user space (headers only).
	CopyRange uint32
	// MaxQueueLen is the kernel's per-queue packet limit.
	MaxQueueLen uint32
	// ReadBuffer is the netlink socket's receive buffer in bytes.
	ReadBuffer int
	// WatchInterval is how often the watcher checks that the jump rules are still first.
	WatchInterval time.Duration
	// NoIPv6 skips ip6tables (for hosts without IPv6 netfilter).
	NoIPv6 bool
}

// settings is the resolved configuration: options and config with defaults filled in.
type settings struct {
	log            *slog.Logger
	failMode       backend.FailMode
	timeout        time.Duration
	out, in        queueRange
	tunnelPort     uint16
	splitPort      uint16
	nameserverPort uint16
	routeSplit     bool
	cfg            Config
}

// portmasterQueues are the queue numbers Portmaster uses; ours must not overlap them.
var portmasterQueues = []uint16{17040, 17060, 17140, 17160}

func resolve(o backend.Options, c Config) (settings, error) {
	s := settings{log: o.Logger, failMode: o.FailMode, timeout: o.VerdictTimeout, routeSplit: o.RouteSplit, cfg: c}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	if s.timeout <= 0 {
		s.timeout = DefaultVerdictTimeout
	}
	base := o.QueueBase
	if base == 0 {
		base = DefaultQueueBase
	}
	n := o.QueueCount
	if n <= 0 {
		n = min(max(runtime.NumCPU(), 2), 8)
	}
	if int(base)+2*n-1 > 65535 {
		return settings{}, fmt.Errorf("queue base %d with %d queues per direction exceeds queue number 65535", base, n)
	}
	s.out = queueRange{base, base + uint16(n) - 1}
	s.in = queueRange{base + uint16(n), base + uint16(2*n) - 1}
	for _, pm := range portmasterQueues {
		if pm >= s.out.First && pm <= s.in.Last {
			return settings{}, fmt.Errorf("queues %d-%d overlap Portmaster's queue %d", s.out.First, s.in.Last, pm)
		}
	}
	s.tunnelPort = orDefault(o.TunnelPort, DefaultTunnelPort)
	s.splitPort = orDefault(o.SplitTunnelPort, DefaultSplitPort)
	s.nameserverPort = orDefault(o.NameserverPort, DefaultNameserverPort)
	if s.cfg.CopyRange == 0 {
		s.cfg.CopyRange = DefaultCopyRange
	}
	if s.cfg.MaxQueueLen == 0 {
		s.cfg.MaxQueueLen = DefaultMaxQueueLen
	}
	if s.cfg.ReadBuffer == 0 {
		s.cfg.ReadBuffer = DefaultReadBuffer
	}
	if s.cfg.WatchInterval <= 0 {
		s.cfg.WatchInterval = DefaultWatchInterval
	}
	return s, nil
}

func orDefault(v, d uint16) uint16 {
	if v == 0 {
		return d
	}
	return v
}

func (s *settings) ruleParams() ruleParams {
	return ruleParams{
		Out: s.out, In: s.in, FailMode: s.failMode,
		TunnelPort: s.tunnelPort, SplitPort: s.splitPort, NameserverPort: s.nameserverPort,
		SplitSNAT: s.routeSplit,
	}
}
