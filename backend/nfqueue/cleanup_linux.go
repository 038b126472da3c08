package nfqueue

import (
	"errors"
	"fmt"

	"github.com/warden-fw/warden/backend"
	"github.com/warden-fw/warden/backend/nfqueue/splitroute"
)

var _ backend.Cleaner = (*Backend)(nil)

// Cleanup removes every chain and jump rule Warden may have installed (IPv4 and IPv6) and every conntrack
// entry carrying one of its permanent marks. It is what Start does first, without starting; `warden cleanup`
// and the systemd unit's ExecStopPost use it after a crash.
func (b *Backend) Cleanup() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.running {
		return errors.New("nfqueue: cleanup while running; stop the daemon first")
	}
	// Another process's running instance: its rules are not leftovers.
	lock, err := lockInstance()
	if err != nil {
		return err
	}
	defer lock.Release()
	fw, err := newFirewall(b.s.log, b.s.ruleParams(), b.s.cfg.NoIPv6)
	if err != nil {
		return err
	}
	var errs []error
	if err := fw.remove(); err != nil {
		errs = append(errs, fmt.Errorf("removing rules: %w", err))
	}
	if err := flushMarked(); err != nil {
		errs = append(errs, fmt.Errorf("removing conntrack marks: %w", err))
	}
	if err := splitroute.Cleanup(); err != nil {
		errs = append(errs, fmt.Errorf("removing split routes: %w", err))
	}
	return errors.Join(errs...)
}
