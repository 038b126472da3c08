package main

import (
	"errors"
	"fmt"
	"log/slog"

	"github.com/spf13/cobra"

	"github.com/warden-fw/warden/backend"
	"github.com/warden-fw/warden/cmd/internal/control"
	"github.com/warden-fw/warden/cmd/internal/daemon"
	"github.com/warden-fw/warden/config"
)

func newCleanupCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "cleanup",
		Short: "Remove every rule, chain and mark Warden may have left (after a crash)",
		Long: "Remove every rule, chain and conntrack mark a crashed Warden may have left. Safe to run any time the\n" +
			"daemon is not running (it refuses while a daemon answers on the control socket). Uses the config for\n" +
			"the backend and queue numbers when it loads, the defaults otherwise.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := config.Load(g.configPath)
			if err != nil {
				// Cleaning up must work even with a broken or missing config: defaults name our chains.
				cfg, err = config.LoadBytes(nil, ".yaml", nil)
				if err != nil {
					return withCode(exitFailure, err)
				}
			}
			ctx, cancel := requestContext()
			defer cancel()
			if _, err := control.NewClient(g.controlPath()).Status(ctx); err == nil {
				return withCode(exitFailure, errors.New("a warden daemon is running; stop it first (it removes its rules itself)"))
			}
			log := slog.New(slog.NewTextHandler(cmd.ErrOrStderr(), nil))
			b, err := backend.New(cfg.Backend, daemon.BackendOptions(cfg, log))
			if err != nil {
				return withCode(exitFailure, err)
			}
			c, ok := b.(backend.Cleaner)
			if !ok {
				fmt.Fprintf(cmd.OutOrStdout(), "%s: nothing to clean up\n", b.Name())
				return nil
			}
			if err := c.Cleanup(); err != nil {
				return withCode(exitFailure, err)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "%s: cleaned up\n", b.Name())
			return nil
		},
	}
}
