package bpfkit

import (
	"errors"
	"fmt"
	"os"
	"runtime"

	"golang.org/x/sys/unix"
)

// ErrUnavailable marks a failure caused by what the system lacks or forbids (no cgroup v2, no BPF permission,
// an old kernel, another pid namespace), as opposed to a rejected program.
var ErrUnavailable = errors.New("kernel feature missing")

// InCgroupRoot calls fn with the path of the cgroup v2 root: the mount /proc/self/mountinfo names, or, when
// this mount namespace has none (`ip netns exec` remounts /sys without it), a mount of our own made in a
// private mount namespace of a throwaway thread, so no other process ever sees it. fn runs on that thread then,
// and must not start goroutines that use the path.
func InCgroupRoot(fn func(dir string) error) error {
	mountinfo, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return fmt.Errorf("%w: reading mountinfo: %w", ErrUnavailable, err)
	}
	if dir, ok := cgroup2Mount(mountinfo); ok {
		return fn(dir)
	}
	done := make(chan error, 1)
	go func() {
		// The thread is never unlocked: it leaves the process with its mount namespace when this goroutine
		// returns.
		runtime.LockOSThread()
		done <- inPrivateCgroupMount(fn)
	}()
	return <-done
}

// inPrivateCgroupMount runs on a locked thread: it gives the thread its own mount namespace, mounts cgroup2
// there and calls fn with the mount point.
func inPrivateCgroupMount(fn func(dir string) error) error {
	if err := unix.Unshare(unix.CLONE_NEWNS); err != nil {
		return fmt.Errorf("%w: no cgroup2 mount, and cannot make a private mount namespace: %w", ErrUnavailable, err)
	}
	// Without this a mount below a shared mount would propagate back to the original namespace.
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("%w: making mounts private: %w", ErrUnavailable, err)
	}
	dir, err := os.MkdirTemp("", "warden-cgroup2-")
	if err != nil {
		return fmt.Errorf("%w: %w", ErrUnavailable, err)
	}
	defer os.Remove(dir)
	if err := unix.Mount("none", dir, "cgroup2", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
		return fmt.Errorf("%w: no cgroup2 mount, and mounting one failed: %w", ErrUnavailable, err)
	}
	defer unix.Unmount(dir, unix.MNT_DETACH)
	return fn(dir)
}

// NetnsCookie returns the cookie of the network namespace the socket fd is in (SO_NETNS_COOKIE, Linux 5.14).
func NetnsCookie(fd int) (uint64, error) {
	c, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
	if err != nil {
		return 0, fmt.Errorf("reading the network namespace cookie: %w", err)
	}
	return c, nil
}
