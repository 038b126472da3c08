// Package ctdump lists the kernel's connection tracking table (a ctnetlink dump) and parses it in place,
// without allocating per entry. Established connections never reach Warden on Linux (only their first packets
// do), so conntrack is the only place that knows which of them still exist: the pipeline uses a listing to
// forget connections that ended and to keep live ones from being evicted or expired as idle.
//
// github.com/ti-mo/conntrack can dump too, but it decodes every entry into a freshly allocated Flow of several
// hundred bytes: a table of 100 000 entries would make tens of megabytes of garbage on every listing.
package ctdump

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"syscall"
)

// Netlink, nfnetlink and ctnetlink constants (linux/netlink.h, linux/netfilter/nfnetlink_conntrack.h).
const (
	nlmsgHdrLen = 16
	nfgenHdrLen = 4
	nlmsgNoop   = 1
	nlmsgError  = 2
	nlmsgDone   = 3

	nlaHdrLen   = 4
	nlaFNested  = 1 << 15
	nlaFByteOrd = 1 << 14
	nlaTypeMask = ^uint16(nlaFNested | nlaFByteOrd)

	nfnlSubsysCTNetlink = 1
	ipctnlMsgCTNew      = 0 // dump replies carry IPCTNL_MSG_CT_NEW
	ipctnlMsgCTGet      = 1

	ctaTupleOrig  = 1
	ctaTupleReply = 2
	ctaProtoinfo  = 4

	ctaTupleIP    = 1
	ctaTupleProto = 2

	ctaIPv4Src = 1
	ctaIPv4Dst = 2
	ctaIPv6Src = 3
	ctaIPv6Dst = 4

	ctaProtoNum     = 1
	ctaProtoSrcPort = 2
	ctaProtoDstPort = 3

	ctaProtoinfoTCP      = 1
	ctaProtoinfoTCPState = 1
)

// TCP conntrack states (enum tcp_conntrack in linux/netfilter/nf_conntrack_tcp.h) that matter here.
const (
	TCPStateTimeWait = 7
	TCPStateClose    = 8
)

// Tuple is one direction of a tracked connection.
type Tuple struct {
	Src, Dst netip.AddrPort
}

// Flow is one conntrack entry, as much of it as Warden needs.
type Flow struct {
	// Proto is the IP protocol number (6 TCP, 17 UDP, ...).
	Proto uint8
	// Orig is the tuple of the connection's first packet; Reply the tuple replies carry (the two differ by
	// what NAT changed).
	Orig, Reply Tuple
	// TCPState is the conntrack TCP state when HasTCPState is set.
	TCPState    uint8
	HasTCPState bool
}

// Ended reports whether a TCP entry is only waiting out TIME_WAIT or CLOSE: its connection is over.
func (f *Flow) Ended() bool {
	return f.HasTCPState && (f.TCPState == TCPStateTimeWait || f.TCPState == TCPStateClose)
}

// Errors of Parse.
var (
	ErrTruncated = errors.New("ctdump: truncated netlink message")
	// ErrKernel wraps an error the kernel answered the dump with.
	ErrKernel = errors.New("ctdump: kernel error")
)

// Parse walks the netlink messages in one datagram of a dump reply, decoding every complete entry into fl and
// calling f with it (fl is reused for the next entry: f must copy what it keeps). It reports done when the
// dump's end (NLMSG_DONE) was in the datagram. Entries missing a tuple are skipped; malformed framing is an
// error, never a panic.
func Parse(b []byte, fl *Flow, f func(*Flow)) (done bool, err error) {
	for len(b) > 0 {
		if len(b) < nlmsgHdrLen {
			return false, ErrTruncated
		}
		n := binary.NativeEndian.Uint32(b[0:4])
		typ := binary.NativeEndian.Uint16(b[4:6])
		if n < nlmsgHdrLen || uint64(n) > uint64(len(b)) {
			return false, ErrTruncated
		}
		msg := b[nlmsgHdrLen:n]
		switch {
		case typ == nlmsgDone:
			return true, nil
		case typ == nlmsgError:
			if len(msg) < 4 {
				return false, ErrTruncated
			}
			if code := int32(binary.NativeEndian.Uint32(msg[0:4])); code != 0 {
				return false, kernelError(-code)
			}
		case typ == nlmsgNoop:
		case typ == nfnlSubsysCTNetlink<<8|ipctnlMsgCTNew:
			if len(msg) < nfgenHdrLen {
				return false, ErrTruncated
			}
			*fl = Flow{}
			if parseFlow(msg[nfgenHdrLen:], fl) {
				f(fl)
			}
		}
		if a := align(int(n)); a < len(b) {
			b = b[a:]
		} else {
			b = nil
		}
	}
	return false, nil
}

