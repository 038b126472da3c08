package windowskext

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"

	"github.com/tailscale/wf"
	"github.com/warden-fw/warden/backend"
)

func init() {
	backend.Register(Name, true, func(o backend.Options) (backend.Backend, error) {
		return New(o)
	})
}

// New returns the Windows backend: on Start it installs and starts the driver service from o.DriverPath,
// opens the device, checks the interface version, removes the fail-closed filters of an earlier stop and adds
// the WFP permit for Warden's own executable. Stop undoes all of it and, with fail mode "closed", leaves the
// persistent fail-closed filters in place.
func New(o backend.Options) (*Backend, error) {
	if o.DriverPath == "" {
		return nil, errors.New("windowskext: the driver path (DriverPath) is required")
	}
	log := o.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return NewWithDevice(o, func(ctx context.Context) (Device, error) { return openSystem(ctx, log, o) }, Config{}), nil
}

// openSystem sets up the driver and WFP and returns the device; its Close tears everything down again.
func openSystem(ctx context.Context, log *slog.Logger, o backend.Options) (Device, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if err := installDriver(log, o.DriverPath); err != nil {
		return nil, err
	}
	dev, err := openDevice()
	if err != nil {
		return nil, errors.Join(err, uninstallDriver(log))
	}
	// The driver now holds every new connection until we answer, so the fail-closed filters of an earlier
	// stop can go: they would block what the driver permits.
	if err := RemovePersistentFilters(); err != nil {
		log.Warn("removing the fail-closed WFP filters of an earlier run failed", "err", err)
	}
	session, err := installOwnPermit(log)
	if err != nil {
		dev.teardown = func() error { return uninstallDriver(log) }
		return nil, errors.Join(fmt.Errorf("installing WFP rules: %w", err), dev.Close())
	}
	dev.teardown = func() error { return teardownSystem(log, o.FailMode, session) }
	return dev, nil
}

// teardownSystem runs after the device handle is closed: it leaves the fail-closed filters when asked for,
// before the driver (and its filters) go away so that no connection slips through in between, then removes
// the driver service and closes the dynamic WFP session.
func teardownSystem(log *slog.Logger, fm backend.FailMode, session *wf.Session) error {
	var errs []error
	if fm == backend.FailClosed {
		if err := installFailClosed(log); err != nil {
			errs = append(errs, fmt.Errorf("installing the fail-closed WFP filters: %w", err))
		}
	}
	if err := uninstallDriver(log); err != nil {
		errs = append(errs, fmt.Errorf("removing the driver service: %w", err))
	}
	if err := session.Close(); err != nil {
		errs = append(errs, fmt.Errorf("closing the WFP session: %w", err))
	}
	return errors.Join(errs...)
}

func executablePath() (string, error) {
	exe, err := os.Executable()
	if err != nil {
		return "", fmt.Errorf("finding Warden's executable: %w", err)
	}
	return exe, nil
}
