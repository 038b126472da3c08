package splittun

import (
	"bytes"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/warden-fw/warden/backend"
	"github.com/warden-fw/warden/proxy/redirect"
	"github.com/warden-fw/warden/proxy/splittun/handoff"
)

func (p *Proxy) acceptLoop(ln *net.TCPListener) {
	defer p.loops.Done()
	for attempt := 0; ; {
		c, err := ln.AcceptTCP()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			attempt++
			p.log.Debug("split tunnel: accept failed", "err", err)
			time.Sleep(retryDelay(attempt)) // back off on EMFILE and the like; no event to wait for
			continue
		}
		attempt = 0
		if !p.tcp.tryAcquire(p.cfg.MaxTCPSessions) {
			p.tcp.rejected.Add(1)
			reset(c)
			continue
		}
		p.mu.Lock()
		if p.closed { // Shutdown may already be waiting on p.sessions
			p.mu.Unlock()
			p.tcp.active.Add(-1)
			reset(c)
			return
		}
		p.sessions.Add(1)
		p.mu.Unlock()
		go p.handleTCP(c)
	}
}

// reset closes c with an RST, so the application sees its connection refused rather than an orderly end.
func reset(c *net.TCPConn) {
	_ = c.SetLinger(0)
	c.Close()
}

// tcpSession is one relayed connection.
type tcpSession struct {
	client, up *net.TCPConn
	idle       time.Duration
	// handed, when set, is the application socket the client connection's writes go straight into (see
	// package handoff); the up→client direction then keeps to window.
	handed *handoff.Client
	window int

	// idleSince holds, per direction (0: client→up, 1: up→client), the UnixNano time since which that direction
	// has moved no byte, or 0 while it is active. A finished (half-closed) direction stays idle.
	idleSince [2]atomic.Int64
	expired   atomic.Bool
	closeOnce sync.Once
	// aborted is closed by abort, for waits that no socket operation would interrupt (clientRoom).
	aborted chan struct{}
}

func (p *Proxy) handleTCP(c *net.TCPConn) {
	defer p.sessions.Done()
	defer p.tcp.active.Add(-1)

	from := unmap(c.RemoteAddr().(*net.TCPAddr).AddrPort())
	e, ok := p.resolveTCP(c, from)
	if !ok {
		p.tcp.unresolved.Add(1)
		reset(c)
		return
	}
	d, _, err := p.upstream(&p.tcp, &e, false)
	if err != nil {
		if !errors.Is(err, errRefused) {
			p.tcp.dialErrs.Add(1)
			p.log.Debug("split tunnel: tcp upstream", "client", from, "dst", e.Original, "err", err)
		}
		reset(c)
		return
	}
	uc, err := d.DialContext(p.ctx, "tcp"+family(e.Original), e.Original.String())
	if err != nil {
		p.tcp.dialErrs.Add(1)
		p.log.Debug("split tunnel: tcp dial", "client", from, "dst", e.Original, "err", err)
		reset(c)
		return
	}
	s := &tcpSession{client: c, up: uc.(*net.TCPConn), idle: p.cfg.IdleTimeout, aborted: make(chan struct{})}
	if p.handoff != nil && e.Client == from {
		// Before the first write to c. With a remapped client port the application socket's tuple is not the
		// one the pipeline expected, so it cannot have been paired.
		hc, err := p.handoff.Attach(c, from, e.Original)
		switch {
		case err == nil:
			s.handed, s.window = hc, p.handoffWindow
			p.tcp.handedOff.Add(1)
		case !errors.Is(err, handoff.ErrNotPaired):
			p.log.Debug("split tunnel: kernel handoff", "client", from, "dst", e.Original, "err", err)
		}
	}
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		if s.handed != nil {
			s.handed.Detach()
		}
		s.abort()
		return
	}
	p.tcpSess[s] = struct{}{}
	p.mu.Unlock()
	p.tcp.total.Add(1)

	p.relay(s)

	p.mu.Lock()
	delete(p.tcpSess, s)
	p.mu.Unlock()
}

