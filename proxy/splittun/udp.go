package splittun

import (
	"errors"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/warden-fw/warden/backend"
	"github.com/warden-fw/warden/proxy/redirect"
)

// maxDatagram is the largest UDP payload.
const maxDatagram = 64 << 10

type udpListener struct {
	conn  *net.UDPConn
	local netip.AddrPort
	idx   int
}

// udpKey identifies a UDP session by what the proxy sees: the listener and the packet's source. After NAT
// every flow has its own reply tuple, and the reply tuple of a flow redirected to one listener differs only in
// the source, so the source seen on a listener is unique per flow, even when NAT had to give a second flow of
// one client socket another source port. Each session then resolves its own original client and destination.
type udpKey struct {
	ln   int
	from netip.AddrPort
}

type udpSession struct {
	key      udpKey
	ln       *udpListener
	up       *net.UDPConn
	client   netip.AddrPort // original client address (before NAT)
	original netip.AddrPort
	spec     string // the interface spec this session depends on
	ifIndex  int    // 0 when dialled unbound

	last  atomic.Int64 // UnixNano of the last packet either way
	ended sync.Once
}

func (s *udpSession) touch() { s.last.Store(time.Now().UnixNano()) }

func (p *Proxy) readLoop(ln *udpListener) {
	defer p.loops.Done()
	buf := make([]byte, maxDatagram)
	for attempt := 0; ; {
		n, from, err := ln.conn.ReadFromUDPAddrPort(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			attempt++
			time.Sleep(retryDelay(attempt)) // unexpected error; back off rather than spin
			continue
		}
		attempt = 0
		from = unmap(from)
		key := udpKey{ln.idx, from}
		p.udpMu.RLock()
		s := p.udpSess[key]
		p.udpMu.RUnlock()
		if s == nil {
			if s = p.newUDPSession(ln, key); s == nil {
				continue // dropped; counted
			}
		}
		if _, err := s.up.Write(buf[:n]); err != nil {
			continue // ICMP errors and a briefly unreachable path; the client retransmits if it cares
		}
		p.udp.bytesOut.Add(uint64(n))
		s.touch()
	}
}

// resolveUDP maps a flow as the proxy sees it to its original client, destination and table entry.
func (p *Proxy) resolveUDP(ln *udpListener, from netip.AddrPort) (redirect.Entry, bool) {
	client, orig, err := p.plat.OriginalFlow(backend.UDP, from, ln.local)
	switch {
	case err == nil:
		client, orig = unmap(client), unmap(orig)
		if p.isSelf(orig) {
			return redirect.Entry{}, false // sent to the proxy directly: relaying would loop
		}
		e, ok := p.table.LookupFlow(backend.UDP, client, orig)
		if !ok {
			// The flow's kernel state outlived its entry (or its entry was never made). Forget the flow, so its
			// next packet goes through the pipeline again and is recorded afresh.
			if err := p.plat.ForgetUDP(client, orig); err != nil {
				p.log.Debug("split tunnel: forgetting unresolved flow", "err", err)
			}
		}
		return e, ok
	case isUnsupported(err):
		// Without kernel help the newest entry of the client is the best guess; exact unless NAT changed the
		// client's port, which the platform's OriginalFlow exists to see through.
		e, ok := p.table.Lookup(backend.UDP, from)
		if ok && p.isSelf(e.Original) {
			return redirect.Entry{}, false
		}
		return e, ok
	default:
		p.log.Debug("split tunnel: original destination", "client", from, "err", err)
		return redirect.Entry{}, false
	}
}

// newUDPSession creates and registers the session for a new flow, or returns nil (counted) when the flow is
// refused.
func (p *Proxy) newUDPSession(ln *udpListener, key udpKey) *udpSession {
	if !p.udp.tryAcquire(p.cfg.MaxUDPSessions) {
		p.udp.rejected.Add(1)
		return nil
	}
	s := p.dialUDP(ln, key)
	if s == nil {
		p.udp.active.Add(-1)
		return nil
	}
	p.udpMu.Lock()
	p.mu.Lock()
	closed := p.closed
	p.mu.Unlock()
	if closed {
		p.udpMu.Unlock()
		s.up.Close()
		p.udp.active.Add(-1)
		return nil
	}
	p.udpSess[key] = s
	p.sessions.Add(1)
	p.udpMu.Unlock()
	p.udp.total.Add(1)
	go p.replyLoop(s)
	return s
}

func (p *Proxy) dialUDP(ln *udpListener, key udpKey) *udpSession {
	e, ok := p.resolveUDP(ln, key.from)
	if !ok {
		p.udp.unresolved.Add(1)
		return nil
	}
	d, spec, err := p.upstream(&p.udp, &e, true)
	if err != nil {
		if !errors.Is(err, errRefused) {
			p.udp.dialErrs.Add(1)
			p.log.Debug("split tunnel: udp upstream", "client", e.Client, "dst", e.Original, "err", err)
		}
		return nil
	}
	// A connected socket: the kernel passes only the original peer's datagrams, so every reply relayed on
	// this session really comes from the destination the client addressed.
	c, err := d.DialContext(p.ctx, "udp"+family(e.Original), e.Original.String())
	if err != nil {
		p.udp.dialErrs.Add(1)
		p.log.Debug("split tunnel: udp dial", "client", e.Client, "dst", e.Original, "err", err)
		return nil
	}
	s := &udpSession{key: key, ln: ln, up: c.(*net.UDPConn), client: e.Client, original: e.Original, spec: spec}
	if d.LocalAddr != nil { // bound to the interface
		s.ifIndex = p.res.Get(spec).Interface.Index
	}
	s.touch()
	return s
}

// replyLoop relays the destination's datagrams to the client, from the listener the client's packets arrived
// on, and ends the session after UDPIdleTimeout without a packet either way.
func (p *Proxy) replyLoop(s *udpSession) {
	defer p.sessions.Done()
	idle := p.cfg.UDPIdleTimeout
	buf := make([]byte, maxDatagram)
	_ = s.up.SetReadDeadline(time.Now().Add(idle))
	for {
		n, err := s.up.Read(buf)
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				last := time.Unix(0, s.last.Load())
				if time.Since(last) >= idle {
					p.endUDP(s, true)
					return
				}
				_ = s.up.SetReadDeadline(last.Add(idle))
				continue
			}
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue // an ICMP error reported on the connected socket; it does not end the flow
		}
		if _, err := s.ln.conn.WriteToUDPAddrPort(buf[:n], s.key.from); err != nil {
			continue
		}
		p.udp.bytesIn.Add(uint64(n))
		s.touch()
	}
}

// endUDP removes a session, closes its socket and forgets the flow's kernel state.
func (p *Proxy) endUDP(s *udpSession, idle bool) {
	s.ended.Do(func() {
		p.udpMu.Lock()
		if p.udpSess[s.key] == s {
			delete(p.udpSess, s.key)
		}
		p.udpMu.Unlock()
		s.up.Close()
		if err := p.plat.ForgetUDP(s.client, s.original); err != nil {
			p.log.Debug("split tunnel: forgetting flow", "client", s.client, "dst", s.original, "err", err)
		}
		// Counted only once the kernel state is gone, so a counter observer sees the session fully ended.
		p.udp.active.Add(-1)
		if idle {
			p.udp.idle.Add(1)
		}
	})
}
