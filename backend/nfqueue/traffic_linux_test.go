package nfqueue

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv4"
	"golang.org/x/net/ipv6"
	"golang.org/x/sys/unix"

	"github.com/warden-fw/warden/backend/netnstest"
)

// tcpServer listens on every address of a namespace and echoes; it counts accepted connections.
type tcpServer struct {
	ln       net.Listener
	accepted atomic.Int64
}

func listenTCP(t *testing.T, ns string, port uint16) *tcpServer {
	t.Helper()
	return listenTCPOn(t, ns, netip.AddrPortFrom(netip.IPv6Unspecified(), port))
}

func listenTCPOn(t *testing.T, ns string, addr netip.AddrPort) *tcpServer {
	t.Helper()
	s := &tcpServer{}
	var err error
	netnstest.InNS(t, ns, func() {
		s.ln, err = net.Listen("tcp", addr.String())
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.ln.Close() })
	go func() {
		for {
			c, err := s.ln.Accept()
			if err != nil {
				return
			}
			s.accepted.Add(1)
			go func() {
				defer c.Close()
				_, _ = io.Copy(c, c)
			}()
		}
	}()
	return s
}

// udpServer echoes datagrams and counts them. It binds each address on its own socket, so replies leave
// from the address the client sent to (a wildcard socket would pick a source by route).
type udpServer struct {
	received atomic.Int64
}

func listenUDP(t *testing.T, ns string, port uint16, addrs ...netip.Addr) *udpServer {
	t.Helper()
	s := &udpServer{}
	for _, a := range addrs {
		var pc net.PacketConn
		var err error
		netnstest.InNS(t, ns, func() {
			pc, err = net.ListenPacket("udp", netip.AddrPortFrom(a, port).String())
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { pc.Close() })
		go func() {
			buf := make([]byte, 2048)
			for {
				n, from, err := pc.ReadFrom(buf)
				if err != nil {
					return
				}
				s.received.Add(1)
				_, _ = pc.WriteTo(buf[:n], from)
			}
		}()
	}
	return s
}

// dial connects from namespace ns with d (a zero Dialer gets the timeout).
func dial(t *testing.T, ns string, d net.Dialer, network string, to netip.AddrPort, timeout time.Duration) (net.Conn, error) {
	t.Helper()
	var c net.Conn
	var err error
	d.Timeout = timeout
	netnstest.InNS(t, ns, func() {
		c, err = d.DialContext(context.Background(), network, to.String())
	})
	if c != nil {
		t.Cleanup(func() { c.Close() })
	}
	return c, err
}

func isRefused(err error) bool {
	return errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.EHOSTUNREACH) ||
		errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EACCES) || errors.Is(err, syscall.EPERM)
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// udpExchange sends one datagram on a connected socket and waits up to wait for the echo.
func udpExchange(t *testing.T, ns string, to netip.AddrPort, wait time.Duration) error {
	t.Helper()
	c, err := dial(t, ns, net.Dialer{}, "udp", to, time.Second)
	if err != nil {
		return err
	}
	if _, err := c.Write([]byte("ping")); err != nil {
		return err
	}
	_ = c.SetReadDeadline(time.Now().Add(wait))
	buf := make([]byte, 16)
	_, err = c.Read(buf)
	return err
}

// ping sends ICMP echo requests from ns to addr over a raw socket and reports whether a reply came within
// wait. ipv4/ipv6 echo packets carry an id the reply must match.
func ping(t *testing.T, ns string, addr netip.Addr, wait time.Duration) bool {
	t.Helper()
	network, proto := "ip4:icmp", 1
	var typ icmp.Type = ipv4.ICMPTypeEcho
	var replyType icmp.Type = ipv4.ICMPTypeEchoReply
	if addr.Is6() {
		network, proto = "ip6:ipv6-icmp", 58
		typ, replyType = ipv6.ICMPTypeEchoRequest, ipv6.ICMPTypeEchoReply
	}
	var c *icmp.PacketConn
	var err error
	netnstest.InNS(t, ns, func() { c, err = icmp.ListenPacket(network, "") })
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	id := int(randUint16(t))
	msg := icmp.Message{Type: typ, Body: &icmp.Echo{ID: id, Seq: 1, Data: []byte("warden")}}
	b, err := msg.Marshal(nil)
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(wait)
	_ = c.SetDeadline(deadline)
	if _, err := c.WriteTo(b, &net.IPAddr{IP: addr.AsSlice()}); err != nil {
		return false
	}
	buf := make([]byte, 1500)
	for time.Now().Before(deadline) {
		n, _, err := c.ReadFrom(buf)
		if err != nil {
			return false
		}
		m, err := icmp.ParseMessage(proto, buf[:n])
		if err != nil || m.Type != replyType {
			continue
		}
		if e, ok := m.Body.(*icmp.Echo); ok && e.ID == id {
			return true
		}
	}
	return false
}

func randUint16(t *testing.T) uint16 {
	var b [2]byte
	if _, err := unix.Getrandom(b[:], 0); err != nil {
		t.Fatal(err)
	}
	return uint16(b[0])<<8 | uint16(b[1])
}
