//go:build !windows

package main

import "github.com/spf13/cobra"

// runAsServiceIfNeeded: only Windows has a service control manager to run under.
func runAsServiceIfNeeded(*globals) (bool, error) { return false, nil }

// newServiceCmd returns nil off Windows: systemd runs `warden run` directly (packaging/warden.service).
func newServiceCmd(*globals) *cobra.Command { return nil }
