package daemon

import (
	"errors"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/fsnotify/fsnotify"

	"github.com/warden-fw/warden/backend"
	"github.com/warden-fw/warden/backend/nfqueue/process"
	"github.com/warden-fw/warden/cmd/internal/control"
	"github.com/warden-fw/warden/config"
	"github.com/warden-fw/warden/firewall"
)

// Version is reported by status; cmd/warden sets it.
var Version = "dev"

var _ control.Service = (*Daemon)(nil)

// Status implements control.Service.
func (d *Daemon) Status() control.Status {
	d.mu.Lock()
	cfg, rerr, reloads, fails := d.cfg, d.reloadErr, d.reloads, d.reloadFail
	d.mu.Unlock()
	s := control.Status{
		Version: Version, Backend: d.backend.Name(), FailMode: cfg.FailMode, ConfigFile: cfg.File,
		ConfigLoadedAt: cfg.LoadedAt, Reloads: reloads, ReloadFailures: fails, StartedAt: d.started,
		UptimeSeconds: time.Since(d.started).Seconds(), Pipeline: d.pipeline.Stats(),
	}
	if rerr != nil {
		s.LastReloadError = rerr.Error()
	}
	if sr, ok := d.backend.(backend.StatsReporter); ok {
		bs := sr.Stats()
		s.BackendStats = &bs
	}
	if d.proxy != nil {
		ps := d.proxy.Stats()
		s.SplitTunnel = &ps
	}
	if d.dns != nil {
		ns := d.dns.Stats()
		s.Nameserver = &ns
	}
	if ar, ok := d.procs.(interface{ Stats() process.Stats }); ok {
		as := ar.Stats()
		s.Attribution = &as
	}
	if d.connLog != nil {
		s.ConnLogDropped = d.connLog.dropped.Load()
	}
	return s
}

// Connections implements control.Service.
func (d *Daemon) Connections() []firewall.ConnInfo {
	cs := d.pipeline.Connections()
	if bc, ok := d.backend.(backend.ByteCounter); ok {
		for i := range cs {
			if tx, rx, ok := bc.ConnBytes(cs[i].Key); ok {
				cs[i].BytesTx, cs[i].BytesRx = &tx, &rx
			}
		}
	}
	d.resolveUnknownProcesses(cs)
	return cs
}

// processLookupBudget bounds the time one listing spends finding processes the pipeline did not look up; the
// connections it does not reach stay unknown.
const processLookupBudget = 2 * time.Second

// resolveUnknownProcesses finds the process of connections decided without it. The pipeline looks a process
// up only when a rule needs one, but a listing of connections should name it. The socket is asked for as it is
// now: a connection whose socket has closed stays unknown, as the resolver never guesses.
func (d *Daemon) resolveUnknownProcesses(cs []firewall.ConnInfo) {
	if d.procs == nil {
		return
	}
	deadline := time.Now().Add(processLookupBudget)
	for i := range cs {
		c := &cs[i]
		if c.PID >= 0 || !c.Key.Protocol.HasPorts() {
			continue
		}
		if time.Now().After(deadline) {
			return
		}
		dir := backend.Outbound
		if c.Direction == backend.Inbound.String() {
			dir = backend.Inbound
		}
		info := backend.Info{Protocol: c.Key.Protocol, Direction: dir, Local: c.Key.Local, Remote: c.Key.Remote,
			PID: backend.Unknown, UID: c.UID}
		if p, ok := d.procs.ResolveProcess(&info); ok {
			c.PID, c.App = p.PID, p.Path
			if c.UID < 0 {
				c.UID = p.UID
			}
		}
	}
}

// Explain implements control.Service.
func (d *Daemon) Explain(q firewall.Query) control.ExplainResult {
	d.mu.Lock()
	cfg := d.cfg
	d.mu.Unlock()
	m := d.pipeline.Explain(q)
	return ExplainMatch(cfg, m)
}

// ExplainMatch renders a policy match as interface.md's explain result.
func ExplainMatch(cfg *config.Config, m firewall.Match) control.ExplainResult {
	res := control.ExplainResult{Action: m.Action.String(), Rule: m.Name}
	if m.Action == config.Split {
		res.Via = m.Via
		if res.Via == "" {
			res.Via = cfg.SplitTunnel.Interface
		}
	}
	return res
}

func (d *Daemon) startControl(cfg *config.Config) error {
	path := d.SocketPath
	if path == "" {
		path = cfg.Control.Socket
	}
	ln, err := control.Listen(path)
	if err != nil {
		if errors.Is(err, backend.ErrUnsupported) {
			d.log.Warn("control API unavailable on this platform", "err", err)
			return nil
		}
		return err
	}
	srv := &http.Server{Handler: control.Handler(d), ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = srv.Serve(ln) }()
	d.closers = append(d.closers, func() error {
		err := srv.Close()
		if err != nil && !errors.Is(err, http.ErrServerClosed) {
			return err
		}
		// Closing a Unix listener normally unlinks the socket already.
		if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
		return nil
	})
	d.log.Info("control API listening", "socket", path)
	return nil
}

// WatchReloads reloads on SIGHUP and when the config file changes on disk, until stop is closed.
func (d *Daemon) WatchReloads(stop <-chan struct{}) {
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)

	var events <-chan fsnotify.Event
	if w, err := fsnotify.NewWatcher(); err == nil {
		defer w.Close()
		// Watch the directory: editors and config management replace the file rather than write it.
		if err := w.Add(filepath.Dir(d.ConfigPath)); err == nil {
			events = w.Events
		}
	}
	base := filepath.Base(d.ConfigPath)
	var debounce <-chan time.Time
	for {
		select {
		case <-stop:
			return
		case <-hup:
			_, _ = d.Reload()
		case ev := <-events:
			if filepath.Base(ev.Name) == base && ev.Op&(fsnotify.Write|fsnotify.Create|fsnotify.Rename) != 0 {
				debounce = time.After(300 * time.Millisecond) // a burst of writes is one change
			}
		case <-debounce:
			debounce = nil
			d.log.Info("config file changed on disk; reloading", "file", d.ConfigPath)
			_, _ = d.Reload()
		}
	}
}
