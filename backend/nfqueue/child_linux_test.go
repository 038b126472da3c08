package nfqueue

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/signal"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/warden-fw/warden/backend"
)

// The test binary doubles as the daemon under test: TestMain runs childMain instead of the tests when this
// environment variable holds a childConfig. The child runs inside the client namespace (ip netns exec), so
// the backend's netlink sockets and iptables commands all act there.
const childEnv = "WARDEN_NFQ_TEST_CHILD"

// childRule is one line of the child's test policy. Empty fields match anything.
type childRule struct {
	Dir    string `json:"dir,omitempty"`    // "out" | "in"
	Proto  string `json:"proto,omitempty"`  // "tcp" | "udp" | "icmp" (echo request/reply only)
	Port   uint16 `json:"port,omitempty"`   // remote port if outbound, local port if inbound
	Remote string `json:"remote,omitempty"` // remote address
	// Verdict: accept, block, drop, final, split, none (never answer: the verdict timeout must).
	Verdict   string `json:"verdict"`
	Permanent bool   `json:"permanent,omitempty"`
}

type childConfig struct {
	FailMode string        `json:"fail_mode"`
	Timeout  time.Duration `json:"timeout"`
	Rules    []childRule   `json:"rules"`
	// Watch is the watcher's interval; default 200 ms.
	Watch time.Duration `json:"watch"`
	// RouteSplit is backend.Options.RouteSplit (the source NAT of kernel-routed split connections).
	RouteSplit bool `json:"route_split"`
}

// childPolicy decides by the first matching rule; the default is a permanent accept.
type childPolicy struct {
	rules atomic.Pointer[[]childRule]
	seen  atomic.Uint64
	mu    sync.Mutex
	held  []backend.Packet // packets of "none" rules, kept so they are not collected
	keys  map[string]bool  // the keys of every connection decided, as the pipeline would key them
}

func (p *childPolicy) decide(pk backend.Packet) backend.Decision {
	info := pk.Info()
	var h headers
	_ = parseHeaders(pk.Payload(), &h)
	for _, r := range *p.rules.Load() {
		if r.Dir == "out" && info.Direction != backend.Outbound || r.Dir == "in" && info.Direction != backend.Inbound {
			continue
		}
		switch r.Proto {
		case "tcp", "udp":
			if info.Protocol.String() != r.Proto {
				continue
			}
		case "icmp":
			echo := (info.Protocol == backend.ICMP && (h.ICMPType == 8 || h.ICMPType == 0)) ||
				(info.Protocol == backend.ICMPv6 && (h.ICMPType == 128 || h.ICMPType == 129))
			if !echo {
				continue
			}
		}
		if r.Port != 0 {
			port := info.Remote.Port()
			if info.Direction == backend.Inbound {
				port = info.Local.Port()
			}
			if port != r.Port {
				continue
			}
		}
		if r.Remote != "" && info.Remote.Addr() != netip.MustParseAddr(r.Remote) {
			continue
		}
		d := backend.Decision{Permanent: r.Permanent}
		switch r.Verdict {
		case "accept":
			d.Verdict = backend.Accept
		case "block":
			d.Verdict = backend.Block
		case "drop":
			d.Verdict = backend.Drop
		case "final":
			d = backend.AcceptFinal
		case "split":
			d.Verdict = backend.RerouteToSplitTun
		case "none":
			d.Verdict = backend.Undecided
		}
		return d
	}
	return backend.Decision{Verdict: backend.Accept, Permanent: true}
}

func (p *childPolicy) HandlePacket(pk backend.Packet) {
	p.seen.Add(1)
	p.mu.Lock()
	if p.keys == nil {
		p.keys = map[string]bool{}
	}
	p.keys[pk.Info().Key().String()] = true
	p.mu.Unlock()
	d := p.decide(pk)
	if d.Verdict == backend.Undecided {
		p.mu.Lock()
		p.held = append(p.held, pk)
		p.mu.Unlock()
		return
	}
	if err := pk.Apply(d); err != nil {
		fmt.Fprintf(os.Stderr, "apply: %v\n", err)
	}
}

