//go:build !linux

package sandbox

import (
	"context"
	"fmt"
	"os/exec"

	"github.com/warden-fw/warden/backend"
)

var errNoNetns = fmt.Errorf("the sandbox needs Linux network namespaces: %w", backend.ErrUnsupported)

// Topology is a client namespace with two uplinks to two server namespaces; Linux only.
type Topology struct {
	// Client, A and B are the namespace names.
	Client, A, B string
}

// New reports that network namespaces are unavailable here.
func New(context.Context, string) (*Topology, error) { return nil, errNoNetns }

// SetUplink reports that network namespaces are unavailable here.
func (*Topology) SetUplink(context.Context, string, bool) error { return errNoNetns }

// Command returns a command that cannot start: there are no network namespaces here.
func Command(ctx context.Context, ns, name string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Err = errNoNetns
	return cmd
}

// IPTablesSave reports that iptables is unavailable here.
func IPTablesSave(context.Context, string) (string, error) { return "", errNoNetns }

// PIDs reports that network namespaces are unavailable here.
func PIDs(context.Context, string) ([]int, error) { return nil, errNoNetns }

// Close does nothing.
func (*Topology) Close() error { return nil }

// Namespaces returns nothing.
func (*Topology) Namespaces() []string { return nil }
