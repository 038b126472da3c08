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

	"github.com/warden-fw/warden/backend/nfqueue/nlwire"
)

// nfnetlink_queue constants (linux/netfilter/nfnetlink*.h).
const (
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
	m, _, err := nlwire.Next(msg)
	if err != nil {
		*p = Packet{}
		return ErrShort
	}
	return parsePacket(&m, p)
}

// parsePacket is Parse for a message already split off its datagram.
func parsePacket(m *nlwire.Msg, p *Packet) error {
	*p = Packet{}
	if len(m.Payload) < nlwire.NfgenHdrLen {
		return ErrShort
	}
	if m.Type != nfnlSubsysQ<<8|nfqnlMsgPkt {
		return ErrNotPacket
	}
	p.Queue = binary.BigEndian.Uint16(m.Payload[2:])
	seenHdr := false
	for attrs := m.Payload[nlwire.NfgenHdrLen:]; len(attrs) > 0; {
		typ, v, rest, ok := nlwire.NextAttr(attrs)
		if !ok {
			return ErrBadAttr
		}
		switch typ {
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
		attrs = rest
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
		r.n, r.err = nlwire.Read(int(fd), r.buf)
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
	for len(b) > 0 {
		m, rest, err := nlwire.Next(b)
		if err != nil {
			r.Malformed.Add(1) // a bad length, or a tail too short to be a message
			return
		}
		switch m.Type {
		case nlwire.TypeNoop, nlwire.TypeDone:
		case nlwire.TypeError:
			r.Acks.Add(1)
		default:
			if err := parsePacket(&m, &r.pkt); err == nil {
				fn(&r.pkt)
			} else if err != ErrNotPacket {
				r.Malformed.Add(1)
			}
		}
		b = rest
	}
}
