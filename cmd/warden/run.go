package main

import (
	"context"
	"errors"
	"os"
	"os/signal"
	"runtime/pprof"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/warden-fw/warden/cmd/internal/daemon"
)

func newRunCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "run",
		Short: "Run the daemon in the foreground",
		Long: "Run the firewall daemon in the foreground. SIGINT/SIGTERM stop it cleanly (every rule removed);\n" +
			"SIGHUP, `warden reload` or a change of the config file reload it (an invalid config is rejected and\n" +
			"the running one stays).",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if ran, err := runAsServiceIfNeeded(g); ran || err != nil {
				return withCode(exitFailure, err)
			}
			cfg, pol, err := loadConfig(g.configPath)
			if err != nil {
				return err
			}
			ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
			defer stop()
			if path := os.Getenv("WARDEN_CPUPROFILE"); path != "" {
				// A profiling aid for benchmark runs (docs/performance.md): the harness starts the daemon
				// itself, so an environment variable is the way in.
				if f, err := os.Create(path); err == nil {
					if pprof.StartCPUProfile(f) == nil {
						defer func() { pprof.StopCPUProfile(); f.Close() }()
					}
				}
			}
			d := &daemon.Daemon{ConfigPath: g.configPath, SocketPath: g.socketPath, Stderr: cmd.ErrOrStderr()}
			if err := d.Run(ctx, cfg, pol); err != nil {
				if errors.Is(err, daemon.ErrBadConfig) {
					return withCode(exitUsage, err)
				}
				return withCode(exitFailure, err)
			}
			return nil
		},
	}
}
