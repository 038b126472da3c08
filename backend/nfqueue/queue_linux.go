package nfqueue

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync/atomic"
	"syscall"
	"time"

	nfq "github.com/florianl/go-nfqueue/v2"
	"github.com/mdlayher/netlink"
	"github.com/warden-fw/warden/backend"
	"github.com/warden-fw/warden/backend/nfqueue/nfqread"
	"github.com/warden-fw/warden/backend/nfqueue/nfqverdict"
	"golang.org/x/sys/unix"
)

// Netfilter hook numbers (linux/netfilter.h) as the queue reports them.
const (
	hookLocalIn  = 1
	hookLocalOut = 3
)

// queue is one NFQUEUE queue, read by its own goroutine, so queues balanced across CPUs are
// served in parallel.
type queue struct {
	num uint16
	dir backend.Direction
	nf  *nfq.Nfqueue
	e   *engine
	log *slog.Logger

	// verdicts writes the answers on the queue's socket (see nfqverdict: the library's SetVerdict allocates and
	// starts a goroutine per packet).
	verdicts *nfqverdict.Writer

	// reader reads the queue's packets (see nfqread: the library's read loop allocates and makes two system
	// calls per packet); done is closed when its goroutine has ended.
	reader *nfqread.Reader
	done   chan struct{}

	enobufs   atomic.Uint64
	lastErrAt atomic.Int64
}

var _ verdicter = (*queue)(nil)

// verdict answers NF_ACCEPT with the mark the rules enforce, or NF_REPEAT for keepForeignMark.
func (q *queue) verdict(id, mark uint32) error {
	if mark == keepForeignMark {
		return q.verdicts.Repeat(id)
	}
	return q.verdicts.Accept(id, mark)
}

// openQueue binds queue num and starts reading it.
func openQueue(ctx context.Context, num uint16, dir backend.Direction, s *settings, e *engine) (*queue, error) {
	flags := uint32(nfq.NfQaCfgFlagUIDGid | nfq.NfQaCfgFlagGSO)
	if s.cfg.FailOpenOnOverload {
		flags |= nfq.NfQaCfgFlagFailOpen
	}
	// The library opens the socket; binding, reading and verdicts are Warden's (nfqread, nfqverdict).
	nf, err := nfq.Open(&nfq.Config{NfQueue: num, AfFamily: unix.AF_UNSPEC})
	if err != nil {
		return nil, fmt.Errorf("opening queue %d: %w", num, err)
	}
	rc, err := nf.Con.SyscallConn()
	if err != nil {
		nf.Close()
		return nil, fmt.Errorf("queue %d socket: %w", num, err)
	}
	q := &queue{num: num, dir: dir, nf: nf, e: e, log: s.log, verdicts: nfqverdict.NewWriter(rc, unix.AF_UNSPEC, num),
		reader: nfqread.NewReader(rc), done: make(chan struct{})}
	// A full socket buffer must never tear the queue down (an unbound queue is bypassed): ask the kernel not
	// to report ENOBUFS and give it room. The kernel's own drop counters still count overruns.
	if err := nf.SetOption(netlink.NoENOBUFS, true); err != nil {
		nf.Close()
		return nil, fmt.Errorf("setting NETLINK_NO_ENOBUFS on queue %d: %w", num, err)
	}
	if err := setReadBuffer(nf.Con, s.cfg.ReadBuffer); err != nil {
		s.log.Warn("could not enlarge queue socket buffer", "queue", num, "err", err)
	}
	cfg := nfqread.Config{Queue: num, CopyRange: s.cfg.CopyRange, MaxQueueLen: s.cfg.MaxQueueLen, Flags: flags}
	if err := nfqread.Bind(nf.Con, cfg); err != nil {
		nf.Close()
		return nil, fmt.Errorf("binding queue %d: %w", num, err)
	}
	go q.readLoop(ctx)
	go func() {
		// Wake a read blocked in the kernel once we are stopping; close does the same if ctx never ends.
		select {
		case <-ctx.Done():
			_ = nf.Con.SetReadDeadline(time.Now().Add(-time.Second))
		case <-q.done:
		}
	}()
	return q, nil
}

// readLoop reads the queue until onError says stop.
func (q *queue) readLoop(ctx context.Context) {
	defer close(q.done)
	for {
		if err := q.reader.Next(q.hook); err != nil && q.onError(ctx, err) != 0 {
			return
		}
	}
}

// setReadBuffer sets the receive buffer, beyond rmem_max when we may (SO_RCVBUFFORCE needs CAP_NET_ADMIN).
func setReadBuffer(c *netlink.Conn, n int) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return c.SetReadBuffer(n)
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, n)
	}); err != nil {
		return err
	}
	if serr != nil {
		return c.SetReadBuffer(n)
	}
	return nil
}

// hook is called for every queued packet, on the queue's goroutine.
func (q *queue) hook(a *nfqread.Packet) {
	m := meta{id: a.ID, dir: q.dir, uid: backend.Unknown, out: a.Hook == hookLocalOut}
	// The hook tells which way this packet goes; the queue tells which side opened its connection.
	if m.out {
		if a.HasOutDev {
			m.ifIndex = int(a.OutDev)
		}
	} else if a.HasInDev {
		m.ifIndex = int(a.InDev)
	}
	if a.HasUID {
		m.uid = int32(a.UID)
	}
	if a.HasMark {
		m.mark = a.Mark
	}
	q.e.receive(q, &m, a.Payload)
}

// onError decides whether the queue keeps reading after a receive error: it always does, except when we are
// stopping, because a queue that stops reading is bypassed by the kernel.
func (q *queue) onError(ctx context.Context, err error) int {
	if ctx.Err() != nil {
		return 1
	}
	if errors.Is(err, unix.ENOBUFS) {
		q.enobufs.Add(1)
		return 0
	}
	var oe *netlink.OpError
	if errors.As(err, &oe) && (oe.Timeout() || oe.Temporary()) {
		return 0
	}
	if errors.Is(err, os.ErrClosed) || errors.Is(err, syscall.EBADF) {
		return 1
	}
	// Unknown error: log at most once a second and avoid spinning on a persistent one.
	now := time.Now().UnixNano()
	if last := q.lastErrAt.Load(); now-last > int64(time.Second) && q.lastErrAt.CompareAndSwap(last, now) {
		q.log.Error("reading queue", "queue", q.num, "err", err)
	}
	time.Sleep(10 * time.Millisecond)
	return 0
}

// close closes the socket and waits for the reading goroutine to end.
func (q *queue) close() error {
	_ = q.nf.Con.SetReadDeadline(time.Now().Add(-time.Second))
	err := q.nf.Close()
	<-q.done
	return err
}

// queueDrops reads the kernel's per-queue drop counters of the given queues from
// /proc/net/netfilter/nfnetlink_queue, which shows the reading process's network namespace.
func queueDrops(nums map[uint16]bool) (uint64, error) {
	f, err := os.Open("/proc/net/netfilter/nfnetlink_queue")
	if err != nil {
		return 0, err
	}
	defer f.Close()
	return ParseQueueDrops(f, func(n uint16) bool { return nums[n] })
}
