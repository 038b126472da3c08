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

	"github.com/warden-fw/warden/backend/nfqueue/nlwire"
)

// ctnetlink constants (linux/netfilter/nfnetlink.h, linux/netfilter/nfnetlink_conntrack.h).
const (
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
	ErrTruncated = nlwire.ErrTruncated
	// ErrKernel wraps an error the kernel answered the dump with.
	ErrKernel = errors.New("ctdump: kernel error")
)

// Parse walks the netlink messages in one datagram of a dump reply, decoding every complete entry into fl and
// calling f with it (fl is reused for the next entry: f must copy what it keeps). It reports done when the
// dump's end (NLMSG_DONE) was in the datagram. Entries missing a tuple are skipped; malformed framing is an
// error, never a panic.
func Parse(b []byte, fl *Flow, f func(*Flow)) (done bool, err error) {
	for len(b) > 0 {
		m, rest, err := nlwire.Next(b)
		if err != nil {
			return false, err
		}
		switch m.Type {
		case nlwire.TypeDone:
			return true, nil
		case nlwire.TypeError:
			code, err := nlwire.Errno(m.Payload)
			if err != nil {
				return false, err
			}
			if code != 0 {
				return false, kernelError(code)
			}
		case nfnlSubsysCTNetlink<<8 | ipctnlMsgCTNew:
			if len(m.Payload) < nlwire.NfgenHdrLen {
				return false, ErrTruncated
			}
			*fl = Flow{}
			if parseFlow(m.Payload[nlwire.NfgenHdrLen:], fl) {
				f(fl)
			}
		}
		b = rest
	}
	return false, nil
}

// parseFlow fills fl from an entry's attributes and reports whether both tuples were there.
func parseFlow(b []byte, fl *Flow) bool {
	var haveOrig, haveReply bool
	var origProto, replyProto uint8
	for typ, val, rest, ok := nlwire.NextAttr(b); ok; typ, val, rest, ok = nlwire.NextAttr(rest) {
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
	for typ, val, rest, ok := nlwire.NextAttr(b); ok; typ, val, rest, ok = nlwire.NextAttr(rest) {
		switch typ {
		case ctaTupleIP:
			for at, av, r2, ok2 := nlwire.NextAttr(val); ok2; at, av, r2, ok2 = nlwire.NextAttr(r2) {
				var a netip.Addr
				switch {
				case (at == ctaIPv4Src || at == ctaIPv4Dst) && len(av) == 4:
					a = netip.AddrFrom4([4]byte(av))
				case (at == ctaIPv6Src || at == ctaIPv6Dst) && len(av) == 16:
					a = netip.AddrFrom16([16]byte(av))
				default:
					continue
				}
				if at == ctaIPv4Src || at == ctaIPv6Src {
					src = a
				} else {
					dst = a
				}
			}
		case ctaTupleProto:
			for at, av, r2, ok2 := nlwire.NextAttr(val); ok2; at, av, r2, ok2 = nlwire.NextAttr(r2) {
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
	for typ, val, rest, ok := nlwire.NextAttr(b); ok; typ, val, rest, ok = nlwire.NextAttr(rest) {
		if typ != ctaProtoinfoTCP {
			continue
		}
		for at, av, r2, ok2 := nlwire.NextAttr(val); ok2; at, av, r2, ok2 = nlwire.NextAttr(r2) {
			if at == ctaProtoinfoTCPState && len(av) >= 1 {
				fl.TCPState, fl.HasTCPState = av[0], true
			}
		}
	}
}

func kernelError(errno int32) error {
	return fmt.Errorf("%w: %w", ErrKernel, syscall.Errno(errno))
}
