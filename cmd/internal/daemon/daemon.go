// Package daemon runs Warden: it starts the split-tunnel proxy, the pipeline, the backend and the control
// API in that order, reloads on request, and stops in reverse order so that no rule or object is left.
package daemon

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"sync"
	"time"

	"github.com/warden-fw/warden/backend"
	"github.com/warden-fw/warden/backend/nslock"
	"github.com/warden-fw/warden/config"
	"github.com/warden-fw/warden/firewall"
	"github.com/warden-fw/warden/proxy/dns"
	"github.com/warden-fw/warden/proxy/netif"
	"github.com/warden-fw/warden/proxy/redirect"
	"github.com/warden-fw/warden/proxy/splittun"
	"github.com/warden-fw/warden/proxy/splittun/handoff"
)

// ErrBadConfig wraps a config that failed validation (exit code 2).
var ErrBadConfig = errors.New("bad config")

// Load reads, validates and compiles a config file.
func Load(path string) (*config.Config, *firewall.Policy, error) {
	cfg, err := config.Load(path)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: %s: %w", ErrBadConfig, path, err)
	}
	pol, err := firewall.Compile(cfg)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: %s: compiling policy: %w", ErrBadConfig, path, err)
	}
	return cfg, pol, nil
}

// Daemon is a running Warden.
type Daemon struct {
	ConfigPath string
	// SocketPath overrides control.socket when set.
	SocketPath string
	Stderr     io.Writer

	log     *slog.Logger
	started time.Time
	// routesSplit is whether split connections may be routed in the kernel (split_tunnel.mode at start: a
	// change of it waits for a restart).
	routesSplit bool

	mu         sync.Mutex // guards the fields below and serialises reloads
	cfg        *config.Config
	reloadErr  error
	reloadedAt time.Time
	reloads    uint64
	reloadFail uint64

	pipeline *firewall.Pipeline
	backend  backend.Backend
	proxy    *splittun.Proxy
	table    *redirect.Table
	procs    backend.ProcessResolver
	dns      *dns.Server
	nsAddrs  []netip.AddrPort
	connLog  *connLogger
	metrics  *metrics
	// logDecisions is whether the logger takes debug records, fixed with it at start: asked once, not per
	// connection (the handler's level is one more cold cache line on a decision's path).
	logDecisions bool
	closers      []func() error
}

// NewLogger builds the daemon's logger from the log section.
func NewLogger(w io.Writer, c config.Log) *slog.Logger {
	var level slog.Level
	_ = level.UnmarshalText([]byte(c.Level))
	ho := &slog.HandlerOptions{Level: level}
	if c.Format == "json" {
		return slog.New(slog.NewJSONHandler(w, ho))
	}
	return slog.New(slog.NewTextHandler(w, ho))
}

// BackendOptions maps the config onto the backend options.
func BackendOptions(cfg *config.Config, log *slog.Logger) backend.Options {
	fm := backend.FailOpen
	if cfg.FailClosed {
		fm = backend.FailClosed
	}
	driver := cfg.WindowsKext.DriverPath
	if driver == "" {
		// The documented default: the driver file next to warden.exe.
		if exe, err := os.Executable(); err == nil {
			driver = filepath.Join(filepath.Dir(exe), "portmaster-kext.sys")
		}
	}
	return backend.Options{
		Logger: log, FailMode: fm, VerdictTimeout: cfg.VerdictTimeout, OwnPID: os.Getpid(),
		QueueBase: uint16(cfg.NFQueue.QueueBase), QueueCount: cfg.NFQueue.Queues,
		SplitTunnelPort: uint16(cfg.SplitTunnel.Port), RouteSplit: cfg.SplitTunnel.Mode != splittun.ModeProxy,
		DriverPath: driver,
	}
}

func proxyConfig(st config.SplitTunnel) splittun.Config {
	return splittun.Config{
		Port: uint16(st.Port), Mode: st.Mode, Interface: st.Interface, OnInterfaceDown: st.OnInterfaceDown,
		MaxTCPSessions: st.MaxSessions, MaxUDPSessions: st.MaxSessions,
		IdleTimeout: st.IdleTimeout, UDPIdleTimeout: st.UDPIdleTimeout,
	}
}

// splitTable adapts the redirect table to the pipeline.
type splitTable struct {
	t *redirect.Table
	// ho, when set, is told of every proxied TCP connection before its first packet is let through.
	ho *handoff.Handoff
}

