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
	var ifFailOpen bool
	cmd := &cobra.Command{
		Use:   "cleanup",
		Short: "Remove every rule, chain and mark Warden may have left (after a crash)",
		Long: "Remove every rule, chain and conntrack mark a crashed Warden may have left. Safe to run any time the\n" +
			"daemon is not running (it refuses while a daemon answers on the control socket). Uses the config for\n" +
			"the backend and queue numbers when it loads, the defaults otherwise.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := config.Load(g.configPath)
			if ifFailOpen && (err != nil || cfg.FailClosed) {
				// After a crash with fail_mode closed the leftover rules are what keeps traffic blocked until
				// the daemon is back; removing them would open the host. Unknown config: be safe, keep them.
				reason := "fail_mode is closed"
				if err != nil {
					reason = "the config cannot be read, so the fail mode is unknown"
				}
				fmt.Fprintf(cmd.OutOrStdout(), "leaving Warden's rules in place: %s\n", reason)
				return nil
			}
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
	cmd.Flags().BoolVar(&ifFailOpen, "if-fail-open", false,
		"clean up only when the config's fail_mode is open (for systemd's ExecStopPost after a crash)")
	return cmd
}
