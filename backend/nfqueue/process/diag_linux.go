package process

import (
	"errors"
	"fmt"
	"net/netip"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/warden-fw/warden/backend"
	"github.com/warden-fw/warden/backend/nfqueue/nlwire"
	"github.com/warden-fw/warden/backend/nfqueue/sockdiag"
)

// diagRecvBuf is big enough for any netlink dump part: the kernel sizes dump messages to at most
// SKB_WITH_OVERHEAD(32768) however large the reader's buffer is.
const diagRecvBuf = 32 << 10

// diagTimeout bounds a wait for the kernel's answer; sock_diag answers while handling the request, so hitting it
// means something is badly wrong, and the caller gets an error instead of hanging.
const diagTimeout = 2 * time.Second

// diagConn is one NETLINK_SOCK_DIAG socket with its buffers. It serves one request at a time.
// diagReq is one inet_diag_req_v2.
type diagReq = sockdiag.Request

type diagConn struct {
	fd  int
	seq uint32
	req []byte
	buf []byte
}

func newDiagConn() (*diagConn, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
	if err != nil {
		return nil, fmt.Errorf("opening sock_diag netlink socket: %w", err)
	}
	tv := unix.NsecToTimeval(diagTimeout.Nanoseconds())
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("setting sock_diag receive timeout: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("binding sock_diag netlink socket: %w", err)
	}
	return &diagConn{fd: fd, req: make([]byte, 0, nlwire.HdrLen+sockdiag.RequestLen), buf: make([]byte, diagRecvBuf)}, nil
}

// send writes req and returns its sequence number.
func (c *diagConn) send(req *diagReq) (uint32, error) {
	c.seq++
	c.req = sockdiag.AppendRequest(c.req[:0], c.seq, req)
	if _, err := unix.Write(c.fd, c.req); err != nil {
		return 0, fmt.Errorf("sending sock_diag request: %w", err)
	}
	return c.seq, nil
}

// recv reads one datagram.
func (c *diagConn) recv() ([]byte, error) {
	for {
		n, err := unix.Read(c.fd, c.buf)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("reading sock_diag answer: %w", err)
		}
		return c.buf[:n], nil
	}
}

// errNotFound means the kernel has no socket for the request.
var errNotFound = errors.New("no such socket")

// get asks for one socket by its exact ID. It returns errNotFound when the kernel has none.
func (c *diagConn) get(req *diagReq) (sockInfo, error) {
	seq, err := c.send(req)
	if err != nil {
		return sockInfo{}, err
	}
	for {
		b, err := c.recv()
		if err != nil {
			return sockInfo{}, err
		}
		for len(b) > 0 {
			var m nlwire.Msg
			if m, b, err = nlwire.Next(b); err != nil {
				return sockInfo{}, err
			}
			if m.Seq != seq {
				continue // a late answer to an earlier request that gave up
			}
			switch m.Type {
			case nlwire.TypeError:
				errno, err := nlwire.Errno(m.Payload)
				if err != nil {
					return sockInfo{}, err
				}
				if errno == int32(unix.ENOENT) {
					return sockInfo{}, errNotFound
				}
				return sockInfo{}, fmt.Errorf("sock_diag lookup: %w", syscall.Errno(errno))
			case sockDiagByFamily:
				return parseDiagMsg(m.Payload)
			}
		}
	}
}

// dump asks for every socket matching req and calls fn for each.
func (c *diagConn) dump(req *diagReq, fn func(*sockInfo)) error {
	seq, err := c.send(req)
	if err != nil {
		return err
	}
	for {
		b, err := c.recv()
		if err != nil {
			return err
		}
		for len(b) > 0 {
			var m nlwire.Msg
			if m, b, err = nlwire.Next(b); err != nil {
				return err
			}
			if m.Seq != seq {
				continue
			}
			switch m.Type {
			case nlwire.TypeDone:
				return nil
			case nlwire.TypeError:
				errno, err := nlwire.Errno(m.Payload)
				if err != nil {
					return err
				}
				return fmt.Errorf("sock_diag dump: %w", syscall.Errno(errno))
			case sockDiagByFamily:
				s, err := parseDiagMsg(m.Payload)
				if err != nil {
					return err
				}
				fn(&s)
			}
		}
	}
}

// diagPool shares a few netlink sockets among concurrent lookups. Every socket belongs to the network
// namespace of the thread that opened it, i.e. the daemon's.
type diagPool struct {
	slots []diagSlot
	next  atomic.Uint32
}

// diagSlot holds one socket, opened on first use and again after a transport error.
type diagSlot struct {
	mu     sync.Mutex // guards the fields below; held for a whole request
	c      *diagConn
	closed bool
}

var errClosed = errors.New("process resolver closed")

func newDiagPool() (*diagPool, error) {
	p := &diagPool{slots: make([]diagSlot, min(max(runtime.GOMAXPROCS(0), 1), 4))}
	// Open one now so a missing sock_diag shows up in New, not at the first lookup.
	c, err := newDiagConn()
	if err != nil {
		return nil, err
	}
	p.slots[0].c = c
	return p, nil
}

