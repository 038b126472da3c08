package handoff

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"time"

	"golang.org/x/sys/unix"

	"github.com/warden-fw/warden/backend/nfqueue/nlwire"
	"github.com/warden-fw/warden/backend/nfqueue/sockdiag"
)

// diagTimeout bounds one sock_diag answer; the kernel answers a single-socket request at once.
const diagTimeout = 2 * time.Second

// inetDiagSKMemInfo is INET_DIAG_SKMEMINFO (linux/inet_diag.h): u32 sk_meminfo[], SK_MEMINFO_RMEM_ALLOC first.
const inetDiagSKMemInfo = 7

// Queued returns how many bytes the application has not read yet from its socket (handed-off data and
// anything that came over the loopback connection), or unix.ENOENT once the socket is gone.
func (c *Client) Queued() (int, error) {
	h := c.h
	h.diagMu.Lock()
	defer h.diagMu.Unlock()
	if h.diag < 0 {
		return 0, unix.EBADF
	}
	var req [nlwire.HdrLen + sockdiag.RequestLen]byte
	r := queuedRequest(c.client, c.original, c.cookie)
	buf := sockdiag.AppendRequest(req[:0], 0, &r) // sequence 0: one request at a time
	if _, err := unix.Write(h.diag, buf); err != nil {
		return 0, fmt.Errorf("sock_diag request: %w", err)
	}
	var ans [1024]byte
	for {
		n, err := unix.Read(h.diag, ans[:])
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return 0, fmt.Errorf("sock_diag answer: %w", err)
		}
		return parseQueued(ans[:n])
	}
}

// queuedRequest asks for the memory info of the one TCP socket from client to original with this cookie.
func queuedRequest(client, original netip.AddrPort, cookie uint64) sockdiag.Request {
	family := uint8(unix.AF_INET6)
	if client.Addr().Unmap().Is4() {
		family = unix.AF_INET
	}
	return sockdiag.Request{Family: family, Protocol: unix.IPPROTO_TCP, Ext: 1 << (inetDiagSKMemInfo - 1),
		States: sockdiag.AllStates, Src: netip.AddrPortFrom(client.Addr().Unmap(), client.Port()),
		Dst: netip.AddrPortFrom(original.Addr().Unmap(), original.Port()), Cookie: cookie}
}

// parseQueued reads SK_MEMINFO_RMEM_ALLOC out of a sock_diag answer.
func parseQueued(b []byte) (int, error) {
	m, _, err := nlwire.Next(b)
	if err != nil {
		return 0, err
	}
	if m.Type == nlwire.TypeError {
		errno, err := nlwire.Errno(m.Payload)
		if err != nil {
			return 0, err
		}
		return 0, unix.Errno(errno)
	}
	if m.Type != sockdiag.ByFamily || len(m.Payload) < sockdiag.MsgLen {
		return 0, fmt.Errorf("sock_diag: unexpected answer type %d of %d bytes", m.Type, len(m.Payload))
	}
	attrs := m.Payload[sockdiag.MsgLen:]
	for {
		typ, val, rest, ok := nlwire.NextAttr(attrs)
		if !ok {
			return 0, fmt.Errorf("sock_diag: no memory info in the answer")
		}
		if typ == inetDiagSKMemInfo && len(val) >= 4 {
			return int(binary.NativeEndian.Uint32(val)), nil
		}
		attrs = rest
	}
}
