// Package sockdiag encodes sock_diag requests for one socket or a dump (struct inet_diag_req_v2 in a netlink
// message). The process resolver and the split-tunnel handoff both ask the kernel about sockets this way. It is
// OS-neutral so it can be tested anywhere; the answers are each caller's to decode (nlwire frames them).
package sockdiag

import (
	"encoding/binary"
	"net/netip"

	"github.com/warden-fw/warden/backend/nfqueue/nlwire"
)

// Wire constants (linux/netlink.h, linux/sock_diag.h, linux/inet_diag.h).
const (
	// ByFamily is SOCK_DIAG_BY_FAMILY, the type of requests and of their answers.
	ByFamily = 20
	// RequestLen is the size of struct inet_diag_req_v2.
	RequestLen = 56
	// MsgLen is the size of struct inet_diag_msg, which opens every answer; its attributes follow.
	MsgLen = 72
	// AllStates asks for sockets in any TCP state.
	AllStates = ^uint32(0)

	nlmFRequest = 0x1
	nlmFDump    = 0x300
	noCookie    = ^uint32(0)
)

// Request is one inet_diag_req_v2.
type Request struct {
	Dump     bool
	Family   uint8
	Protocol uint8
	// Ext asks for attributes: bit n-1 for INET_DIAG_* number n.
	Ext    uint8
	States uint32
	// Src and Dst fill the request's socket ID as given; a zero AddrPort leaves the field zero.
	Src, Dst netip.AddrPort
	Ifindex  uint32
	// Cookie, when not 0, makes the kernel answer only for the socket with this cookie (sock_gen_cookie).
	Cookie uint64
}

// AppendRequest appends the netlink message for r, with sequence number seq, to b.
func AppendRequest(b []byte, seq uint32, r *Request) []byte {
	ne := binary.NativeEndian
	flags := uint16(nlmFRequest)
	if r.Dump {
		flags |= nlmFDump
	}
	b = nlwire.AppendHeader(b, RequestLen, ByFamily, flags, seq)
	b = append(b, r.Family, r.Protocol, r.Ext, 0)
	b = ne.AppendUint32(b, r.States)
	b = binary.BigEndian.AppendUint16(b, r.Src.Port())
	b = binary.BigEndian.AppendUint16(b, r.Dst.Port())
	b = AppendAddr(b, r.Src.Addr())
	b = AppendAddr(b, r.Dst.Addr())
	b = ne.AppendUint32(b, r.Ifindex)
	lo, hi := noCookie, noCookie
	if r.Cookie != 0 {
		lo, hi = uint32(r.Cookie), uint32(r.Cookie>>32)
	}
	b = ne.AppendUint32(b, lo)
	return ne.AppendUint32(b, hi)
}

// AppendAddr appends a 16-byte address field as sock_diag lays it out: IPv4 in the first four bytes, IPv6 in
// all of them.
func AppendAddr(b []byte, a netip.Addr) []byte {
	var raw [16]byte
	switch {
	case a.Is4():
		v4 := a.As4()
		copy(raw[:], v4[:])
	case a.Is6():
		raw = a.As16()
	}
	return append(b, raw[:]...)
}
