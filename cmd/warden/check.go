package main

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/warden-fw/warden/cmd/internal/daemon"
	"github.com/warden-fw/warden/config"
	"github.com/warden-fw/warden/firewall"
)

// loadConfig loads and validates the config; a bad or unreadable config is exit code 2.
func loadConfig(path string) (*config.Config, *firewall.Policy, error) {
	cfg, pol, err := daemon.Load(path)
	return cfg, pol, withCode(exitUsage, err)
}

func newCheckCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "check",
		Short: "Validate a config without applying anything",
		Long:  "Validate a config file and print every error with its key path. Exit 0 when valid, 2 when not.",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, pol, err := loadConfig(g.configPath)
			if err != nil {
				return err
			}
			rules := "rules"
			if pol.Len() == 1 {
				rules = "rule"
			}
			fmt.Fprintf(cmd.OutOrStdout(), "%s: valid (%d %s, backend %s, fail mode %s)\n", cfg.File, pol.Len(), rules,
				cfg.Backend, cfg.FailMode)
			return nil
		},
	}
}
