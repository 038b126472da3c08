// Package nlwire walks netlink messages and their attributes in place (no copy, no allocation, no panic on
// malformed input) and writes their framing. The queue reader (nfqread), the sock_diag clients (process,
// sockdiag) and the conntrack listing (ctdump) each speak their own netlink family; the framing around it is
// this one. Read and Write (io_linux.go) are the queue reader's and the verdict writer's system calls.
package nlwire

import (
	"encoding/binary"
	"errors"
)

// Framing sizes and the control message types (linux/netlink.h, linux/netfilter/nfnetlink.h).
const (
	// HdrLen is the size of struct nlmsghdr.
	HdrLen = 16
	// NfgenHdrLen is the size of struct nfgenmsg, which opens every nfnetlink payload.
	NfgenHdrLen = 4
	// AttrHdrLen is the size of struct nlattr (and of struct rtattr).
	AttrHdrLen = 4

	TypeNoop  = 1
	TypeError = 2
	TypeDone  = 3

	attrFNested   = 1 << 15
	attrFByteOrd  = 1 << 14
	attrTypeMask  = ^uint16(attrFNested | attrFByteOrd)
	alignmentMask = 3
)

// ErrTruncated reports a message or an error payload whose length does not fit the bytes at hand.
var ErrTruncated = errors.New("netlink: truncated message")

// Msg is one netlink message: its header's fields and its payload (a slice of the input).
type Msg struct {
	Type    uint16
	Flags   uint16
	Seq     uint32
	Payload []byte
}

// Next splits the first message off b and returns the rest of b after it (nil when none is left).
func Next(b []byte) (Msg, []byte, error) {
	if len(b) < HdrLen {
		return Msg{}, nil, ErrTruncated
	}
	ne := binary.NativeEndian
	n := int(ne.Uint32(b[0:4]))
	if n < HdrLen || n > len(b) {
		return Msg{}, nil, ErrTruncated
	}
	m := Msg{Type: ne.Uint16(b[4:6]), Flags: ne.Uint16(b[6:8]), Seq: ne.Uint32(b[8:12]), Payload: b[HdrLen:n]}
	if next := Align(n); next < len(b) {
		return m, b[next:], nil
	}
	return m, nil, nil
}

// Errno returns the error number of an NLMSG_ERROR payload, positive (0 is an acknowledgement).
func Errno(payload []byte) (int32, error) {
	if len(payload) < 4 {
		return 0, ErrTruncated
	}
	return -int32(binary.NativeEndian.Uint32(payload[0:4])), nil
}

// NextAttr splits the first attribute off b: its type (the nested and byte-order flags masked off), its value,
// and the rest of b after its padding (which the last attribute may lack). ok is false when b does not start
// with a whole attribute, at the end of b among others: callers loop while b is not empty.
func NextAttr(b []byte) (typ uint16, val, rest []byte, ok bool) {
	if len(b) < AttrHdrLen {
		return 0, nil, nil, false
	}
	n := int(binary.NativeEndian.Uint16(b[0:2]))
	if n < AttrHdrLen || n > len(b) {
		return 0, nil, nil, false
	}
	typ = binary.NativeEndian.Uint16(b[2:4]) & attrTypeMask
	val = b[AttrHdrLen:n]
	if next := Align(n); next < len(b) {
		rest = b[next:]
	}
	return typ, val, rest, true
}

// AppendHeader appends the header of a message whose payload is payloadLen bytes; the port ID is left 0 for the
// kernel to fill in.
func AppendHeader(b []byte, payloadLen int, typ, flags uint16, seq uint32) []byte {
	ne := binary.NativeEndian
	b = ne.AppendUint32(b, uint32(HdrLen+payloadLen))
	b = ne.AppendUint16(b, typ)
	b = ne.AppendUint16(b, flags)
	b = ne.AppendUint32(b, seq)
	return ne.AppendUint32(b, 0)
}

// AppendMsg appends a whole message: header, payload and the padding to the next message.
func AppendMsg(b []byte, typ, flags uint16, seq uint32, payload []byte) []byte {
	b = append(AppendHeader(b, len(payload), typ, flags, seq), payload...)
	return pad(b)
}

// AppendAttr appends an attribute: header, value and padding.
func AppendAttr(b []byte, typ uint16, val []byte) []byte {
	b = binary.NativeEndian.AppendUint16(b, uint16(AttrHdrLen+len(val)))
	b = binary.NativeEndian.AppendUint16(b, typ)
	return pad(append(b, val...))
}

// pad appends zeros up to netlink's alignment.
func pad(b []byte) []byte {
	for len(b)%(alignmentMask+1) != 0 {
		b = append(b, 0)
	}
	return b
}

// Align rounds a length up to netlink's 4-byte alignment.
func Align(n int) int { return (n + alignmentMask) &^ alignmentMask }
