package process

import (
	"encoding/binary"
	"fmt"
	"net/netip"

	"github.com/warden-fw/warden/backend/nfqueue/nlwire"
	"github.com/warden-fw/warden/backend/nfqueue/sockdiag"
)

// The sock_diag answer format (linux/sock_diag.h, linux/inet_diag.h; package sockdiag encodes the requests). It
// is spelled out here rather than taken from x/sys/unix, which lacks the inet_diag structures, and kept
// OS-neutral so the decoder can be tested and fuzzed anywhere.
const (
	sizeofSockID     = 48
	sizeofDiagMsg    = sockdiag.MsgLen // struct inet_diag_msg
	sockDiagByFamily = sockdiag.ByFamily

	afInet  = 2
	afInet6 = 10

	ipprotoTCP = 6
	ipprotoUDP = 17

	tcpListen = 10

	inetDiagSKV6Only = 11
	allStates        = sockdiag.AllStates
)

// sockInfo is the part of an inet_diag_msg the resolver needs.
type sockInfo struct {
	family uint8
	state  uint8
	// local and remote are the socket's own addresses; remote is unspecified with port 0 when unconnected.
	local, remote netip.AddrPort
	ifindex       uint32
	uid           uint32
	inode         uint32
	// cookie is the kernel's socket cookie (idiag_cookie), the key of the eBPF owner map.
	cookie uint64
	// v6only is 1 for an IPv6-only socket, 0 for a dual-stack IPv6 socket, -1 for IPv4 or unknown.
	v6only int8
}

// parseDiagMsg decodes an inet_diag_msg and its attributes (the payload of a SOCK_DIAG_BY_FAMILY message).
func parseDiagMsg(b []byte) (sockInfo, error) {
	if len(b) < sizeofDiagMsg {
		return sockInfo{}, fmt.Errorf("inet_diag_msg of %d bytes, want %d", len(b), sizeofDiagMsg)
	}
	ne := binary.NativeEndian
	s := sockInfo{family: b[0], state: b[1], v6only: -1}
	id := b[4 : 4+sizeofSockID]
	sport := binary.BigEndian.Uint16(id[0:2])
	dport := binary.BigEndian.Uint16(id[2:4])
	switch s.family {
	case afInet:
		s.local = netip.AddrPortFrom(netip.AddrFrom4([4]byte(id[4:8])), sport)
		s.remote = netip.AddrPortFrom(netip.AddrFrom4([4]byte(id[20:24])), dport)
	case afInet6:
		s.local = netip.AddrPortFrom(netip.AddrFrom16([16]byte(id[4:20])), sport)
		s.remote = netip.AddrPortFrom(netip.AddrFrom16([16]byte(id[20:36])), dport)
	default:
		return sockInfo{}, fmt.Errorf("inet_diag_msg of address family %d", s.family)
	}
	s.ifindex = ne.Uint32(id[36:40])
	// idiag_cookie is two native u32s, the low half first (sock_diag_save_cookie).
	s.cookie = uint64(ne.Uint32(id[40:44])) | uint64(ne.Uint32(id[44:48]))<<32
	tail := b[4+sizeofSockID:]
	// tail: expires, rqueue, wqueue, uid, inode.
	s.uid = ne.Uint32(tail[12:16])
	s.inode = ne.Uint32(tail[16:20])
	for attrs := b[sizeofDiagMsg:]; len(attrs) >= nlwire.AttrHdrLen; {
		typ, val, rest, ok := nlwire.NextAttr(attrs)
		if !ok {
			return sockInfo{}, fmt.Errorf("inet_diag attribute of length %d in %d bytes", ne.Uint16(attrs[0:2]), len(attrs))
		}
		if typ == inetDiagSKV6Only && len(val) > 0 && s.family == afInet6 {
			s.v6only = int8(min(val[0], 1))
		}
		attrs = rest
	}
	return s, nil
}
