package splittun

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"runtime"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/warden-fw/warden/backend"
	"github.com/warden-fw/warden/proxy/netif"
	"github.com/warden-fw/warden/proxy/redirect"
)

// fakePlatform listens on loopback port 0 and stands in for the kernel: pipeline, when set, plays the firewall
// pipeline recording an entry as a redirected connection arrives; udpMap plays conntrack.
type fakePlatform struct {
	mu       sync.Mutex
	pipeline func(proto backend.Protocol, from netip.AddrPort)
	udpMap   map[netip.AddrPort][2]netip.AddrPort // seen source → original client, original destination
	forgot   []string
}

func (f *fakePlatform) ListenAddrs(uint16) []netip.AddrPort {
	return []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:0"), netip.MustParseAddrPort("[::1]:0")}
}

func (f *fakePlatform) OriginalTCP(c *net.TCPConn) (netip.AddrPort, error) {
	if pl := f.getPipeline(); pl != nil {
		pl(backend.TCP, unmap(c.RemoteAddr().(*net.TCPAddr).AddrPort()))
	}
	return netip.AddrPort{}, fmt.Errorf("fake: %w", backend.ErrUnsupported)
}

func (f *fakePlatform) OriginalFlow(proto backend.Protocol, from, to netip.AddrPort) (netip.AddrPort, netip.AddrPort, error) {
	if proto != backend.UDP {
		return netip.AddrPort{}, netip.AddrPort{}, fmt.Errorf("fake: %w", backend.ErrUnsupported)
	}
	if pl := f.getPipeline(); pl != nil {
		pl(backend.UDP, from)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if m, ok := f.udpMap[from]; ok {
		return m[0], m[1], nil
	}
	return netip.AddrPort{}, netip.AddrPort{}, fmt.Errorf("fake: %w", backend.ErrUnsupported)
}

func (f *fakePlatform) getPipeline() func(backend.Protocol, netip.AddrPort) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.pipeline
}

func (f *fakePlatform) ForgetUDP(client, original netip.AddrPort) error {
	f.mu.Lock()
	f.forgot = append(f.forgot, client.String()+">"+original.String())
	f.mu.Unlock()
	return nil
}

func (f *fakePlatform) forgotten() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.forgot...)
}

func (f *fakePlatform) UpstreamControl(*netif.Interface) func(string, string, syscall.RawConn) error {
	return nil
}

func (f *fakePlatform) Close() error { return nil }

// loSource is a netif.Source with one loopback-backed link "up0" that tests can take down.
type loSource struct {
	mu   sync.Mutex
	down bool
}

func (s *loSource) Links() ([]netif.Link, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return []netif.Link{{Index: 7, Name: "up0", Up: !s.down, Addrs: []netif.Addr{
		{Prefix: netip.MustParsePrefix("127.0.0.1/8")}, {Prefix: netip.MustParsePrefix("::1/128")}}}}, nil
}

func (s *loSource) DefaultRoutes() ([]netif.Route, error) { return []netif.Route{{LinkIndex: 7}}, nil }

func (s *loSource) setDown(d bool) {
	s.mu.Lock()
	s.down = d
	s.mu.Unlock()
}

type harness struct {
	p     *Proxy
	table *redirect.Table
	plat  *fakePlatform
	src   *loSource
	res   *netif.Resolver
	tcp   []netip.AddrPort // v4, v6
	udp   []netip.AddrPort
}

