package handoff

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"time"

	"golang.org/x/sys/unix"

	"github.com/warden-fw/warden/backend/nfqueue/nlwire"
)

// diagTimeout bounds one sock_diag answer; the kernel answers a single-socket request at once.
const diagTimeout = 2 * time.Second

// sock_diag ABI (linux/sock_diag.h, linux/inet_diag.h).
const (
	sockDiagByFamily  = 20
	nlmFRequest       = 1
	diagReqLen        = 56 // struct inet_diag_req_v2
	diagMsgLen        = 72 // struct inet_diag_msg
	inetDiagSKMemInfo = 7  // INET_DIAG_SKMEMINFO: u32 sk_meminfo[], SK_MEMINFO_RMEM_ALLOC first
)

// Queued returns how many bytes the application has not read yet from its socket (handed-off data and
// anything that came over the loopback connection), or unix.ENOENT once the socket is gone.
func (c *Client) Queued() (int, error) {
	h := c.h
	h.diagMu.Lock()
	defer h.diagMu.Unlock()
	if h.diag < 0 {
		return 0, unix.EBADF
	}
	var req [nlwire.HdrLen + diagReqLen]byte
	buf := appendDiagRequest(req[:0], c.client, c.original, c.cookie)
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

// appendDiagRequest appends a request for the one TCP socket from client to original with this cookie, asking
// for its memory info.
func appendDiagRequest(b []byte, client, original netip.AddrPort, cookie uint64) []byte {
	ne := binary.NativeEndian
	family := uint8(unix.AF_INET6)
	if client.Addr().Unmap().Is4() {
		family = unix.AF_INET
	}
	b = ne.AppendUint32(b, nlwire.HdrLen+diagReqLen)
	b = ne.AppendUint16(b, sockDiagByFamily)
	b = ne.AppendUint16(b, nlmFRequest)
	b = ne.AppendUint32(b, 0) // sequence: one request at a time
	b = ne.AppendUint32(b, 0)
	b = append(b, family, unix.IPPROTO_TCP, 1<<(inetDiagSKMemInfo-1), 0)
	b = ne.AppendUint32(b, ^uint32(0)) // any state
	b = binary.BigEndian.AppendUint16(b, client.Port())
	b = binary.BigEndian.AppendUint16(b, original.Port())
	b = appendAddr(b, client.Addr().Unmap(), family)
	b = appendAddr(b, original.Addr().Unmap(), family)
	b = ne.AppendUint32(b, 0) // any interface
	b = ne.AppendUint32(b, uint32(cookie))
	b = ne.AppendUint32(b, uint32(cookie>>32))
	return b
}

func appendAddr(b []byte, a netip.Addr, family uint8) []byte {
	var raw [16]byte
	if family == unix.AF_INET {
		v4 := a.As4()
		copy(raw[:], v4[:])
	} else {
		raw = a.As16()
	}
	return append(b, raw[:]...)
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
	if m.Type != sockDiagByFamily || len(m.Payload) < diagMsgLen {
		return 0, fmt.Errorf("sock_diag: unexpected answer type %d of %d bytes", m.Type, len(m.Payload))
	}
	attrs := m.Payload[diagMsgLen:]
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
