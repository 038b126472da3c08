package daemon

import (
	"log/slog"

	"github.com/warden-fw/warden/backend"
	"github.com/warden-fw/warden/backend/nfqueue/process"
)

// newProcessResolver opens the Linux process attribution (sock_diag + /proc). It must be created in the
// network namespace the daemon runs in.
func newProcessResolver(log *slog.Logger) (backend.ProcessResolver, func() error, error) {
	r, err := process.New(log)
	if err != nil {
		return nil, nil, err
	}
	return r, r.Close, nil
}
