package nfqueue

import (
	"errors"
	"fmt"

	"github.com/warden-fw/warden/backend/nslock"
)

// instanceLock names the lock a running nfqueue backend holds in its network namespace (see nslock).
const instanceLock = "warden-nfqueue"

// ErrOtherInstance is returned when another Warden runs in this network namespace. Starting anyway would have
// removed its rules as a crashed run's leftovers, opening the host under it.
var ErrOtherInstance = errors.New("another warden runs in this network namespace")

// lockInstance takes the namespace's instance lock, or fails with ErrOtherInstance naming the holder.
func lockInstance() (*nslock.Lock, error) {
	l, err := nslock.Acquire(instanceLock)
	var held *nslock.HeldError
	if errors.As(err, &held) {
		if held.PID > 0 {
			return nil, fmt.Errorf("%w (pid %d); stop it first", ErrOtherInstance, held.PID)
		}
		return nil, fmt.Errorf("%w; stop it first", ErrOtherInstance)
	}
	return l, err
}