// childMain runs the backend until SIGTERM or stdin EOF. Protocol on stdout: "ready", then one reply line
// per stdin command; at exit "stopped" and "goroutines ok" (or "goroutines leaked ...").
//
// Commands: "count" → "count N" (packets the policy saw); "stats" → "stats {json}"; "rules {json}" →
// "ok"; "reeval PROTO LOCAL REMOTE" → "ok" | "err ..."; "restart" → "ok" | "err ..."; "live" → "live {json}",
// every decided connection's key mapped to whether LiveConnections listed it.
func childMain(cfgJSON string) int {
	var cfg childConfig
	if err := json.Unmarshal([]byte(cfgJSON), &cfg); err != nil {
		fmt.Println("err", err)
		return 2
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	lines := make(chan string)
	go func() {
		sc := bufio.NewScanner(os.Stdin)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()
	// Everything above stays until exit; the backend must leave nothing beyond it behind.
	baseline := runtime.NumGoroutine()
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	o := backend.Options{Logger: log, VerdictTimeout: cfg.Timeout, QueueCount: 2, RouteSplit: cfg.RouteSplit}
	if cfg.FailMode == "closed" {
		o.FailMode = backend.FailClosed
	}
	watch := cfg.Watch
	if watch == 0 {
		watch = 200 * time.Millisecond
	}
	b, err := New(o, Config{WatchInterval: watch})
	if err != nil {
		fmt.Println("err", err)
		return 1
	}
	pol := &childPolicy{}
	pol.rules.Store(&cfg.Rules)
	if err := b.Start(context.Background(), pol); err != nil {
		fmt.Println("err", strings.ReplaceAll(err.Error(), "\n", "; "))
		return 1
	}
	fmt.Println("ready")

loop:
	for {
		select {
		case <-sig:
			break loop
		case line, ok := <-lines:
			if !ok {
				break loop
			}
			cmd, arg, _ := strings.Cut(line, " ")
			switch cmd {
			case "count":
				fmt.Println("count", pol.seen.Load())
			case "stats":
				j, _ := json.Marshal(b.Stats())
				fmt.Println("stats", string(j))
			case "rules":
				var rules []childRule
				if err := json.Unmarshal([]byte(arg), &rules); err != nil {
					fmt.Println("err", err)
					continue
				}
				pol.rules.Store(&rules)
				fmt.Println("ok")
			case "reeval":
				f := strings.Fields(arg)
				if len(f) != 3 {
					fmt.Println("err want PROTO LOCAL REMOTE")
					continue
				}
				proto := backend.TCP
				if f[0] == "udp" {
					proto = backend.UDP
				}
				k := backend.ConnKey{Protocol: proto, Local: netip.MustParseAddrPort(f[1]), Remote: netip.MustParseAddrPort(f[2])}
				if err := b.Reevaluate([]backend.ConnChange{{Key: k}}); err != nil {
					fmt.Println("err", err)
					continue
				}
				fmt.Println("ok")
			case "bytes":
				f := strings.Fields(arg)
				if len(f) != 2 {
					fmt.Println("err want LOCAL REMOTE")
					continue
				}
				k := backend.ConnKey{Protocol: backend.TCP, Local: netip.MustParseAddrPort(f[0]), Remote: netip.MustParseAddrPort(f[1])}
				if tx, rx, ok := b.ConnBytes(k); ok {
					fmt.Println("bytes", tx, rx)
				} else {
					fmt.Println("bytes unknown")
				}
			case "live":
				listed := map[string]bool{}
				if err := b.LiveConnections(func(k backend.ConnKey) { listed[k.String()] = true }); err != nil {
					fmt.Println("err", err)
					continue
				}
				pol.mu.Lock()
				out := make(map[string]bool, len(pol.keys))
				for k := range pol.keys {
					out[k] = listed[k]
				}
				pol.mu.Unlock()
				j, _ := json.Marshal(out)
				fmt.Println("live", string(j))
			case "route_split":
				if err := b.SetRouteSplit(arg == "on"); err != nil {
					fmt.Println("err", err)
					continue
				}
				fmt.Println("ok")
			case "restart":
				if err := b.Stop(); err != nil {
					fmt.Println("err", err)
					continue
				}
				if err := b.Start(context.Background(), pol); err != nil {
					fmt.Println("err", err)
					continue
				}
				fmt.Println("ok")
			default:
				fmt.Println("err unknown command", cmd)
			}
		}
	}
	stopErr := b.Stop()
	if err := b.Stop(); err != nil { // a second Stop must be harmless
		stopErr = err
	}
	if stopErr != nil {
		fmt.Println("err", strings.ReplaceAll(stopErr.Error(), "\n", "; "))
		return 1
	}
	fmt.Println("stopped")
	deadline := time.Now().Add(3 * time.Second)
	for {
		n := runtime.NumGoroutine()
		if n <= baseline {
			fmt.Println("goroutines ok")
			return 0
		}
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			buf = buf[:runtime.Stack(buf, true)]
			fmt.Fprintf(os.Stderr, "%s\n", buf)
			fmt.Printf("goroutines leaked: %d > %d\n", n, baseline)
			return 1
		}
		time.Sleep(20 * time.Millisecond)
	}
}