func (s splitTable) RecordSplit(proto backend.Protocol, client, original netip.AddrPort, via string) {
	s.t.Record(redirect.Entry{Protocol: proto, Client: client, Original: original, Interface: via})
	if s.ho != nil && proto == backend.TCP {
		_ = s.ho.Expect(client, original) // a failure only means this connection is relayed over loopback
	}
}

// splitRoutes is splitTable for a proxy in route mode: the proxy also decides how each split connection is
// carried (a kernel route, or on_interface_down's answer).
type splitRoutes struct {
	splitTable
	px *splittun.Proxy
}

func (s splitRoutes) RouteSplit(proto backend.Protocol, remote netip.Addr, via string, fresh bool) backend.Decision {
	return s.px.RouteSplit(proto, remote, via, fresh)
}

// splitSpecs lists the split interfaces the config names: the default ("") and every split rule's via.
func splitSpecs(cfg *config.Config) []string {
	specs := []string{""}
	for i := range cfg.Rules {
		if r := &cfg.Rules[i]; r.Action == config.Split && r.Via != "" && !slices.Contains(specs, r.Via) {
			specs = append(specs, r.Via)
		}
	}
	return specs
}

// usesSplit reports whether any rule splits traffic, so the proxy is started only when needed.
func usesSplit(cfg *config.Config) bool {
	for i := range cfg.Rules {
		if cfg.Rules[i].Action == config.Split {
			return true
		}
	}
	return false
}

// instanceLock names the daemon's lock in its network namespace (see nslock).
const instanceLock = "warden-daemon"

// Run starts everything and blocks until ctx ends or a stop signal arrives; then it stops everything. A
// failure while starting undoes what was started.
func (d *Daemon) Run(ctx context.Context, cfg *config.Config, pol *firewall.Policy) (err error) {
	if d.Stderr == nil {
		d.Stderr = os.Stderr
	}
	d.setLogger(NewLogger(d.Stderr, cfg.Log))
	d.cfg = cfg
	d.started = time.Now()
	// One daemon per network namespace, checked before anything is touched: a second one would take a running
	// daemon's split routes and rules for a crashed run's leftovers and remove them. The lock goes last.
	lock, err := nslock.Acquire(instanceLock)
	if err != nil {
		var held *nslock.HeldError
		if errors.As(err, &held) && held.PID > 0 {
			return fmt.Errorf("another warden daemon runs in this network namespace (pid %d); stop it first", held.PID)
		}
		return fmt.Errorf("another warden daemon may run in this network namespace: %w", err)
	}
	d.closers = append(d.closers, func() error { lock.Release(); return nil })
	defer func() {
		if err != nil {
			err = errors.Join(err, d.shutdown())
		}
	}()

	bo := BackendOptions(cfg, d.log)
	d.routesSplit = bo.RouteSplit
	// Routed split connections need the backend's source NAT only while a rule splits (see Reload).
	bo.RouteSplit = bo.RouteSplit && pol.HasSplit
	b, err := backend.New(cfg.Backend, bo)
	if err != nil {
		if errors.Is(err, backend.ErrUnsupported) {
			return fmt.Errorf("%w (available here: %v)", err, backend.Available())
		}
		return err
	}
	d.backend = b

	d.metrics = newMetrics()

	po := firewall.Options{Logger: d.log, FailMode: bo.FailMode, MaxConnections: cfg.MaxConnections,
		OnDecision: d.onDecision}
	if r, ok := b.(backend.ProcessResolver); ok {
		po.Processes = r
	} else if r, closeFn, err := newProcessResolver(d.log); err == nil {
		po.Processes = r
		d.closers = append(d.closers, closeFn)
	} else {
		d.log.Warn("process attribution unavailable: app rules will not match", "err", err)
	}
	d.procs = po.Processes
	if d.connLog, err = openConnLog(cfg.Log.Connections, d.log, d.procs); err != nil {
		return err
	}
	d.closers = append(d.closers, d.connLog.Close)

	// The proxy starts whenever the backend can reroute, so that a reload adding a split rule works.
	if b.Capabilities().Reroute {
		d.table = redirect.NewTable(redirect.DefaultTTL, 65536)
		ho := d.loadHandoff(cfg)
		px, err := splittun.New(proxyConfig(cfg.SplitTunnel), d.table, splittun.Options{Logger: d.log,
			OnInterfaceChange: d.splitInterfaceChanged, Handoff: ho})
		if err != nil {
			return fmt.Errorf("split-tunnel proxy: %w", err)
		}
		if err := px.Start(); err != nil {
			if usesSplit(cfg) {
				return fmt.Errorf("starting split-tunnel proxy: %w", err)
			}
			d.log.Warn("split-tunnel proxy unavailable; split rules would fall back to allow", "err", err)
		} else {
			d.proxy = px
			po.Split = splitTable{d.table, ho}
			if px.Mode() == splittun.ModeRoute {
				po.Split = splitRoutes{splitTable{d.table, nil}, px}
				if err := px.PrepareRoutes(splitSpecs(cfg)); err != nil {
					d.log.Warn("split tunnel: preparing kernel routes; they are retried on first use", "err", err)
				}
			}
		}
	}

	if b.Capabilities().Reroute {
		if err := d.startNameserver(ctx, cfg, pol); err != nil {
			return err
		}
		if d.dns != nil {
			po.Names = d.dns
			po.Nameserver = d.nsAddrs
		}
	}

	if lr, ok := b.(backend.LiveReporter); ok {
		// Backends whose kernel alone sees connections end (conntrack) tell which still exist.
		po.LiveConnections = lr.LiveConnections
	}
	d.pipeline = firewall.New(pol, po)
	if eh, ok := b.(backend.EndNotifier); ok {
		// Backends that see connections end (the Windows driver) keep the connection table exact.
		eh.SetConnectionEndHandler(d.pipeline.ConnectionEnded)
	}
	if err := b.Start(ctx, d.pipeline); err != nil {
		return fmt.Errorf("starting %s backend: %w", b.Name(), err)
	}
	if err := d.startControl(cfg); err != nil {
		return err
	}
	if err := d.startMetrics(cfg); err != nil {
		return err
	}
	d.log.Info("warden running", "backend", b.Name(), "fail_mode", cfg.FailMode, "rules", pol.Len(),
		"config", cfg.File, "pid", os.Getpid())

	stopWatch := make(chan struct{})
	watchDone := make(chan struct{})
	go func() {
		defer close(watchDone)
		d.WatchReloads(stopWatch)
	}()
	<-ctx.Done()
	close(stopWatch)
	<-watchDone
	d.log.Info("stopping")
	return d.shutdown()
}

