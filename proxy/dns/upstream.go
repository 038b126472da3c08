package dns

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"syscall"
	"time"

	mdns "github.com/miekg/dns"
)

// exchanger sends one query to one upstream and returns its reply. It is the seam between the resolver
// logic and the network; tests and the fuzzer replace it.
type exchanger interface {
	exchange(ctx context.Context, q *mdns.Msg, tcp bool) (*mdns.Msg, error)
	String() string
}

// Stream connections are reused for this long after their last query; servers close idle ones soon after
// (RFC 7766 suggests seconds), and a stale connection costs a retry.
const (
	streamIdle    = 10 * time.Second
	streamMaxIdle = 4
)

// netUpstream reaches one configured upstream over the network, as Warden's own traffic (cfg.Control).
type netUpstream struct {
	up      Upstream
	addr    string
	timeout time.Duration
	udp     *mdns.Client
	stream  *mdns.Client // TCP or DNS over TLS

	mu   sync.Mutex
	idle []pooledConn // most recently used last
}

type pooledConn struct {
	c    *mdns.Conn
	used time.Time
}

func newNetUpstream(up Upstream, timeout time.Duration, control func(string, string, syscall.RawConn) error,
	roots *x509.CertPool) *netUpstream {
	dialer := &net.Dialer{Timeout: timeout, Control: control}
	u := &netUpstream{up: up, addr: up.Addr.String(), timeout: timeout}
	u.udp = &mdns.Client{Net: "udp", Dialer: dialer, Timeout: timeout, UDPSize: ednsSize}
	u.stream = &mdns.Client{Net: "tcp", Dialer: dialer, Timeout: timeout}
	if up.Transport == TransportTLS {
		name := up.ServerName
		if name == "" {
			name = up.Addr.Addr().String()
		}
		u.stream.Net = "tcp-tls"
		u.stream.TLSConfig = &tls.Config{ServerName: name, MinVersion: tls.VersionTLS12, RootCAs: roots}
	}
	return u
}

func (u *netUpstream) String() string { return u.up.String() }

func (u *netUpstream) exchange(ctx context.Context, q *mdns.Msg, tcp bool) (*mdns.Msg, error) {
	ctx, cancel := context.WithTimeout(ctx, u.timeout)
	defer cancel()
	if u.up.Transport == TransportUDP && !tcp {
		r, err := u.exchangeUDP(ctx, q)
		if err != nil || !r.Truncated {
			return r, err
		}
		// Truncated: the full answer needs TCP (RFC 7766). The attempt shares the same deadline.
	}
	return u.exchangeStream(ctx, q)
}

func (u *netUpstream) exchangeUDP(ctx context.Context, q *mdns.Msg) (*mdns.Msg, error) {
	co, err := u.udp.DialContext(ctx, u.addr)
	if err != nil {
		return nil, err
	}
	defer co.Close()
	// Close aborts a pending read at once when the server shuts down (the library only honours deadlines).
	stop := context.AfterFunc(ctx, func() { _ = co.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	r, _, err := u.udp.ExchangeWithConnContext(ctx, q, co)
	return r, err
}

func (u *netUpstream) exchangeStream(ctx context.Context, q *mdns.Msg) (*mdns.Msg, error) {
	for range 2 {
		co, reused, err := u.getConn(ctx)
		if err != nil {
			return nil, err
		}
		stop := context.AfterFunc(ctx, func() { _ = co.SetDeadline(time.Unix(1, 0)) })
		r, _, err := u.stream.ExchangeWithConnContext(ctx, q, co)
		stopped := stop()
		if err == nil {
			if stopped {
				u.putConn(co)
			} else {
				co.Close() // the abort may still poison its deadline
			}
			return r, nil
		}
		co.Close()
		// A reused connection may have been closed by the server while idle; try once more on a fresh one
		// unless the deadline is what failed.
		if !reused || ctx.Err() != nil {
			return nil, err
		}
	}
	return nil, errors.New("unreachable")
}

func (u *netUpstream) getConn(ctx context.Context) (*mdns.Conn, bool, error) {
	now := time.Now()
	u.mu.Lock()
	for len(u.idle) > 0 {
		pc := u.idle[len(u.idle)-1]
		u.idle = u.idle[:len(u.idle)-1]
		if now.Sub(pc.used) < streamIdle {
			u.mu.Unlock()
			return pc.c, true, nil
		}
		pc.c.Close()
	}
	u.mu.Unlock()
	co, err := u.stream.DialContext(ctx, u.addr)
	return co, false, err
}

func (u *netUpstream) putConn(co *mdns.Conn) {
	// Deadlines were set for the exchange; clear them so an idle connection is not poisoned.
	_ = co.SetDeadline(time.Time{})
	u.mu.Lock()
	defer u.mu.Unlock()
	if len(u.idle) >= streamMaxIdle {
		co.Close()
		return
	}
	u.idle = append(u.idle, pooledConn{c: co, used: time.Now()})
}

func (u *netUpstream) close() {
	u.mu.Lock()
	defer u.mu.Unlock()
	for _, pc := range u.idle {
		pc.c.Close()
	}
	u.idle = nil
}

// checkReply verifies that r answers q: a response with q's question (names compared without case, since
// some servers do not echo case). The library already matched the ID.
func checkReply(q, r *mdns.Msg) error {
	if !r.Response {
		return errors.New("reply is not a response")
	}
	if len(r.Question) != 1 {
		// Some servers omit the question in error replies; accept those as errors we pass on.
		if len(r.Question) == 0 && r.Rcode != mdns.RcodeSuccess {
			return nil
		}
		return fmt.Errorf("reply has %d questions", len(r.Question))
	}
	a, b := q.Question[0], r.Question[0]
	if a.Qtype != b.Qtype || a.Qclass != b.Qclass || !strings.EqualFold(a.Name, b.Name) {
		return fmt.Errorf("reply is for %s, not %s", b.Name, a.Name)
	}
	return nil
}
