// Command warden is the Warden application firewall: the daemon and the tools to check, explain and
// control it. See `warden --help`.
package main

import (
	"errors"
	"fmt"
	"os"

	"github.com/spf13/cobra"

	// The backends register themselves for their OS.
	_ "github.com/warden-fw/warden/backend/nfqueue"
	_ "github.com/warden-fw/warden/backend/windowskext"
	"github.com/warden-fw/warden/config"
)

// Exit codes, as documented in interface.md.
const (
	exitOK      = 0
	exitFailure = 1
	exitUsage   = 2
)

// exitError carries an exit code out of a command.
type exitError struct {
	code int
	err  error
}

func (e *exitError) Error() string { return e.err.Error() }
func (e *exitError) Unwrap() error { return e.err }

func withCode(code int, err error) error {
	if err == nil {
		return nil
	}
	return &exitError{code: code, err: err}
}

// globals are the flags every command shares.
type globals struct {
	configPath string
	socketPath string
}

func newRoot() *cobra.Command {
	g := &globals{}
	root := &cobra.Command{
		Use:           "warden",
		Short:         "Warden: an application firewall daemon",
		Long:          "Warden decides, for every new connection, whether it is allowed, blocked, dropped or split-tunnelled,\nand has the kernel apply that decision to the rest of the connection.",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.PersistentFlags().StringVarP(&g.configPath, "config", "c", config.DefaultConfigPath(), "config file (YAML, TOML or JSON by extension)")
	root.PersistentFlags().StringVar(&g.socketPath, "socket", "", "control socket (default: control.socket from the config, else "+config.DefaultSocketPath()+")")
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return withCode(exitUsage, err) })
	if sc := newServiceCmd(g); sc != nil {
		root.AddCommand(sc)
	}
	root.AddCommand(newRunCmd(g), newCheckCmd(g), newExplainCmd(g), newVersionCmd(), newStatusCmd(g), newConnsCmd(g),
		newReloadCmd(g), newCleanupCmd(g), newDemoCmd(g))
	return root
}

func main() {
	os.Exit(execute(os.Args[1:]))
}

func execute(args []string) int {
	root := newRoot()
	root.SetArgs(args)
	err := root.Execute()
	if err == nil {
		return exitOK
	}
	fmt.Fprintln(os.Stderr, "warden:", err)
	var ee *exitError
	if errors.As(err, &ee) {
		return ee.code
	}
	// Cobra's own errors (unknown command, bad args) are usage errors.
	return exitUsage
}
