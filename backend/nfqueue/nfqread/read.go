// Package nfqread binds an NFQUEUE queue and reads its packets on the queue's netlink socket directly. The
// library's read loop (github.com/florianl/go-nfqueue) makes two system calls per packet (a peek for the
// size, then the read), allocates a page-sized buffer for each, and parses every packet into freshly
// allocated attributes: at new-connection rates that is most of the garbage a firewall makes, and on a
// virtual machine a system call costs microseconds. Here one read takes one datagram into a buffer owned by
// the reader, and the packet is parsed in place. Opening the socket stays with the library; verdicts are
// written by nfqverdict.
package nfqread

import (
	"encoding/binary"
	"errors"
	"sync/atomic"
	"syscall"
)

// Netlink and nfnetlink_queue constants (linux/netlink.h, linux/netfilter/nfnetlink*.h).
const (
	nlmsgHdrLen  = 16
	nfgenHdrLen  = 4
	nlmsgNoop    = 1
	nlmsgError   = 2
	nlmsgDone    = 3
	nlaFNested   = 1 << 15
	nlaFByteOrd  = 1 << 14
	nlaTypeMask  = ^uint16(nlaFNested | nlaFByteOrd)
	nfnlSubsysQ  = 3
	nfqnlMsgPkt  = 0
	nfqnlMsgConf = 2

	attrPacketHdr = 1
	attrMark      = 3
	attrInDev     = 5
	attrOutDev    = 6
	attrPayload   = 10
	attrUID       = 16
	attrGID       = 17
)

// Packet is one queued packet as the kernel described it. Payload points into the reader's buffer and is
// valid only until the callback returns.
type Packet struct {
	ID      uint32
	HWProto uint16 // EtherType, big-endian on the wire, host order here
	Hook    uint8  // netfilter hook number
	Queue   uint16

	Mark           uint32
	InDev, OutDev  uint32
	UID, GID       uint32
	HasMark        bool
	HasInDev       bool
	HasOutDev      bool
	HasUID, HasGID bool

	Payload []byte
}

// Errors of Parse.
var (
	ErrShort     = errors.New("nfqread: message too short")
	ErrNoPacket  = errors.New("nfqread: packet message without a packet header")
	ErrBadAttr   = errors.New("nfqread: malformed attribute")
	ErrNotPacket = errors.New("nfqread: not a queued-packet message")
)

// Parse decodes one nfnetlink_queue packet message (the whole netlink message, header included) into p. It
// reports ErrNotPacket for any other message type, and never reads outside msg.
func Parse(msg []byte, p *Packet) error {
	*p = Packet{}
	if len(msg) < nlmsgHdrLen+nfgenHdrLen {
		return ErrShort
	}
	ne := binary.NativeEndian
	n := int(ne.Uint32(msg))
	if n < nlmsgHdrLen+nfgenHdrLen || n > len(msg) {
		return ErrShort
	}
	if ne.Uint16(msg[4:]) != nfnlSubsysQ<<8|nfqnlMsgPkt {
		return ErrNotPacket
	}
	p.Queue = binary.BigEndian.Uint16(msg[nlmsgHdrLen+2:])
	seenHdr := false
	attrs := msg[nlmsgHdrLen+nfgenHdrLen : n]
	for len(attrs) > 0 {
		if len(attrs) < 4 {
			return ErrBadAttr
		}
		alen := int(ne.Uint16(attrs))
		if alen < 4 || alen > len(attrs) {
			return ErrBadAttr
		}
		v := attrs[4:alen]
		switch ne.Uint16(attrs[2:]) & nlaTypeMask {
		case attrPacketHdr:
			// struct nfqnl_msg_packet_hdr {__be32 packet_id; __be16 hw_protocol; __u8 hook;} (7 bytes, padded).
			if len(v) < 7 {
				return ErrBadAttr
			}
			p.ID = binary.BigEndian.Uint32(v)
			p.HWProto = binary.BigEndian.Uint16(v[4:])
			p.Hook = v[6]
			seenHdr = true
		case attrMark:
			p.Mark, p.HasMark = be32(v)
		case attrInDev:
			p.InDev, p.HasInDev = be32(v)
		case attrOutDev:
			p.OutDev, p.HasOutDev = be32(v)
		case attrUID:
			p.UID, p.HasUID = be32(v)
		case attrGID:
			p.GID, p.HasGID = be32(v)
		case attrPayload:
			p.Payload = v
		}
		// Attributes are padded to 4 bytes; the last one may end without its padding.
		next := (alen + 3) &^ 3
		if next > len(attrs) {
			next = len(attrs)
		}
		attrs = attrs[next:]
	}
	if !seenHdr {
		return ErrNoPacket
	}
	return nil
}

func be32(v []byte) (uint32, bool) {
	if len(v) < 4 {
		return 0, false
	}
	return binary.BigEndian.Uint32(v), true
}

// BufferSize is enough for any queued packet message with a copy range up to 60 KiB: the kernel sends one
// packet per datagram.
const BufferSize = 64 << 10

// Reader reads queued packets from one queue's socket. It is used by one goroutine.
type Reader struct {
	rc  syscall.RawConn
	buf []byte

	n    int
	err  error
	read func(fd uintptr) bool

	pkt Packet

	// Malformed counts messages that could not be parsed (they carry no packet the reader could name).
	Malformed atomic.Uint64
	// Acks counts netlink error and acknowledgement messages that arrived on the socket.
	Acks atomic.Uint64
}

// NewReader returns a reader on rc, the queue's netlink socket (as the library's connection exposes it).
func NewReader(rc syscall.RawConn) *Reader {
	r := &Reader{rc: rc, buf: make([]byte, BufferSize)}
	r.read = func(fd uintptr) bool {
		r.n, r.err = read(int(fd), r.buf)
		return !errors.Is(r.err, syscall.EAGAIN)
	}
	return r
}

// Next waits for the next datagram and calls fn for every queued packet in it, on the caller's goroutine.
// It returns the socket's error (a deadline, a closed socket, ENOBUFS); the caller decides whether to go on.
func (r *Reader) Next(fn func(*Packet)) error {
	if err := r.rc.Read(r.read); err != nil {
		return err
	}
	if r.err != nil {
		return r.err
	}
	r.dispatch(r.buf[:r.n], fn)
	return nil
}

// dispatch walks the netlink messages of one datagram.
func (r *Reader) dispatch(b []byte, fn func(*Packet)) {
	ne := binary.NativeEndian
	for len(b) >= nlmsgHdrLen {
		n := int(ne.Uint32(b))
		if n < nlmsgHdrLen || n > len(b) {
			r.Malformed.Add(1)
			return
		}
		switch ne.Uint16(b[4:]) {
		case nlmsgNoop, nlmsgDone:
		case nlmsgError:
			r.Acks.Add(1)
		default:
			if err := Parse(b[:n], &r.pkt); err == nil {
				fn(&r.pkt)
			} else if err != ErrNotPacket {
				r.Malformed.Add(1)
			}
		}
		next := (n + 3) &^ 3
		if next > len(b) {
			next = len(b)
		}
		b = b[next:]
	}
	if len(b) > 0 {
		r.Malformed.Add(1) // a tail too short to be a message
	}
}