// parseFlow fills fl from an entry's attributes and reports whether both tuples were there.
func parseFlow(b []byte, fl *Flow) bool {
	var haveOrig, haveReply bool
	var origProto, replyProto uint8
	for typ, val, rest, ok := nextAttr(b); ok; typ, val, rest, ok = nextAttr(rest) {
		switch typ {
		case ctaTupleOrig:
			haveOrig = parseTuple(val, &fl.Orig, &origProto)
		case ctaTupleReply:
			haveReply = parseTuple(val, &fl.Reply, &replyProto)
		case ctaProtoinfo:
			parseProtoinfo(val, fl)
		}
	}
	fl.Proto = origProto
	return haveOrig && haveReply
}

func parseTuple(b []byte, t *Tuple, proto *uint8) bool {
	var src, dst netip.Addr
	var sport, dport uint16
	for typ, val, rest, ok := nextAttr(b); ok; typ, val, rest, ok = nextAttr(rest) {
		switch typ {
		case ctaTupleIP:
			for at, av, r2, ok2 := nextAttr(val); ok2; at, av, r2, ok2 = nextAttr(r2) {
				switch {
				case (at == ctaIPv4Src || at == ctaIPv4Dst) && len(av) == 4:
					a := netip.AddrFrom4([4]byte(av))
					if at == ctaIPv4Src {
						src = a
					} else {
						dst = a
					}
				case (at == ctaIPv6Src || at == ctaIPv6Dst) && len(av) == 16:
					a := netip.AddrFrom16([16]byte(av))
					if at == ctaIPv6Src {
						src = a
					} else {
						dst = a
					}
				}
			}
		case ctaTupleProto:
			for at, av, r2, ok2 := nextAttr(val); ok2; at, av, r2, ok2 = nextAttr(r2) {
				switch {
				case at == ctaProtoNum && len(av) >= 1:
					*proto = av[0]
				case at == ctaProtoSrcPort && len(av) >= 2:
					sport = binary.BigEndian.Uint16(av)
				case at == ctaProtoDstPort && len(av) >= 2:
					dport = binary.BigEndian.Uint16(av)
				}
			}
		}
	}
	if !src.IsValid() || !dst.IsValid() {
		return false
	}
	t.Src, t.Dst = netip.AddrPortFrom(src, sport), netip.AddrPortFrom(dst, dport)
	return true
}

func parseProtoinfo(b []byte, fl *Flow) {
	for typ, val, rest, ok := nextAttr(b); ok; typ, val, rest, ok = nextAttr(rest) {
		if typ != ctaProtoinfoTCP {
			continue
		}
		for at, av, r2, ok2 := nextAttr(val); ok2; at, av, r2, ok2 = nextAttr(r2) {
			if at == ctaProtoinfoTCPState && len(av) >= 1 {
				fl.TCPState, fl.HasTCPState = av[0], true
			}
		}
	}
}

// nextAttr splits the first attribute off b. ok is false at the end or on a malformed attribute (the rest of
// b is then ignored: a truncated entry yields what it had).
func nextAttr(b []byte) (typ uint16, val, rest []byte, ok bool) {
	if len(b) < nlaHdrLen {
		return 0, nil, nil, false
	}
	n := int(binary.NativeEndian.Uint16(b[0:2]))
	if n < nlaHdrLen || n > len(b) {
		return 0, nil, nil, false
	}
	typ = binary.NativeEndian.Uint16(b[2:4]) & nlaTypeMask
	val = b[nlaHdrLen:n]
	if a := align(n); a < len(b) {
		rest = b[a:]
	}
	return typ, val, rest, true
}

func align(n int) int { return (n + 3) &^ 3 }

func kernelError(errno int32) error {
	return fmt.Errorf("%w: %w", ErrKernel, syscall.Errno(errno))
}
