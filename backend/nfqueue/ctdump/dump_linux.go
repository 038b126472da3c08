package ctdump

import (
	"fmt"
	"time"

	"golang.org/x/sys/unix"

	"github.com/warden-fw/warden/backend/nfqueue/nlwire"
)

// readTimeout bounds each read of the dump, so a kernel that stops answering cannot hang the caller.
const readTimeout = 5 * time.Second

// Dump lists the conntrack table of the calling thread's network namespace, both address families, calling f
// with every entry (see Parse). It holds one 64 KiB buffer for the whole listing.
func Dump(f func(*Flow)) error {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_NETFILTER)
	if err != nil {
		return fmt.Errorf("opening ctnetlink socket: %w", err)
	}
	defer unix.Close(fd)
	tv := unix.NsecToTimeval(readTimeout.Nanoseconds())
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		return fmt.Errorf("setting ctnetlink read timeout: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return fmt.Errorf("binding ctnetlink socket: %w", err)
	}
	if err := unix.Sendto(fd, request(1), 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return fmt.Errorf("requesting conntrack dump: %w", err)
	}
	buf := make([]byte, 64<<10)
	var fl Flow
	for {
		n, _, err := unix.Recvfrom(fd, buf, 0)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("reading conntrack dump: %w", err)
		}
		if n > len(buf) {
			return fmt.Errorf("reading conntrack dump: %d-byte message truncated", n)
		}
		done, err := Parse(buf[:n], &fl, f)
		if err != nil {
			return err
		}
		if done {
			return nil
		}
	}
}

// request builds the dump request: IPCTNL_MSG_CT_GET with NLM_F_DUMP, family AF_UNSPEC (both families).
func request(seq uint32) []byte {
	b := nlwire.AppendHeader(nil, nlwire.NfgenHdrLen, nfnlSubsysCTNetlink<<8|ipctnlMsgCTGet,
		unix.NLM_F_REQUEST|unix.NLM_F_DUMP, seq)
	return append(b, unix.AF_UNSPEC, 0, 0, 0) // nfgenmsg: family, NFNETLINK_V0, res_id
}
