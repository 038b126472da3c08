// Package nfqverdict writes NFQUEUE verdicts on a queue's netlink socket directly. The library's SetVerdict
// builds each message from freshly allocated attributes, arms a write deadline and, inside its socket layer,
// starts a goroutine to watch a context, for every packet; a verdict is a fixed 40-byte message that the
// kernel handles synchronously, so none of that is needed. Opening the socket stays with
// github.com/florianl/go-nfqueue; binding and reading the queue are nfqread's.
package nfqverdict

import (
	"encoding/binary"
	"errors"
	"sync"
	"syscall"

	"github.com/warden-fw/warden/backend/nfqueue/nlwire"
)

// Netlink and nfnetlink_queue constants (linux/netlink.h, linux/netfilter/nfnetlink*.h).
const (
	nfnlSubsysQueue = 3
	nfqnlMsgVerdict = 1
	nlmFRequest     = 1
	nfqaVerdictHdr  = 2
	nfqaMark        = 3
	nfnetlinkV0     = 0

	// NF_ACCEPT and NF_REPEAT (linux/netfilter.h).
	nfAccept = 1
	nfRepeat = 4
)

// MsgSize is the size of a verdict message with a mark; one without is MsgSize-8.
const MsgSize = 16 + 4 + 12 + 8

// Encode writes the verdict message for packet id of queue num into b and returns its length: NF_ACCEPT
// with mark, or, with repeat, NF_REPEAT without one. family is the queue's address family as the queue was
// bound (AF_UNSPEC for a queue taking both).
func Encode(b *[MsgSize]byte, family uint8, queue uint16, id, mark uint32, repeat bool) int {
	n := MsgSize
	verdict := uint32(nfAccept)
	if repeat {
		n, verdict = MsgSize-8, nfRepeat
	}
	ne, be := binary.NativeEndian, binary.BigEndian
	// struct nlmsghdr: length, type, flags, sequence, port id (the kernel's own messages use 0).
	ne.PutUint32(b[0:], uint32(n))
	ne.PutUint16(b[4:], nfnlSubsysQueue<<8|nfqnlMsgVerdict)
	ne.PutUint16(b[6:], nlmFRequest)
	ne.PutUint32(b[8:], 0)
	ne.PutUint32(b[12:], 0)
	// struct nfgenmsg: family, version, resource id (the queue number, big-endian).
	b[16], b[17] = family, nfnetlinkV0
	be.PutUint16(b[18:], queue)
	// NFQA_VERDICT_HDR: struct nfqnl_msg_verdict_hdr {__be32 verdict; __be32 id;}.
	ne.PutUint16(b[20:], 12)
	ne.PutUint16(b[22:], nfqaVerdictHdr)
	be.PutUint32(b[24:], verdict)
	be.PutUint32(b[28:], id)
	if !repeat {
		// NFQA_MARK: __be32.
		ne.PutUint16(b[32:], 8)
		ne.PutUint16(b[34:], nfqaMark)
		be.PutUint32(b[36:], mark)
	}
	return n
}

// Writer sends verdicts for one queue. It is safe for concurrent use and does not allocate per verdict.
type Writer struct {
	rc     syscall.RawConn
	family uint8
	queue  uint16
	ops    sync.Pool
}

// op is one verdict in flight: its buffer and the write callback bound to it once, so a write passes no
// freshly allocated closure to the socket.
type op struct {
	b     [MsgSize]byte
	n     int
	err   error
	write func(fd uintptr) bool
}

// NewWriter returns a writer on rc, the queue's netlink socket (as the library's connection exposes it).
func NewWriter(rc syscall.RawConn, family uint8, queue uint16) *Writer {
	w := &Writer{rc: rc, family: family, queue: queue}
	w.ops.New = func() any {
		o := new(op)
		o.write = func(fd uintptr) bool {
			_, o.err = nlwire.Write(int(fd), o.b[:o.n])
			return !errors.Is(o.err, syscall.EAGAIN)
		}
		return o
	}
	return w
}

// Accept answers NF_ACCEPT with mark.
func (w *Writer) Accept(id, mark uint32) error { return w.send(id, mark, false) }

// Repeat answers NF_REPEAT: the hook runs again with the packet as it is.
func (w *Writer) Repeat(id uint32) error { return w.send(id, 0, true) }

func (w *Writer) send(id, mark uint32, repeat bool) error {
	o := w.ops.Get().(*op)
	o.n = Encode(&o.b, w.family, w.queue, id, mark, repeat)
	o.err = nil
	err := w.rc.Write(o.write)
	if err == nil {
		err = o.err
	}
	w.ops.Put(o)
	return err
}
