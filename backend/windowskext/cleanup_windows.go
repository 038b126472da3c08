package windowskext

import (
	"errors"
	"fmt"

	"github.com/warden-fw/warden/backend"
)

var _ backend.Cleaner = (*Backend)(nil)

// Cleanup removes what a stopped or crashed Warden may have left: the fail-closed WFP filters of a stop with
// fail mode closed, and the driver service (a crashed run leaves the driver holding new connections).
func (b *Backend) Cleanup() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.run != nil {
		return errors.New("windowskext: cleanup while running; stop the service first")
	}
	var errs []error
	if err := RemovePersistentFilters(); err != nil {
		errs = append(errs, fmt.Errorf("removing the fail-closed WFP filters: %w", err))
	}
	if err := uninstallDriver(b.log); err != nil {
		errs = append(errs, fmt.Errorf("removing the driver service: %w", err))
	}
	return errors.Join(errs...)
}
