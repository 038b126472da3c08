package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/warden-fw/warden/backend"
	"github.com/warden-fw/warden/config"
	"github.com/warden-fw/warden/firewall"
)

func newRunCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "run",
		Short: "Run the daemon in the foreground",
		Long: "Run the firewall daemon in the foreground. SIGINT/SIGTERM stop it cleanly (every rule removed);\n" +
			"SIGHUP reloads the config (an invalid config is rejected and the running one stays).",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, pol, err := loadConfig(g.configPath)
			if err != nil {
				return err
			}
			d := &daemon{configPath: g.configPath, stderr: cmd.ErrOrStderr()}
			return d.run(cmd.Context(), cfg, pol)
		},
	}
}

// daemon is a running Warden: backend, pipeline and the local endpoints, plus reload handling.
type daemon struct {
	configPath string
	stderr     io.Writer
	log        *slog.Logger

	mu         sync.Mutex // serialises reloads
	cfg        *config.Config
	reloadErr  error
	reloadedAt time.Time
	started    time.Time

	pipeline *firewall.Pipeline
	backend  backend.Backend
}

func newLogger(w io.Writer, c config.Log) *slog.Logger {
	var level slog.Level
	_ = level.UnmarshalText([]byte(c.Level))
	ho := &slog.HandlerOptions{Level: level}
	if c.Format == "json" {
		return slog.New(slog.NewJSONHandler(w, ho))
	}
	return slog.New(slog.NewTextHandler(w, ho))
}

func backendOptions(cfg *config.Config, log *slog.Logger) backend.Options {
	fm := backend.FailOpen
	if cfg.FailClosed {
		fm = backend.FailClosed
	}
	return backend.Options{
		Logger: log, FailMode: fm, VerdictTimeout: cfg.VerdictTimeout, OwnPID: os.Getpid(),
		QueueBase: uint16(cfg.NFQueue.QueueBase), QueueCount: cfg.NFQueue.Queues,
		SplitTunnelPort: uint16(cfg.SplitTunnel.Port), DriverPath: cfg.WindowsKext.DriverPath,
	}
}

func (d *daemon) run(ctx context.Context, cfg *config.Config, pol *firewall.Policy) error {
	if ctx == nil {
		ctx = context.Background()
	}
	d.log = newLogger(d.stderr, cfg.Log)
	d.cfg = cfg
	d.started = time.Now()
	bo := backendOptions(cfg, d.log)
	b, err := backend.New(cfg.Backend, bo)
	if err != nil {
		if errors.Is(err, backend.ErrUnsupported) {
			return withCode(exitFailure, fmt.Errorf("%w (available here: %v)", err, backend.Available()))
		}
		return withCode(exitFailure, err)
	}
	d.backend = b
	po := firewall.Options{Logger: d.log, FailMode: bo.FailMode, MaxConnections: cfg.MaxConnections}
	if r, ok := b.(backend.ProcessResolver); ok {
		po.Processes = r
	}
	d.pipeline = firewall.New(pol, po)
	defer d.pipeline.Close()

	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	defer signal.Stop(sigs)

	if err := b.Start(ctx, d.pipeline); err != nil {
		return withCode(exitFailure, fmt.Errorf("starting %s backend: %w", b.Name(), err))
	}
	d.log.Info("warden running", "backend", b.Name(), "fail_mode", cfg.FailMode, "rules", pol.Len(),
		"config", cfg.File, "pid", os.Getpid())
	for {
		select {
		case <-ctx.Done():
			return d.stop()
		case s := <-sigs:
			if s == syscall.SIGHUP {
				if err := d.reload(); err != nil {
					d.log.Error("reload rejected; the running config stays", "err", err)
				}
				continue
			}
			d.log.Info("stopping", "signal", s.String())
			return d.stop()
		}
	}
}

func (d *daemon) stop() error {
	if err := d.backend.Stop(); err != nil {
		return withCode(exitFailure, fmt.Errorf("stopping %s backend: %w", d.backend.Name(), err))
	}
	d.log.Info("stopped cleanly")
	return nil
}

// reload loads the config file again; on success the new policy takes over and live connections whose
// decision changed are handed to the backend. On failure nothing changes.
func (d *daemon) reload() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	cfg, pol, err := loadConfig(d.configPath)
	if err != nil {
		d.reloadErr = err
		return err
	}
	if cfg.Backend != d.cfg.Backend || cfg.FailMode != d.cfg.FailMode || cfg.NFQueue != d.cfg.NFQueue {
		d.log.Warn("backend, fail_mode and nfqueue settings take effect only after a restart")
	}
	changes := d.pipeline.SetPolicy(pol)
	d.cfg, d.reloadErr, d.reloadedAt = cfg, nil, time.Now()
	if len(changes) > 0 {
		if r, ok := d.backend.(backend.Reevaluator); ok {
			if err := r.Reevaluate(changes); err != nil {
				d.log.Error("re-evaluating live connections", "err", err)
			}
		}
	}
	d.log.Info("config reloaded", "rules", pol.Len(), "changed_connections", len(changes))
	return nil
}
