// Package nslock holds named locks scoped to a network namespace, for programs of which one instance may run
// per namespace: on Linux an abstract unix socket, which belongs to a network namespace and which the kernel
// removes with the last descriptor of the process holding it, so a crash (kill -9) never leaves a lock behind.
package nslock

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// ErrHeld is what a *HeldError is (errors.Is).
var ErrHeld = errors.New("held by another process")

// HeldError says that another process holds the lock.
type HeldError struct {
	Name string
	PID  int32 // the holder, 0 when it could not be learnt
}

func (e *HeldError) Error() string {
	if e.PID > 0 {
		return fmt.Sprintf("lock %s: %v (pid %d)", e.Name, ErrHeld, e.PID)
	}
	return fmt.Sprintf("lock %s: %v", e.Name, ErrHeld)
}

// Is makes errors.Is(err, ErrHeld) true.
func (e *HeldError) Is(target error) bool { return target == ErrHeld }

// Lock is a held lock.
type Lock struct{ fd int }

// Acquire takes the lock called name in the calling thread's network namespace. When another process holds
// it, the error is a *HeldError.
func Acquire(name string) (*Lock, error) {
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("lock %s: %w", name, err)
	}
	err = unix.Bind(fd, &unix.SockaddrUnix{Name: "@" + name})
	if err == nil {
		// Listening lets another process connect and learn who holds the lock. Nothing is ever accepted, so
		// each such check leaves a pending connection: the backlog bounds them, and checks beyond it learn no
		// PID.
		err = unix.Listen(fd, 64)
	}
	if err == nil {
		return &Lock{fd: fd}, nil
	}
	unix.Close(fd)
	if errors.Is(err, unix.EADDRINUSE) {
		return nil, &HeldError{Name: name, PID: holder(name)}
	}
	return nil, fmt.Errorf("lock %s: %w", name, err)
}

// Release gives the lock up. It is safe on a nil or released lock.
func (l *Lock) Release() {
	if l != nil && l.fd >= 0 {
		unix.Close(l.fd)
		l.fd = -1
	}
}

// holder returns the PID of the process holding the lock, 0 when it cannot tell: a connection to a listening
// unix socket carries the listener's credentials.
func holder(name string) int32 {
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0)
	if err != nil {
		return 0
	}
	defer unix.Close(fd)
	if err := unix.Connect(fd, &unix.SockaddrUnix{Name: "@" + name}); err != nil {
		return 0
	}
	cred, err := unix.GetsockoptUcred(fd, unix.SOL_SOCKET, unix.SO_PEERCRED)
	if err != nil {
		return 0
	}
	return cred.Pid
}