// handoffDrainTimeout bounds how long a stopping daemon waits for applications to read handed-off data.
const handoffDrainTimeout = 5 * time.Second

// loadHandoff loads the kernel handoff when the config asks for it and the proxy relays (mode proxy). It is
// closed after the proxy (d.closers). Without kernel support the proxy relays over loopback, as it would
// without the option.
func (d *Daemon) loadHandoff(cfg *config.Config) *handoff.Handoff {
	if !cfg.SplitTunnel.KernelHandoff {
		return nil
	}
	if cfg.SplitTunnel.Mode != splittun.ModeProxy {
		d.log.Warn("split_tunnel.kernel_handoff applies to mode proxy only; ignored", "mode", cfg.SplitTunnel.Mode)
		return nil
	}
	ho, err := handoff.Load()
	if err != nil {
		d.log.Warn("split tunnel: kernel handoff unavailable; relaying over loopback", "err", err)
		return nil
	}
	d.closers = append(d.closers, func() error {
		// After the proxy's relays have ended: let applications read the tails of their downloads first,
		// which closing the maps would drop.
		ctx, cancel := context.WithTimeout(context.Background(), handoffDrainTimeout)
		defer cancel()
		if n := ho.Drain(ctx); n > 0 {
			d.log.Warn("split tunnel: applications had not read the end of their downloads; it is dropped", "connections", n)
		}
		return ho.Close()
	})
	return ho
}

// shutdown stops what was started, in reverse order, and reports every failure.
func (d *Daemon) shutdown() error {
	var errs []error
	if d.backend != nil {
		if err := d.backend.Stop(); err != nil {
			errs = append(errs, fmt.Errorf("stopping %s backend: %w", d.backend.Name(), err))
		}
	}
	if d.pipeline != nil {
		d.pipeline.Close()
	}
	if d.proxy != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		if err := d.proxy.Shutdown(ctx); err != nil {
			errs = append(errs, fmt.Errorf("stopping split-tunnel proxy: %w", err))
		}
		cancel()
		d.proxy = nil
	}
	for i := len(d.closers) - 1; i >= 0; i-- {
		if err := d.closers[i](); err != nil {
			errs = append(errs, err)
		}
	}
	d.closers = nil
	if len(errs) == 0 && d.log != nil {
		d.log.Info("stopped cleanly")
	}
	return errors.Join(errs...)
}

