// Package rtnlwatch subscribes to rtnetlink announcements (links, addresses, routes, ip rules) for watchers
// that only need to know that something changed and then read the state they care about themselves.
package rtnlwatch

import (
	"context"
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// GroupIPv6Rule is the legacy group bit of RTNLGRP_IPV6_RULE (19, linux/rtnetlink.h), which x/sys/unix lacks;
// the others are unix.RTMGRP_*.
const GroupIPv6Rule = 1 << (19 - 1)

// Watch subscribes to the rtnetlink groups (a bitmask of RTMGRP_* bits) of the calling thread's network
// namespace and calls notify after every message, until ctx ends. Lost messages (the socket's buffer overran)
// call notify too: the caller reads the whole state anyway. It returns nil when ctx ends, an error when it
// cannot subscribe or reading fails.
func Watch(ctx context.Context, groups uint32, notify func()) error {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, unix.NETLINK_ROUTE)
	if err != nil {
		return fmt.Errorf("opening rtnetlink socket: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK, Groups: groups}); err != nil {
		unix.Close(fd)
		return fmt.Errorf("subscribing to rtnetlink groups %#x: %w", groups, err)
	}
	// A non-blocking fd wrapped in an os.File uses the runtime poller, so Close interrupts a pending Read.
	f := os.NewFile(uintptr(fd), "rtnetlink")
	stop := context.AfterFunc(ctx, func() { f.Close() })
	defer func() {
		if stop() {
			f.Close()
		}
	}()
	buf := make([]byte, 64<<10)
	for {
		_, err := f.Read(buf)
		if ctx.Err() != nil {
			return nil
		}
		if err != nil && !errors.Is(err, unix.ENOBUFS) {
			return fmt.Errorf("reading rtnetlink: %w", err)
		}
		notify()
	}
}
