package nfqueue

import (
	"encoding/binary"
	"errors"
	"net/netip"

	"github.com/warden-fw/warden/backend"
)

// headers is what the parser extracts from one IP packet. It is plain data so it can live inside a pooled
// packet and be filled without allocating.
type headers struct {
	Proto   backend.Protocol
	Src     netip.Addr
	Dst     netip.Addr
	SrcPort uint16
	DstPort uint16
	// ICMPType and ICMPCode are set for ICMP and ICMPv6.
	ICMPType uint8
	ICMPCode uint8
	// Fragment reports whether the packet is a non-first fragment, which carries no transport header.
	Fragment bool
}

// Parse errors. They are sentinel values so that parsing stays allocation-free.
var (
	errTruncated  = errors.New("packet truncated")
	errBadVersion = errors.New("not an IPv4 or IPv6 packet")
	errBadHeader  = errors.New("malformed IP header")
)

// maxExtHeaders bounds the IPv6 extension header walk: a packet with more headers than this is not
// something a verdict needs to look into further, and the bound keeps the loop finite on hostile input.
const maxExtHeaders = 8

// IPv6 next-header values the walk steps over.
const (
	nhHopByHop = 0
	nhRouting  = 43
	nhFragment = 44
	nhESP      = 50
	nhAH       = 51
	nhNone     = 59
	nhDstOpts  = 60
	nhMobility = 135
	nhHIP      = 139
	nhShim6    = 140
)

// parseHeaders parses an IPv4 or IPv6 packet (possibly truncated to the first bytes, as the queue's copy
// range delivers it) into h. It never allocates. An error means the IP header itself is unusable; a transport
// header cut short by the copy range only leaves the ports zero.
func parseHeaders(b []byte, h *headers) error {
	*h = headers{}
	if len(b) < 1 {
		return errTruncated
	}
	switch b[0] >> 4 {
	case 4:
		return parseIPv4(b, h)
	case 6:
		return parseIPv6(b, h)
	}
	return errBadVersion
}

func parseIPv4(b []byte, h *headers) error {
	if len(b) < 20 {
		return errTruncated
	}
	ihl := int(b[0]&0x0f) * 4
	if ihl < 20 {
		return errBadHeader
	}
	h.Proto = backend.Protocol(b[9])
	h.Src = netip.AddrFrom4([4]byte(b[12:16]))
	h.Dst = netip.AddrFrom4([4]byte(b[16:20]))
	// A non-first fragment has no transport header; its offset field is non-zero.
	if binary.BigEndian.Uint16(b[6:8])&0x1fff != 0 {
		h.Fragment = true
		return nil
	}
	if len(b) < ihl {
		// Options cut off by the copy range: the addresses are still good.
		return nil
	}
	parseTransport(b[ihl:], h, false)
	return nil
}

func parseIPv6(b []byte, h *headers) error {
	if len(b) < 40 {
		return errTruncated
	}
	h.Src = netip.AddrFrom16([16]byte(b[8:24]))
	h.Dst = netip.AddrFrom16([16]byte(b[24:40]))
	next := b[6]
	rest := b[40:]
	for range maxExtHeaders {
		switch next {
		case nhHopByHop, nhRouting, nhDstOpts, nhMobility, nhHIP, nhShim6:
			if len(rest) < 2 {
				h.Proto = backend.Protocol(next)
				return nil
			}
			n := (int(rest[1]) + 1) * 8
			next = rest[0]
			if len(rest) < n {
				h.Proto = backend.Protocol(next)
				return nil
			}
			rest = rest[n:]
		case nhFragment:
			if len(rest) < 8 {
				h.Proto = backend.Protocol(next)
				return nil
			}
			next = rest[0]
			if binary.BigEndian.Uint16(rest[2:4])&0xfff8 != 0 {
				h.Proto = backend.Protocol(next)
				h.Fragment = true
				return nil
			}
			rest = rest[8:]
		case nhAH:
			if len(rest) < 2 {
				h.Proto = backend.Protocol(next)
				return nil
			}
			n := (int(rest[1]) + 2) * 4
			next = rest[0]
			if len(rest) < n {
				h.Proto = backend.Protocol(next)
				return nil
			}
			rest = rest[n:]
		default:
			// ESP, "no next header" and every upper-layer protocol end the walk.
			h.Proto = backend.Protocol(next)
			parseTransport(rest, h, true)
			return nil
		}
	}
	// Too many extension headers: report the last one as the protocol, without ports.
	h.Proto = backend.Protocol(next)
	return nil
}

// parseTransport reads ports (TCP, UDP: the protocols backend.Info gives ports to) or type and code (ICMP) from the start of the transport header. A
// header shorter than the fields leaves them zero.
func parseTransport(b []byte, h *headers, v6 bool) {
	switch h.Proto {
	case backend.TCP, backend.UDP:
		if len(b) >= 4 {
			h.SrcPort = binary.BigEndian.Uint16(b[0:2])
			h.DstPort = binary.BigEndian.Uint16(b[2:4])
		}
	case backend.ICMP:
		if !v6 && len(b) >= 2 {
			h.ICMPType, h.ICMPCode = b[0], b[1]
		}
	case backend.ICMPv6:
		if v6 && len(b) >= 2 {
			h.ICMPType, h.ICMPCode = b[0], b[1]
		}
	}
}

// fillInfo turns parsed headers into the backend.Info the pipeline sees. out reports whether the packet is
// leaving this host (it was queued from an output hook); dir is the connection's direction, which differs
// from the packet's for replies. Local and Remote follow the packet: the local end is the source of a
// packet leaving and the destination of one arriving.
func fillInfo(h *headers, out bool, dir backend.Direction, info *backend.Info) {
	info.Protocol = h.Proto
	info.Direction = dir
	src := netip.AddrPortFrom(h.Src, h.SrcPort)
	dst := netip.AddrPortFrom(h.Dst, h.DstPort)
	if out {
		info.Local, info.Remote = src, dst
	} else {
		info.Local, info.Remote = dst, src
	}
}