// resolveTCP finds the table entry of an accepted connection, confirming its destination with the kernel
// where the platform can.
func (p *Proxy) resolveTCP(c *net.TCPConn, from netip.AddrPort) (redirect.Entry, bool) {
	orig, err := p.plat.OriginalTCP(c)
	switch {
	case err == nil:
		if p.isSelf(orig) {
			// Connected to the proxy directly, not redirected: relaying would loop.
			return redirect.Entry{}, false
		}
		orig = unmap(orig)
		if e, ok := p.table.TakeFlow(backend.TCP, from, orig); ok {
			return e, true
		}
		// The kernel may have given the connection another source port on its way to the proxy: its client
		// port was still in use towards the proxy by an earlier connection to another destination (connect()
		// shares an ephemeral port between destinations). Conntrack knows the port the pipeline saw.
		local := unmap(c.LocalAddr().(*net.TCPAddr).AddrPort())
		client, orig2, err := p.plat.OriginalFlow(backend.TCP, from, local)
		if err != nil || client == from {
			return redirect.Entry{}, false
		}
		e, ok := p.table.TakeFlow(backend.TCP, unmap(client), unmap(orig2))
		if ok {
			p.tcp.remapped.Add(1)
		}
		return e, ok
	case isUnsupported(err):
		e, ok := p.table.Take(backend.TCP, from)
		if ok && p.isSelf(e.Original) {
			return redirect.Entry{}, false
		}
		return e, ok
	default:
		p.log.Debug("split tunnel: original destination", "client", from, "err", err)
		return redirect.Entry{}, false
	}
}

// relay copies both directions until both have ended, then closes both connections.
func (p *Proxy) relay(s *tcpSession) {
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		p.pipe(s, 0, s.up, s.client, &p.tcp.bytesOut)
	}()
	p.pipe(s, 1, s.client, s.up, &p.tcp.bytesIn)
	wg.Wait()
	if s.handed != nil {
		s.handed.Detach()
	}
	s.client.Close()
	s.up.Close()
}

// handoffWindow returns what a handed-off session lets wait, unread, in the application's socket. The kernel
// applies no receive window to handed-off data; without a bound a server could fill kernel memory behind an
// application that stopped reading. The bound is what the application's socket could hold unread without the
// handoff: the kernel's largest TCP receive buffer (tcp_rmem's maximum, 6 MiB by default), and at least
// handoffWindowMin. Measured, a window of 4 MiB where tcp_rmem allowed 32 MiB left the application behind in
// some runs (docs/performance.md, session 11).
func handoffWindow() int {
	if handoffWindowOverride > 0 {
		return handoffWindowOverride
	}
	return max(tcpReceiveMax(), handoffWindowMin)
}

const handoffWindowMin = 4 << 20

// handoffWindowOverride, when positive, replaces handoffWindow's answer (tests).
var handoffWindowOverride int

// parseRmemMax reads the maximum from the text of /proc/sys/net/ipv4/tcp_rmem ("min default max"); 0 if it is
// not three positive numbers.
func parseRmemMax(b []byte) int {
	f := bytes.Fields(b)
	if len(f) != 3 {
		return 0
	}
	n, err := strconv.Atoi(string(f[2]))
	if err != nil || n <= 0 {
		return 0
	}
	return n
}

// handoffPoll bounds how long a session whose application is a full window behind waits before it asks again:
// no event tells the proxy that the application read.
const (
	handoffPollMin = 100 * time.Microsecond
	handoffPollMax = 20 * time.Millisecond
)

// clientRoom returns how many more bytes the application may be sent: the window less what it has not read.
// When that is nothing it waits, at most until deadline (then it returns 0) or until the session is aborted
// (net.ErrClosed), until the application has read
// half the window, so that every round moves at least half a window: resuming at the first byte read would
// make each round a sock_diag request and a tiny splice. While the application reads, the wait is the time
// its measured pace needs to read down to half; while it does not, the wait doubles. An error means the
// application socket is gone or cannot be asked about.
func (s *tcpSession) clientRoom(deadline time.Time, waits *atomic.Uint64) (int64, error) {
	queued, err := s.handed.Queued()
	if err != nil {
		return 0, err
	}
	if queued < s.window {
		return int64(s.window - queued), nil
	}
	waits.Add(1)
	wait, asked := handoffPollMin, time.Now()
	for {
		left := time.Until(deadline)
		if left <= 0 {
			return 0, nil
		}
		t := time.NewTimer(min(wait, left))
		select {
		case <-s.aborted:
			t.Stop()
			return 0, net.ErrClosed
		case <-t.C:
		}
		prev, prevAt := queued, asked
		if queued, err = s.handed.Queued(); err != nil {
			return 0, err
		}
		asked = time.Now()
		if queued <= s.window/2 {
			return int64(s.window - queued), nil
		}
		if read := prev - queued; read > 0 {
			perByte := float64(asked.Sub(prevAt)) / float64(read)
			wait = time.Duration(perByte * float64(queued-s.window/2))
		} else {
			wait *= 2
		}
		wait = min(max(wait, handoffPollMin), handoffPollMax)
	}
}