func newHarness(t testing.TB, cfg Config) *harness {
	t.Helper()
	h := &harness{table: redirect.NewTable(time.Minute, 1024), plat: &fakePlatform{}, src: &loSource{}}
	h.res = netif.NewResolver(h.src, nil)
	if cfg.Interface == "" {
		cfg.Interface = "up0"
	}
	p, err := New(cfg, h.table, Options{Platform: h.plat, Resolver: h.res, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Start(); err != nil {
		t.Fatal(err)
	}
	h.p = p
	h.tcp, h.udp = p.Addrs()
	if len(h.tcp) != 2 || len(h.udp) != 2 {
		t.Fatalf("listeners: tcp %v udp %v", h.tcp, h.udp)
	}
	t.Cleanup(func() { p.Close() })
	return h
}

// dialTCP connects to the proxy's TCP listener i (0: IPv4, 1: IPv6).
func (h *harness) dialTCP(t testing.TB, i int) *net.TCPConn {
	t.Helper()
	c, err := net.DialTCP("tcp", nil, net.TCPAddrFromAddrPort(h.tcp[i]))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// route makes the fake pipeline send every new flow to dst.
func (h *harness) route(dst netip.AddrPort) {
	h.plat.mu.Lock()
	h.plat.pipeline = func(proto backend.Protocol, from netip.AddrPort) {
		h.table.Record(redirect.Entry{Protocol: proto, Client: from, Original: dst})
	}
	h.plat.mu.Unlock()
}

// serveTCP listens on addr and runs handle for every accepted connection in its own goroutine, until the
// test ends. handle owns the connection.
func serveTCP(t testing.TB, network, addr string, handle func(net.Conn)) netip.AddrPort {
	t.Helper()
	ln, err := net.Listen(network, addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go handle(c)
		}
	}()
	return unmap(ln.Addr().(*net.TCPAddr).AddrPort())
}

// echoServer accepts connections, writes greeting, then echoes until EOF and closes.
func echoServer(t testing.TB, network, addr, greeting string) netip.AddrPort {
	t.Helper()
	return serveTCP(t, network, addr, func(c net.Conn) {
		defer c.Close()
		if _, err := io.WriteString(c, greeting); err != nil {
			return
		}
		io.Copy(c, c)
	})
}

// testLogger logs to the test's output when -v is given.
func testLogger(t testing.TB) *slog.Logger {
	if !testing.Verbose() {
		return nil
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// expectRefused connects to addr and expects the proxy to reset the connection (the reset may already
// surface in connect) without sending a byte.
func expectRefused(t testing.TB, addr netip.AddrPort) {
	t.Helper()
	c, err := net.DialTCP("tcp", nil, net.TCPAddrFromAddrPort(addr))
	if err != nil {
		if !errors.Is(err, syscall.ECONNRESET) && !errors.Is(err, syscall.ECONNREFUSED) {
			t.Fatalf("dial: %v; want a reset", err)
		}
		return
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if n, err := c.Read(make([]byte, 16)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read %d bytes, %v; want the connection refused", n, err)
	}
}

func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestTCPRelayHalfClose(t *testing.T) {
	h := newHarness(t, Config{})
	for i, fam := range []string{"tcp4", "tcp6"} {
		t.Run(fam, func(t *testing.T) {
			loop := "127.0.0.1:0"
			if fam == "tcp6" {
				loop = "[::1]:0"
			}
			dst := echoServer(t, fam, loop, "hello|")
			h.route(dst)
			c := h.dialTCP(t, i)
			defer c.Close()
			payload := bytes.Repeat([]byte("0123456789"), 100_000)
			go func() {
				c.Write(payload)
				c.CloseWrite() // the server only closes after our EOF arrives through the proxy
			}()
			c.SetReadDeadline(time.Now().Add(10 * time.Second))
			got, err := io.ReadAll(c)
			if err != nil {
				t.Fatal(err)
			}
			want := append([]byte("hello|"), payload...)
			if !bytes.Equal(got, want) {
				t.Fatalf("got %d bytes, want %d (prefix %q)", len(got), len(want), got[:min(len(got), 16)])
			}
		})
	}
	waitFor(t, "relays to end", func() bool { return h.p.Stats().TCP.Active == 0 })
	st := h.p.Stats().TCP
	if st.Total != 2 || st.BytesOut != 2*1_000_000 || st.BytesIn != 2*1_000_006 {
		t.Fatalf("stats = %+v", st)
	}
}

func TestTCPUnresolvedIsReset(t *testing.T) {
	h := newHarness(t, Config{})
	expectRefused(t, h.tcp[0])
	waitFor(t, "unresolved counted", func() bool { return h.p.Stats().TCP.Unresolved == 1 })
	if st := h.p.Stats().TCP; st.Total != 0 {
		t.Fatalf("stats = %+v", st)
	}
}

func TestTCPLoopRefused(t *testing.T) {
	h := newHarness(t, Config{})
	h.route(h.tcp[0]) // a table entry pointing at the proxy itself
	expectRefused(t, h.tcp[0])
	waitFor(t, "unresolved counted", func() bool { return h.p.Stats().TCP.Unresolved == 1 })
}

func TestTCPSessionBound(t *testing.T) {
	h := newHarness(t, Config{MaxTCPSessions: 2})
	h.route(echoServer(t, "tcp4", "127.0.0.1:0", "hi"))
	var held []*net.TCPConn
	for i := 0; i < 2; i++ {
		c := h.dialTCP(t, 0)
		defer c.Close()
		buf := make([]byte, 2)
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := io.ReadFull(c, buf); err != nil {
			t.Fatalf("held connection %d: %v", i, err)
		}
		held = append(held, c)
	}
	expectRefused(t, h.tcp[0])
	st := h.p.Stats().TCP
	if st.Rejected != 1 || st.Active != 2 {
		t.Fatalf("stats = %+v", st)
	}
	// A slot frees when a held connection ends.
	held[0].Close()
	waitFor(t, "a slot to free", func() bool { return h.p.Stats().TCP.Active == 1 })
	c2 := h.dialTCP(t, 0)
	defer c2.Close()
	c2.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(c2, make([]byte, 2)); err != nil {
		t.Fatalf("connection after a slot freed: %v", err)
	}
}

func TestTCPIdleTimeout(t *testing.T) {
	const idle = 200 * time.Millisecond
	h := newHarness(t, Config{IdleTimeout: idle})
	h.route(echoServer(t, "tcp4", "127.0.0.1:0", "hi"))
	c := h.dialTCP(t, 0)
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, 64)
	if _, err := io.ReadFull(c, buf[:2]); err != nil {
		t.Fatal(err)
	}
	// Keep talking for several idle periods: an active session must survive.
	activeUntil := time.Now().Add(3 * idle)
	last := time.Now()
	for time.Now().Before(activeUntil) {
		if _, err := c.Write([]byte("x")); err != nil {
			t.Fatalf("write while active: %v", err)
		}
		if _, err := io.ReadFull(c, buf[:1]); err != nil {
			t.Fatalf("echo while active: %v", err)
		}
		last = time.Now()
		time.Sleep(idle / 4) // pacing the traffic, not synchronising
	}
	if st := h.p.Stats().TCP; st.IdleExpired != 0 {
		t.Fatalf("active session expired: %+v", st)
	}
	_, err := c.Read(buf) // silence: the proxy must end the session
	if err == nil {
		t.Fatal("read data on an idle session")
	}
	if el := time.Since(last); el < idle || el > 5*time.Second {
		t.Fatalf("idle session ended after %v, want about %v", el, idle)
	}
	waitFor(t, "expiry counted", func() bool { return h.p.Stats().TCP.IdleExpired == 1 })
}

// TestUDPSessionKeying plays NAT giving two flows of one client socket different seen ports: each seen source
// is its own session, resolves to its own original destination, and gets only that peer's replies.
func TestUDPSessionKeying(t *testing.T) {
	h := newHarness(t, Config{})
	peers := make([]netip.AddrPort, 2)
	for i := range peers {
		pc, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { pc.Close() })
		peers[i] = unmap(pc.LocalAddr().(*net.UDPAddr).AddrPort())
		name := fmt.Sprintf("peer%d:", i)
		go func() {
			buf := make([]byte, 1500)
			for {
				n, from, err := pc.ReadFromUDPAddrPort(buf)
				if err != nil {
					return
				}
				pc.WriteToUDPAddrPort(append([]byte(name), buf[:n]...), from)
			}
		}()
	}
	// Two client sockets stand for the two NATed views of one original client socket.
	origClient := netip.MustParseAddrPort("10.9.9.9:5000")
	var clients []*net.UDPConn
	h.plat.mu.Lock()
	h.plat.udpMap = map[netip.AddrPort][2]netip.AddrPort{}
	h.plat.mu.Unlock()
	for i := range peers {
		c, err := net.DialUDP("udp4", nil, net.UDPAddrFromAddrPort(h.udp[0]))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		clients = append(clients, c)
		h.plat.mu.Lock()
		h.plat.udpMap[unmap(c.LocalAddr().(*net.UDPAddr).AddrPort())] = [2]netip.AddrPort{origClient, peers[i]}
		h.plat.mu.Unlock()
		h.table.Record(redirect.Entry{Protocol: backend.UDP, Client: origClient, Original: peers[i]})
	}
	buf := make([]byte, 1500)
	for round := 0; round < 3; round++ {
		for i, c := range clients {
			msg := fmt.Sprintf("r%d-c%d", round, i)
			if _, err := c.Write([]byte(msg)); err != nil {
				t.Fatal(err)
			}
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			n, err := c.Read(buf)
			if err != nil {
				t.Fatalf("round %d client %d: %v", round, i, err)
			}
			if want := fmt.Sprintf("peer%d:%s", i, msg); string(buf[:n]) != want {
				t.Fatalf("round %d client %d got %q, want %q", round, i, buf[:n], want)
			}
		}
	}
	st := h.p.Stats().UDP
	if st.Active != 2 || st.Total != 2 || st.Unresolved != 0 {
		t.Fatalf("stats = %+v", st)
	}
	// The entries stay (Lookup is not destructive) until their TTL.
	if n := h.table.Len(); n != 2 {
		t.Fatalf("table Len = %d, want 2", n)
	}
}

func TestUDPUnresolvedForgetsFlow(t *testing.T) {
	h := newHarness(t, Config{})
	c, err := net.DialUDP("udp4", nil, net.UDPAddrFromAddrPort(h.udp[0]))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	seen := unmap(c.LocalAddr().(*net.UDPAddr).AddrPort())
	orig := netip.MustParseAddrPort("192.0.2.1:53")
	h.plat.mu.Lock()
	h.plat.udpMap = map[netip.AddrPort][2]netip.AddrPort{seen: {seen, orig}}
	h.plat.mu.Unlock()
	c.Write([]byte("q"))
	waitFor(t, "unresolved flow", func() bool { return h.p.Stats().UDP.Unresolved == 1 })
	if d := cmp.Diff([]string{seen.String() + ">" + orig.String()}, h.plat.forgotten()); d != "" {
		t.Fatalf("forgotten flows (-want +got):\n%s", d)
	}
}

func TestUDPIdleAndBound(t *testing.T) {
	h := newHarness(t, Config{MaxUDPSessions: 1, UDPIdleTimeout: 150 * time.Millisecond})
	pc, err := net.ListenUDP("udp6", &net.UDPAddr{IP: net.IPv6loopback})
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	go func() {
		buf := make([]byte, 1500)
		for {
			n, from, err := pc.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			pc.WriteToUDPAddrPort(buf[:n], from)
		}
	}()
	h.route(unmap(pc.LocalAddr().(*net.UDPAddr).AddrPort()))
	c1, _ := net.DialUDP("udp6", nil, net.UDPAddrFromAddrPort(h.udp[1]))
	c2, _ := net.DialUDP("udp6", nil, net.UDPAddrFromAddrPort(h.udp[1]))
	defer c1.Close()
	defer c2.Close()
	buf := make([]byte, 100)
	c1.Write([]byte("one"))
	c1.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := c1.Read(buf); err != nil || string(buf[:n]) != "one" {
		t.Fatalf("first flow: %q, %v", buf[:n], err)
	}
	c2.Write([]byte("two")) // beyond the bound: dropped
	waitFor(t, "second flow rejected", func() bool { return h.p.Stats().UDP.Rejected >= 1 })
	waitFor(t, "idle expiry", func() bool {
		st := h.p.Stats().UDP
		return st.IdleExpired == 1 && st.Active == 0
	})
	if len(h.plat.forgotten()) != 1 {
		t.Fatalf("forgotten = %v, want the expired flow", h.plat.forgotten())
	}
	// With the slot free, the second flow gets through.
	c2.Write([]byte("two"))
	c2.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := c2.Read(buf); err != nil || string(buf[:n]) != "two" {
		t.Fatalf("second flow after expiry: %q, %v", buf[:n], err)
	}
}

func TestInterfaceDown(t *testing.T) {
	for _, mode := range []string{DownBlock, DownDirect} {
		t.Run(mode, func(t *testing.T) {
			h := newHarness(t, Config{OnInterfaceDown: mode})
			h.route(echoServer(t, "tcp4", "127.0.0.1:0", "hi"))
			h.src.setDown(true)
			h.res.Refresh()
			if st := h.p.Stats(); st.Interface.Up || st.Interface.Err == "" {
				t.Fatalf("interface state = %+v", st.Interface)
			}
			if mode == DownBlock {
				expectRefused(t, h.tcp[0])
				waitFor(t, "refusal counted", func() bool { return h.p.Stats().TCP.Refused == 1 })
			} else {
				c := h.dialTCP(t, 0)
				defer c.Close()
				c.SetReadDeadline(time.Now().Add(5 * time.Second))
				if _, err := io.ReadFull(c, make([]byte, 2)); err != nil {
					t.Fatalf("direct: %v", err)
				}
				if st := h.p.Stats().TCP; st.Direct != 1 {
					t.Fatalf("direct: stats %+v", st)
				}
			}
			h.src.setDown(false)
			h.res.Refresh()
			if !h.p.Stats().Interface.Up {
				t.Fatal("interface still down after it came back")
			}
		})
	}
}

func TestShutdownCutsRelaysAndLeaksNothing(t *testing.T) {
	before := runtime.NumGoroutine()
	h := &harness{table: redirect.NewTable(time.Minute, 16), plat: &fakePlatform{}, src: &loSource{}}
	h.res = netif.NewResolver(h.src, nil)
	p, err := New(Config{Interface: "up0", ShutdownTimeout: 100 * time.Millisecond}, h.table,
		Options{Platform: h.plat, Resolver: h.res})
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Start(); err != nil {
		t.Fatal(err)
	}
	h.p = p
	h.tcp, h.udp = p.Addrs()
	srv := echoServer(t, "tcp4", "127.0.0.1:0", "hi")
	h.route(srv)
	c := h.dialTCP(t, 0)
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(c, make([]byte, 2)); err != nil {
		t.Fatal(err)
	}
	u, _ := net.DialUDP("udp4", nil, net.UDPAddrFromAddrPort(h.udp[0]))
	defer u.Close()
	u.Write([]byte("x"))
	waitFor(t, "udp session", func() bool { return p.Stats().UDP.Active == 1 })
	h.table.Record(redirect.Entry{Protocol: backend.TCP, Client: netip.MustParseAddrPort("10.0.0.1:1")})

	start := time.Now()
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	if el := time.Since(start); el > 3*time.Second {
		t.Fatalf("Close took %v", el)
	}
	if _, err := io.ReadFull(c, make([]byte, 1)); err == nil {
		t.Fatal("relay survived Close")
	}
	if n := h.table.Len(); n != 0 {
		t.Fatalf("table holds %d entries after Close", n)
	}
	if st := p.Stats(); st.TCP.Active != 0 || st.UDP.Active != 0 {
		t.Fatalf("active after Close: %+v", st)
	}
	if _, err := net.DialTCP("tcp4", nil, net.TCPAddrFromAddrPort(h.tcp[0])); err == nil {
		t.Fatal("listener still accepting after Close")
	}
	c.Close()
	u.Close()
	waitFor(t, "goroutines to end", func() bool { return runtime.NumGoroutine() <= before+1 }) // +1: echo server
	if err := p.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if err := p.Start(); err == nil {
		t.Fatal("Start after Close succeeded")
	}
}

func TestConfigValidate(t *testing.T) {
	if err := (Config{}).Validate(); err != nil {
		t.Fatalf("zero config: %v", err)
	}
	err := Config{OnInterfaceDown: "maybe", MaxTCPSessions: -1, IdleTimeout: -time.Second}.Validate()
	if err == nil {
		t.Fatal("invalid config accepted")
	}
	for _, key := range []string{"on_interface_down", "max_tcp_sessions", "idle_timeout"} {
		if !bytes.Contains([]byte(err.Error()), []byte(key)) {
			t.Errorf("error %q does not name %s", err, key)
		}
	}
	if _, err := New(Config{}, nil, Options{}); err == nil {
		t.Fatal("New with nil table succeeded")
	}
}