// splitInterfaceChanged re-evaluates live connections when a split interface comes or goes: a UDP flow blocked
// while the interface was down (on_interface_down: block) would otherwise stay blocked for as long as it keeps
// sending, since every packet refreshes its conntrack entry; and one routed through the interface is refused
// once it is gone instead of sent into a dead route.
func (d *Daemon) splitInterfaceChanged(st netif.State) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.pipeline == nil {
		return // still starting: nothing decided yet
	}
	changes := d.pipeline.SetPolicy(d.pipeline.Policy())
	if r, ok := d.backend.(backend.Reevaluator); ok && len(changes) > 0 {
		if err := r.Reevaluate(changes); err != nil {
			d.log.Error("re-evaluating live connections after a split interface change", "err", err)
		}
	}
	d.log.Info("split interface changed", "interface", st.Spec, "up", st.Up, "changed_connections", len(changes))
}

// Reload loads the config file again. On success the new policy takes over and live connections whose
// decision changed are handed to the backend; on failure nothing changes and the error is kept for status.
func (d *Daemon) Reload() (changed int, err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	cfg, pol, err := Load(d.ConfigPath)
	if err != nil {
		return 0, d.rejectReload(err)
	}
	old := d.cfg
	if cfg.Backend != old.Backend || cfg.FailMode != old.FailMode || cfg.NFQueue != old.NFQueue ||
		cfg.SplitTunnel != old.SplitTunnel || cfg.Control != old.Control || cfg.Metrics != old.Metrics ||
		!reflect.DeepEqual(cfg.Nameserver, old.Nameserver) || cfg.Log.Level != old.Log.Level ||
		cfg.Log.Format != old.Log.Format || cfg.Log.Connections != old.Log.Connections {
		d.log.Warn("changes to backend, fail_mode, nfqueue, split_tunnel, nameserver, control, metrics and log " +
			"take effect after a restart; rules and defaults changed now")
	}
	if d.proxy != nil {
		// Before the new policy: its split rules may name interfaces not prepared yet.
		if err := d.proxy.PrepareRoutes(splitSpecs(cfg)); err != nil {
			d.log.Warn("split tunnel: preparing kernel routes; they are retried on first use", "err", err)
		}
	}
	rs, _ := d.backend.(backend.RouteSplitter)
	if rs != nil && d.routesSplit && pol.HasSplit {
		// Before the policy: its first routed connection must find its source NAT in place.
		if err := rs.SetRouteSplit(true); err != nil {
			return 0, d.rejectReload(fmt.Errorf("installing the source NAT of routed split connections: %w", err))
		}
	}
	changes := d.pipeline.SetPolicy(pol)
	if d.dns != nil {
		d.dns.SetPolicy(pol)
	}
	if r, ok := d.backend.(backend.Reevaluator); ok && len(changes) > 0 {
		if err := r.Reevaluate(changes); err != nil {
			d.log.Error("re-evaluating live connections", "err", err)
		}
	}
	if rs != nil && d.routesSplit && !pol.HasSplit {
		// After the policy: no new connection is routed any more, and those routed keep their NAT binding.
		if err := rs.SetRouteSplit(false); err != nil {
			d.log.Warn("removing the source NAT of routed split connections", "err", err)
		}
	}
	if err := d.connLog.Reopen(); err != nil {
		d.log.Error("reopening the connection log", "err", err)
	}
	d.cfg, d.reloadErr, d.reloadedAt = cfg, nil, time.Now()
	d.reloads++
	d.metrics.reloads.WithLabelValues("ok").Inc()
	d.log.Info("config reloaded", "rules", pol.Len(), "changed_connections", len(changes))
	return len(changes), nil
}

// rejectReload records a reload that failed before anything changed, and returns err.
func (d *Daemon) rejectReload(err error) error {
	d.reloadErr = err
	d.reloadFail++
	d.metrics.reloads.WithLabelValues("rejected").Inc()
	d.log.Error("reload rejected; the running config stays", "err", err)
	return err
}

// setLogger installs the daemon's logger, which lives as long as the daemon.
func (d *Daemon) setLogger(l *slog.Logger) {
	d.log = l
	d.logDecisions = l.Enabled(context.Background(), slog.LevelDebug)
}

func (d *Daemon) onDecision(c firewall.Conn, took time.Duration) {
	d.metrics.observeDecision(&c, took)
	d.connLog.Log(&c)
	if d.logDecisions {
		// Built only when debug logging is on: this runs once per new connection.
		name, _, source := c.Rule()
		d.log.Debug("decided", "conn", c.Key.String(), "direction", c.Direction.String(), "pid", c.PID,
			"app", c.App, "verdict", c.Decision().String(), "rule", name, "source", source, "took", took)
	}
}