// acquire returns a locked slot with an open socket: a free one when there is one.
func (p *diagPool) acquire() (*diagSlot, error) {
	start := p.next.Add(1)
	n := uint32(len(p.slots))
	var s *diagSlot
	for i := range n {
		if c := &p.slots[(start+i)%n]; c.mu.TryLock() {
			s = c
			break
		}
	}
	if s == nil {
		s = &p.slots[start%n]
		s.mu.Lock()
	}
	if s.closed {
		s.mu.Unlock()
		return nil, errClosed
	}
	if s.c == nil {
		c, err := newDiagConn()
		if err != nil {
			s.mu.Unlock()
			return nil, err
		}
		s.c = c
	}
	return s, nil
}

// release unlocks s. A transport error may leave an answer unread; a fresh socket next time is simpler than
// resynchronising.
func (s *diagSlot) release(broken bool) {
	if broken {
		unix.Close(s.c.fd)
		s.c = nil
	}
	s.mu.Unlock()
}

func (p *diagPool) close() {
	for i := range p.slots {
		s := &p.slots[i]
		s.mu.Lock()
		if s.c != nil {
			unix.Close(s.c.fd)
			s.c = nil
		}
		s.closed = true
		s.mu.Unlock()
	}
}

// findSocket returns the socket that owns the connection described by the arguments (addresses already
// unmapped, both of one family). It returns errNotFound when there is none, or only one that no process holds
// (TIME_WAIT, orphaned, or a half-open request socket, which the kernel reports with inode 0), except that an
// inbound TCP connection falls back to the listener.
func (p *diagPool) findSocket(proto backend.Protocol, dir backend.Direction, local, remote netip.AddrPort, ifindex int) (sockInfo, error) {
	slot, err := p.acquire()
	if err != nil {
		return sockInfo{}, err
	}
	s, err := findSocketOn(slot.c, proto, dir, local, remote, ifindex)
	slot.release(err != nil && err != errNotFound)
	return s, err
}

func findSocketOn(c *diagConn, proto backend.Protocol, dir backend.Direction, local, remote netip.AddrPort, ifindex int) (sockInfo, error) {
	family := uint8(afInet)
	if local.Addr().Is6() {
		family = afInet6
	}
	req := diagReq{Family: family, States: allStates, Ifindex: uint32(max(ifindex, 0))}
	switch proto {
	case backend.TCP:
		// The kernel looks a TCP request up like an arriving segment (established, then listening sockets),
		// with the socket ID written from the socket's side: src is local.
		req.Protocol = ipprotoTCP
		req.Src, req.Dst = local, remote
	case backend.UDP:
		// UDP's exact lookup hands the ID to the receive-path lookup as (saddr, sport, daddr, dport), i.e.
		// from the packet's side: the remote end goes in src. The receive path also finds unconnected and
		// wildcard-bound sockets, which is what an unconnected UDP socket needs.
		req.Protocol = ipprotoUDP
		req.Src, req.Dst = remote, local
	default:
		return sockInfo{}, errNotFound
	}
	s, err := c.get(&req)
	switch {
	case err == nil && s.inode != 0 && matches(&s, local, remote):
		return s, nil
	case err != nil && err != errNotFound:
		return sockInfo{}, err
	}
	// Fall back to a dump filtered by local port: a UDP socket bound to a device the ifindex did not name, or
	// (inbound TCP) a listener when the exact lookup found a half-open request socket.
	var states uint32
	switch {
	case proto == backend.UDP:
		states = allStates
	case dir == backend.Inbound:
		states = 1 << tcpListen
	default:
		return sockInfo{}, errNotFound
	}
	return dumpBest(c, req.Protocol, states, local, remote)
}

// dumpBest dumps the sockets bound to local's port (IPv4 traffic may also belong to a dual-stack IPv6 socket)
// and returns the one the kernel would deliver remote's packets to: a connected one over an unconnected one,
// an exact local address over a wildcard.
func dumpBest(c *diagConn, protocol uint8, states uint32, local, remote netip.AddrPort) (sockInfo, error) {
	var best sockInfo
	bestScore := -1
	consider := func(s *sockInfo) {
		if s.inode == 0 || !matches(s, local, remote) {
			return
		}
		if local.Addr().Is4() && s.family == afInet6 && s.v6only == 1 {
			return
		}
		score := 0
		if unmap(s.local.Addr()) == local.Addr() {
			score += 1
		}
		if s.remote.Port() != 0 {
			score += 2
		}
		if score > bestScore {
			best, bestScore = *s, score
		}
	}
	families := []uint8{afInet6}
	if local.Addr().Is4() {
		families = []uint8{afInet, afInet6}
	}
	for _, f := range families {
		req := diagReq{Dump: true, Family: f, Protocol: protocol, States: states, Src: netip.AddrPortFrom(netip.Addr{}, local.Port())}
		if err := c.dump(&req, consider); err != nil {
			return sockInfo{}, err
		}
	}
	if bestScore < 0 {
		return sockInfo{}, errNotFound
	}
	return best, nil
}

// matches reports whether socket s can carry the connection local <-> remote: the same local port, the local
// address equal or wildcard, and, when s is connected, the same remote end. Checking the kernel's answer keeps a
// lookup from ever returning the connection's other end (both ends live on this host over loopback).
func matches(s *sockInfo, local, remote netip.AddrPort) bool {
	if s.local.Port() != local.Port() {
		return false
	}
	if la := unmap(s.local.Addr()); !la.IsUnspecified() && la != local.Addr() {
		return false
	}
	if s.remote.Port() == 0 {
		return true // listening or unconnected
	}
	return s.remote.Port() == remote.Port() && unmap(s.remote.Addr()) == remote.Addr()
}

func unmap(a netip.Addr) netip.Addr { return a.Unmap() }