// pipe copies src to dst. dst.ReadFrom(src) with both *net.TCPConn splices on Linux (no copy through user
// space), also through an io.LimitedReader. The idle timeout cannot watch bytes inside a splice, so the copy
// runs in rounds bounded by a read deadline: a round that moved bytes proves activity; a round that moved none
// proves this direction was idle for the whole round, and when both directions prove idleness for IdleTimeout
// the session expires. A bulk flow's rounds are shorter (see gatherer). Only read deadlines are used: a write
// deadline could interrupt a splice with data already drained from src.
func (p *Proxy) pipe(s *tcpSession, dir int, dst, src *net.TCPConn, moved *atomic.Uint64) {
	round := s.idle / 2
	bounded := dir == 1 && s.handed != nil
	g := newGatherer(src)
	limit := &io.LimitedReader{R: src}
	var room int64 // bounded: what the application may still be sent before the proxy asks again
	for {
		start := time.Now()
		if bounded && room <= 0 {
			var err error
			room, err = s.clientRoom(start.Add(round), &p.tcp.handoffWaits)
			if errors.Is(err, net.ErrClosed) {
				return // the session was ended elsewhere (expiry, shutdown, the other direction)
			}
			if err != nil {
				// The application socket is gone (or sock_diag failed): the session cannot go on safely.
				_ = src.SetLinger(0)
				s.abort()
				return
			}
			if room == 0 {
				// The application read nothing for a whole round: this direction was idle.
				s.markIdle(dir, start)
				if s.bothIdleFor(time.Now()) {
					p.expire(s)
					return
				}
				continue
			}
			start = time.Now()
		}
		var from io.Reader = src
		if g.possible() || bounded {
			limit.N = g.chunk()
			if !g.possible() || bounded && room < limit.N {
				limit.N = room
			}
			from = limit
		}
		_ = src.SetReadDeadline(g.deadline(start, round))
		n, err := dst.ReadFrom(from)
		took := time.Since(start)
		moved.Add(uint64(n))
		if bounded {
			room -= n
		}
		if err == nil && from == limit && limit.N == 0 {
			// The chunk or the window was used up, not an EOF.
			s.idleSince[dir].Store(0)
			if g.filled(took) {
				p.tcp.bulkGathers.Add(1)
			}
			continue
		}
		if err == nil {
			// EOF from src: pass the half-close on and let the other direction finish.
			_ = dst.CloseWrite()
			s.markIdle(dir, time.Now())
			if s.bothIdleFor(time.Now()) {
				p.expire(s)
			}
			return
		}
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			// Reset or closed (possibly by the other direction, expiry or shutdown): end the session, passing a
			// reset on to the side that did not cause it.
			if !s.expired.Load() {
				_ = dst.SetLinger(0)
			}
			s.abort()
			return
		}
		if n > 0 {
			s.idleSince[dir].Store(0)
		}
		if g.gathering() {
			// A gathering read's short deadline: whatever waits below the mark goes with the next splice.
			g.expired(n)
			continue
		}
		if n > 0 {
			continue
		}
		s.markIdle(dir, start)
		if s.bothIdleFor(time.Now()) {
			p.expire(s)
			return
		}
	}
}

// markIdle records that direction dir has been idle since t, unless it already was.
func (s *tcpSession) markIdle(dir int, t time.Time) {
	s.idleSince[dir].CompareAndSwap(0, t.UnixNano())
}

// bothIdleFor reports whether both directions have been idle for the idle timeout at now.
func (s *tcpSession) bothIdleFor(now time.Time) bool {
	limit := now.Add(-s.idle).UnixNano()
	a, b := s.idleSince[0].Load(), s.idleSince[1].Load()
	return a != 0 && b != 0 && a <= limit && b <= limit
}

func (p *Proxy) expire(s *tcpSession) {
	if s.expired.CompareAndSwap(false, true) {
		p.tcp.idle.Add(1)
		s.abort()
	}
}

// abort closes both connections, which ends both pipes.
func (s *tcpSession) abort() {
	s.closeOnce.Do(func() {
		close(s.aborted)
		s.client.Close()
		s.up.Close()
	})
}
