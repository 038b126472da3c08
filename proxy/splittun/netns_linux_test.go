package splittun

// Real-kernel tests. Topology (all namespaces fresh, random suffix, removed in Cleanup):
//
//	client ns C ── ua (10.1.0.2, fd00:a::2; default route, metric 100) ── eth0 of server ns SA "A"
//	            └─ ub (10.2.0.2, fd00:b::2; default route, metric 200) ── eth0 of server ns SB "B"
//
// Both servers own the same service addresses (192.0.2.10/.11, 2001:db8::10/::11) and answer with their name.
// In C, nat OUTPUT DNATs TCP/UDP from source ports 40000-40999 (the "split" clients) to the proxy, except
// packets marked 1709 (the proxy's own upstreams). The proxy runs in a child process inside C (the test
// binary re-executed); the test drives it with JSON lines: record table entries, make client connections,
// read stats.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/warden-fw/warden/backend"
	"github.com/warden-fw/warden/backend/netnstest"
	"github.com/warden-fw/warden/proxy/netif"
	"github.com/warden-fw/warden/proxy/redirect"
	"github.com/warden-fw/warden/proxy/splittun/handoff"
)

const roleEnv = "WARDEN_SPLITTUN_TEST_ROLE"

func TestMain(m *testing.M) {
	switch role := os.Getenv(roleEnv); {
	case strings.HasPrefix(role, "server:"):
		serverMain(strings.TrimPrefix(role, "server:"))
		os.Exit(0)
	case role == "client":
		clientMain()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

var serviceAddrs = []string{"192.0.2.10", "192.0.2.11", "2001:db8::10", "2001:db8::11"}

// serverMain answers TCP on port 80 (its name and a newline, then an echo until EOF) and UDP on port 53
// ("name|local address|payload") on every service address, until stdin closes.
func serverMain(name string) {
	for _, a := range serviceAddrs {
		ip := netip.MustParseAddr(a)
		ln, err := net.ListenTCP("tcp", net.TCPAddrFromAddrPort(netip.AddrPortFrom(ip, 80)))
		if err != nil {
			fmt.Println("error", err)
			return
		}
		go func() {
			for {
				c, err := ln.AcceptTCP()
				if err != nil {
					return
				}
				go func() {
					defer c.Close()
					io.WriteString(c, name+"\n")
					io.Copy(c, c)
				}()
			}
		}()
		// Bound to the service address, so replies leave from it.
		uc, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(ip, 53)))
		if err != nil {
			fmt.Println("error", err)
			return
		}
		go func() {
			buf := make([]byte, 2000)
			for {
				n, from, err := uc.ReadFromUDPAddrPort(buf)
				if err != nil {
					return
				}
				uc.WriteToUDPAddrPort([]byte(name+"|"+ip.String()+"|"+string(buf[:n])), from)
			}
		}()
	}
	fmt.Println("ready")
	io.Copy(io.Discard, os.Stdin)
}

// request and response are the client child's protocol.
type request struct {
	Op       string   `json:"op"`
	Config   Config   `json:"config,omitzero"`
	Proto    string   `json:"proto,omitempty"`
	Client   string   `json:"client,omitempty"`
	Original string   `json:"original,omitempty"`
	Iface    string   `json:"iface,omitempty"`
	Src      string   `json:"src,omitempty"`
	Dst      string   `json:"dst,omitempty"`
	Dsts     []string `json:"dsts,omitempty"`
	Payload  string   `json:"payload,omitempty"`
	ID       int      `json:"id,omitempty"`
	Timeout  int      `json:"timeout_ms,omitempty"`
	Spec     string   `json:"spec,omitempty"`
	// Handoff (start) loads the kernel handoff, with Window as its window when set; Size is a bulk transfer's.
	Handoff bool `json:"handoff,omitempty"`
	Window  int  `json:"window,omitempty"`
	Size    int  `json:"size,omitempty"`
	// Open keeps a bulk transfer's write side open after its payload (no half-close).
	Open bool `json:"open,omitempty"`
}

type udpReply struct {
	From string `json:"from"`
	Data string `json:"data"`
	Err  string `json:"err,omitempty"`
}

type response struct {
	Err     string       `json:"err,omitempty"`
	Data    string       `json:"data,omitempty"`
	Peer    string       `json:"peer,omitempty"`
	ID      int          `json:"id,omitempty"`
	Replies []udpReply   `json:"replies,omitempty"`
	Stats   *Stats       `json:"stats,omitempty"`
	N       int          `json:"n"`
	State   *netif.State `json:"state,omitempty"`
	Elapsed int64        `json:"elapsed_ms"`
	// Equal reports whether a bulk transfer's echo was the server's greeting followed by what was sent.
	Equal bool `json:"equal,omitempty"`
}

// bulkPattern is a bulk transfer's payload: pseudo-random, so a reordered or repeated block cannot match.
func bulkPattern(size, seed int) []byte {
	rng := rand.New(rand.NewPCG(uint64(seed), uint64(size)))
	b := make([]byte, size)
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
	return b
}

// bulk is a transfer in progress: the payload is being written (then the write side closed), the echo not yet
// read.
type bulk struct {
	c    *net.TCPConn
	want []byte
}

// clientMain runs the proxy inside the client namespace and executes the test's requests.
func clientMain() {
	table := redirect.NewTable(time.Minute, 1024)
	var p *Proxy
	var ho *handoff.Handoff
	bulks := map[int]*bulk{}
	held := map[int]*net.TCPConn{}
	nextID := 0
	in := bufio.NewScanner(os.Stdin)
	out := json.NewEncoder(os.Stdout)
	for in.Scan() {
		var req request
		var resp response
		if err := json.Unmarshal(in.Bytes(), &req); err != nil {
			resp.Err = err.Error()
			out.Encode(resp)
			continue
		}
		timeout := time.Duration(req.Timeout) * time.Millisecond
		if timeout == 0 {
			timeout = 5 * time.Second
		}
		switch req.Op {
		case "start":
			var err error
			if req.Handoff {
				if req.Window > 0 {
					handoffWindowOverride = req.Window
				}
				if ho, err = handoff.Load(); err != nil {
					resp.Err = err.Error()
					break
				}
			}
			if p, err = New(req.Config, table, Options{Handoff: ho}); err == nil {
				err = p.Start()
			}
			if err != nil {
				resp.Err = err.Error()
			}
		case "stop":
			start := time.Now()
			err := p.Close()
			resp.Elapsed = time.Since(start).Milliseconds()
			if err != nil {
				resp.Err = err.Error()
			}
			resp.N = table.Len()
		case "record":
			proto := backend.TCP
			if req.Proto == "udp" {
				proto = backend.UDP
			}
			table.Record(redirect.Entry{Protocol: proto, Client: netip.MustParseAddrPort(req.Client),
				Original: netip.MustParseAddrPort(req.Original), Interface: req.Iface})
			if ho != nil && proto == backend.TCP {
				if err := ho.Expect(netip.MustParseAddrPort(req.Client), netip.MustParseAddrPort(req.Original)); err != nil {
					resp.Err = err.Error()
				}
			}
		case "tablelen":
			resp.N = table.Len()
		case "stats":
			st := p.Stats()
			resp.Stats = &st
		case "resolve":
			st := netif.NewResolver(netif.SystemSource(), nil).Get(req.Spec)
			resp.State = &st
		case "tcp", "hold":
			tc, err := dialFrom(req.Src, req.Dst, timeout)
			if err != nil {
				resp.Err = err.Error()
				break
			}
			resp.Peer = tc.RemoteAddr().String()
			tc.SetDeadline(time.Now().Add(timeout))
			if req.Op == "hold" {
				line, err := bufio.NewReader(tc).ReadString('\n') // the greeting only; nothing else is sent yet
				resp.Data = line
				if err != nil {
					resp.Err = err.Error()
					tc.Close()
					break
				}
				tc.SetDeadline(time.Time{})
				nextID++
				held[nextID] = tc
				resp.ID = nextID
				break
			}
			go func() {
				tc.Write([]byte(req.Payload))
				tc.CloseWrite()
			}()
			data, err := io.ReadAll(tc)
			resp.Data = string(data)
			if err != nil {
				resp.Err = err.Error()
			}
			tc.Close()
		case "wait": // wait for a held connection to end
			c := held[req.ID]
			start := time.Now()
			c.SetReadDeadline(start.Add(timeout))
			_, err := c.Read(make([]byte, 1))
			resp.Elapsed = time.Since(start).Milliseconds()
			if err != nil {
				resp.Err = err.Error()
			}
		case "bulk", "bulkhold":
			// Sends Size bytes to the echo server and, for "bulk", reads the echo at once; "bulkhold" leaves it
			// unread until "bulkread".
			tc, err := dialFrom(req.Src, req.Dst, timeout)
			if err != nil {
				resp.Err = err.Error()
				break
			}
			nextID++
			b := &bulk{c: tc, want: append([]byte("B\n"), bulkPattern(req.Size, nextID)...)}
			bulks[nextID] = b
			open := req.Open
			go func() {
				tc.Write(b.want[2:])
				if !open {
					tc.CloseWrite()
				}
			}()
			resp.ID = nextID
			if req.Op == "bulkhold" {
				break
			}
			fallthrough
		case "bulkread":
			id := req.ID
			if req.Op != "bulkread" {
				id = resp.ID
			}
			b := bulks[id]
			delete(bulks, id)
			b.c.SetReadDeadline(time.Now().Add(timeout))
			got, err := io.ReadAll(b.c)
			b.c.Close()
			resp.N, resp.Equal = len(got), bytes.Equal(got, b.want)
			if err != nil {
				resp.Err = err.Error()
			}
		case "bulkabort": // the application goes away without reading: a reset
			b := bulks[req.ID]
			delete(bulks, req.ID)
			b.c.SetLinger(0)
			b.c.Close()
		case "close":
			held[req.ID].Close()
			delete(held, req.ID)
		case "udp":
			c, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.MustParseAddrPort(req.Src)))
			if err != nil {
				resp.Err = err.Error()
				break
			}
			buf := make([]byte, 2000)
			for _, dst := range req.Dsts {
				var r udpReply
				if _, err := c.WriteToUDPAddrPort([]byte(req.Payload+"@"+dst), netip.MustParseAddrPort(dst)); err != nil {
					r.Err = err.Error()
				} else {
					c.SetReadDeadline(time.Now().Add(timeout))
					n, from, err := c.ReadFromUDPAddrPort(buf)
					if err != nil {
						r.Err = err.Error()
					} else {
						r.From, r.Data = from.String(), string(buf[:n])
					}
				}
				resp.Replies = append(resp.Replies, r)
			}
			c.Close()
		default:
			resp.Err = "unknown op " + req.Op
		}
		out.Encode(resp)
	}
	if p != nil {
		p.Close()
	}
	ho.Close()
}

// dialFrom connects from src to dst. SO_REUSEADDR lets two connections to different destinations share a fixed
// source port, as connect() lets them share an ephemeral one.
func dialFrom(src, dst string, timeout time.Duration) (*net.TCPConn, error) {
	d := net.Dialer{LocalAddr: net.TCPAddrFromAddrPort(netip.MustParseAddrPort(src)), Timeout: timeout,
		Control: func(_, _ string, rc syscall.RawConn) error {
			var serr error
			if err := rc.Control(func(fd uintptr) {
				serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_REUSEADDR, 1)
			}); err != nil {
				return err
			}
			return serr
		}}
	c, err := d.Dial("tcp", dst)
	if err != nil {
		return nil, err
	}
	return c.(*net.TCPConn), nil
}

// --- the driving side ---

type topology struct {
	c, a, b string // namespace names
}

func newTopology(t *testing.T) *topology {
	t.Helper()
	sfx := netnstest.Suffix()
	tp := &topology{c: "wst-c-" + sfx, a: "wst-a-" + sfx, b: "wst-b-" + sfx}
	for _, ns := range []string{tp.c, tp.a, tp.b} {
		netnstest.NewNS(t, ns)
	}
	for _, s := range []struct{ dev, ns, net4, net6 string }{{"ua", tp.a, "10.1.0", "fd00:a:"}, {"ub", tp.b, "10.2.0", "fd00:b:"}} {
		netnstest.Veth(t, tp.c, s.dev, s.ns, "eth0")
		netnstest.Run(t, "ip", "-n", tp.c, "addr", "add", s.net4+".2/24", "dev", s.dev)
		netnstest.Run(t, "ip", "-n", tp.c, "addr", "add", s.net6+":2/64", "dev", s.dev, "nodad")
		netnstest.Run(t, "ip", "-n", tp.c, "link", "set", s.dev, "up")
		netnstest.Run(t, "ip", "-n", s.ns, "addr", "add", s.net4+".1/24", "dev", "eth0")
		netnstest.Run(t, "ip", "-n", s.ns, "addr", "add", s.net6+":1/64", "dev", "eth0", "nodad")
		netnstest.Run(t, "ip", "-n", s.ns, "link", "set", "eth0", "up")
		for _, a := range serviceAddrs {
			bits := "/32"
			if strings.Contains(a, ":") {
				bits = "/128"
			}
			netnstest.Run(t, "ip", "-n", s.ns, "addr", "add", a+bits, "dev", "lo")
		}
	}
	tp.addRoutes(t)
	for _, ipt := range []struct{ cmd, to string }{{"iptables", "127.0.0.17:719"}, {"ip6tables", "[::1]:719"}} {
		for _, proto := range []string{"tcp", "udp"} {
			netnstest.Run(t, "ip", "netns", "exec", tp.c, ipt.cmd, "-t", "nat", "-A", "OUTPUT", "-p", proto,
				"-m", "mark", "!", "--mark", "1709", "-m", proto, "--sport", "40000:40999",
				"-j", "DNAT", "--to-destination", ipt.to)
		}
	}
	return tp
}

// addRoutes (re)installs C's default routes; the kernel drops a link's routes when it goes down, and after it
// comes back up IPv6 needs a moment before its gateway is reachable again, so each route is retried (bounded).
func (tp *topology) addRoutes(t *testing.T) {
	t.Helper()
	for _, r := range []struct{ dev, gw4, gw6, metric string }{{"ua", "10.1.0.1", "fd00:a::1", "100"}, {"ub", "10.2.0.1", "fd00:b::1", "200"}} {
		for _, args := range [][]string{
			{"ip", "-n", tp.c, "route", "replace", "default", "via", r.gw4, "dev", r.dev, "metric", r.metric},
			{"ip", "-n", tp.c, "-6", "route", "replace", "default", "via", r.gw6, "dev", r.dev, "metric", r.metric},
		} {
			deadline := time.Now().Add(5 * time.Second)
			for {
				out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
				if err == nil {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
				}
				time.Sleep(50 * time.Millisecond)
			}
		}
	}
}

// linkUp brings a client link back up with its IPv6 address (the kernel flushes IPv6 addresses on down) and
// the default routes.
func (tp *topology) linkUp(t *testing.T, dev, addr6 string) {
	t.Helper()
	netnstest.Run(t, "ip", "-n", tp.c, "link", "set", dev, "up")
	netnstest.Run(t, "ip", "-n", tp.c, "addr", "replace", addr6, "dev", dev, "nodad")
	tp.addRoutes(t)
}

// child is a re-executed test binary inside a namespace.
type child struct {
	t     *testing.T
	stdin io.WriteCloser
	out   *bufio.Scanner
	mu    sync.Mutex
}

func startChild(t *testing.T, ns, role string) *child {
	t.Helper()
	cmd := netnstest.Child(context.Background(), t, ns, roleEnv+"="+role)
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		stdin.Close()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-done
		}
	})
	ch := &child{t: t, stdin: stdin, out: bufio.NewScanner(stdout)}
	ch.out.Buffer(make([]byte, 1<<20), 1<<20)
	return ch
}

// line reads one line from the child, failing the test after a bound.
func (ch *child) line() string {
	got := make(chan string, 1)
	go func() {
		if ch.out.Scan() {
			got <- ch.out.Text()
		} else {
			got <- ""
		}
	}()
	select {
	case l := <-got:
		if l == "" {
			ch.t.Fatal("child exited")
		}
		return l
	case <-time.After(30 * time.Second):
		ch.t.Fatal("child did not answer within 30s")
		return ""
	}
}

func (ch *child) call(req request) response {
	ch.t.Helper()
	ch.mu.Lock()
	defer ch.mu.Unlock()
	b, _ := json.Marshal(req)
	if _, err := ch.stdin.Write(append(b, '\n')); err != nil {
		ch.t.Fatal(err)
	}
	var resp response
	if err := json.Unmarshal([]byte(ch.line()), &resp); err != nil {
		ch.t.Fatal(err)
	}
	return resp
}

func (ch *child) mustCall(req request) response {
	ch.t.Helper()
	r := ch.call(req)
	if r.Err != "" {
		ch.t.Fatalf("%s: %s", req.Op, r.Err)
	}
	return r
}

func (ch *child) stats() Stats { return *ch.mustCall(request{Op: "stats"}).Stats }

// waitStats polls the child's stats until cond holds, bounded.
func (ch *child) waitStats(what string, cond func(Stats) bool) Stats {
	ch.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		st := ch.stats()
		if cond(st) {
			return st
		}
		if time.Now().After(deadline) {
			ch.t.Fatalf("timed out waiting for %s; stats %+v", what, st)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

var portSeq atomic.Uint32

// splitPort and plainPort hand out fresh client ports inside and outside the DNAT range.
func splitPort() uint16 { return uint16(40000 + portSeq.Add(1)) }
func plainPort() uint16 { return uint16(41000 + portSeq.Add(1)) }

func hostPort(ip string, port uint16) string {
	return netip.AddrPortFrom(netip.MustParseAddr(ip), port).String()
}

type env struct {
	tp     *topology
	client *child
}

func newEnv(t *testing.T) *env {
	netnstest.RequireRoot(t, "iptables")
	tp := newTopology(t)
	for _, s := range []struct{ ns, name string }{{tp.a, "A"}, {tp.b, "B"}} {
		ch := startChild(t, s.ns, "server:"+s.name)
		if l := ch.line(); l != "ready" {
			t.Fatalf("server %s: %s", s.name, l)
		}
	}
	return &env{tp: tp, client: startChild(t, tp.c, "client")}
}

func (e *env) start(cfg Config) {
	e.client.mustCall(request{Op: "start", Config: cfg})
}

// tcp makes one split (recorded, via iface) or plain TCP connection and returns what the server said first.
func (e *env) tcp(src, dst, iface string, split bool) response {
	if split {
		e.client.mustCall(request{Op: "record", Proto: "tcp", Client: src, Original: dst, Iface: iface})
	}
	return e.client.call(request{Op: "tcp", Src: src, Dst: dst, Payload: "ping"})
}

func expectServer(t *testing.T, r response, name string) {
	t.Helper()
	if r.Err != "" || r.Data != name+"\nping" {
		t.Fatalf("got %q (err %q), want server %s with the echo", r.Data, r.Err, name)
	}
}

func expectNoServer(t *testing.T, r response) {
	t.Helper()
	if r.Data != "" {
		t.Fatalf("got %q; want the connection refused", r.Data)
	}
}

func TestNamespaceSplitTunnel(t *testing.T) {
	e := newEnv(t)
	c := e.client
	e.start(Config{Interface: "ub", UDPIdleTimeout: 400 * time.Millisecond})

	for _, fam := range []struct{ name, src, dst, dst2 string }{
		{"v4", "10.1.0.2", "192.0.2.10", "192.0.2.11"},
		{"v6", "fd00:a::2", "2001:db8::10", "2001:db8::11"},
	} {
		t.Run("tcp-"+fam.name, func(t *testing.T) {
			dst := hostPort(fam.dst, 80)
			expectServer(t, e.tcp(hostPort(fam.src, plainPort()), dst, "", false), "A")
			r := e.tcp(hostPort(fam.src, splitPort()), dst, "", true)
			expectServer(t, r, "B")
			if r.Peer != dst {
				t.Fatalf("client's peer %s, want %s", r.Peer, dst)
			}
			// A table entry naming another interface wins over the default.
			expectServer(t, e.tcp(hostPort(fam.src, splitPort()), dst, "ua", true), "A")
		})
		t.Run("tcp-shared-port-"+fam.name, func(t *testing.T) {
			// Two split connections from one client port to different destinations at once: towards the
			// proxy they would be the same connection, so the kernel gives the second another source port
			// (a real case: connect() shares ephemeral ports between destinations). Conntrack finds its entry.
			src := hostPort(fam.src, splitPort())
			d1, d2 := hostPort(fam.dst, 80), hostPort(fam.dst2, 80)
			c.mustCall(request{Op: "record", Proto: "tcp", Client: src, Original: d1})
			h := c.mustCall(request{Op: "hold", Src: src, Dst: d1})
			if h.Data != "B\n" {
				t.Fatalf("first connection's greeting %q, want B", h.Data)
			}
			t.Cleanup(func() { c.call(request{Op: "close", ID: h.ID}) })
			before := c.stats().TCP
			r := e.tcp(src, d2, "", true)
			expectServer(t, r, "B")
			if r.Peer != d2 {
				t.Fatalf("client's peer %s, want %s", r.Peer, d2)
			}
			after := c.stats().TCP
			if after.Remapped != before.Remapped+1 || after.Unresolved != before.Unresolved {
				t.Fatalf("remapped %d -> %d, unresolved %d -> %d; want one remapped and none unresolved",
					before.Remapped, after.Remapped, before.Unresolved, after.Unresolved)
			}
		})
		t.Run("udp-"+fam.name, func(t *testing.T) {
			d1, d2 := hostPort(fam.dst, 53), hostPort(fam.dst2, 53)
			src := hostPort(fam.src, splitPort())
			c.mustCall(request{Op: "record", Proto: "udp", Client: src, Original: d1})
			c.mustCall(request{Op: "record", Proto: "udp", Client: src, Original: d2})
			before := c.stats().UDP
			// One socket, two peers, twice over: each reply from the right peer, via B, sessions reused.
			for round := 0; round < 2; round++ {
				r := c.mustCall(request{Op: "udp", Src: src, Dsts: []string{d1, d2}, Payload: fmt.Sprint(round)})
				for i, d := range []string{d1, d2} {
					got := r.Replies[i]
					want := "B|" + netip.MustParseAddrPort(d).Addr().String() + "|" + fmt.Sprint(round) + "@" + d
					if got.Err != "" || got.From != d || got.Data != want {
						t.Fatalf("round %d peer %s: got %+v, want from %s data %q", round, d, got, d, want)
					}
				}
			}
			after := c.stats().UDP
			if after.Total-before.Total != 2 {
				t.Fatalf("sessions created %d, want 2 (one per peer)", after.Total-before.Total)
			}
			// The same socket outside the split range reaches A.
			r := c.mustCall(request{Op: "udp", Src: hostPort(fam.src, plainPort()), Dsts: []string{d1}, Payload: "p"})
			if !strings.HasPrefix(r.Replies[0].Data, "A|") || r.Replies[0].From != d1 {
				t.Fatalf("plain udp: %+v", r.Replies[0])
			}
		})
	}

	for _, fam := range []struct{ name, src, dst string }{
		{"v4", "10.1.0.2", "192.0.2.10:53"},
		{"v6", "fd00:a::2", "[2001:db8::10]:53"},
	} {
		t.Run("udp-idle-forgets-conntrack-"+fam.name, func(t *testing.T) {
			src := hostPort(fam.src, splitPort())
			c.mustCall(request{Op: "record", Proto: "udp", Client: src, Original: fam.dst})
			before := c.stats().UDP.IdleExpired
			r := c.mustCall(request{Op: "udp", Src: src, Dsts: []string{fam.dst}, Payload: "x"})
			if !strings.HasPrefix(r.Replies[0].Data, "B|") {
				t.Fatalf("reply %+v", r.Replies[0])
			}
			sport := netip.MustParseAddrPort(src).Port()
			list := func() string {
				args := []string{"ip", "netns", "exec", e.tp.c, "conntrack", "-L", "-p", "udp", "--sport", fmt.Sprint(sport)}
				if fam.name == "v6" {
					args = append(args, "-f", "ipv6")
				}
				return netnstest.Run(t, args...)
			}
			if ct := list(); !strings.Contains(ct, "dport=53") {
				t.Fatalf("no conntrack entry for the live flow:\n%s", ct)
			}
			// Other subtests' sessions expire meanwhile too, so the counter alone does not say this one has:
			// wait (bounded) for this flow's conntrack entry to go, then check the counter moved.
			deadline := time.Now().Add(5 * time.Second)
			ct := list()
			for strings.Contains(ct, "dport=53") && time.Now().Before(deadline) {
				time.Sleep(50 * time.Millisecond)
				ct = list()
			}
			if strings.Contains(ct, "dport=53") {
				t.Fatalf("conntrack entry of the expired flow remains after 5s (idle timeout 400ms):\n%s", ct)
			}
			if got := c.stats().UDP.IdleExpired; got <= before {
				t.Fatalf("idle expiries %d, want more than %d", got, before)
			}
		})
	}

	t.Run("unrecorded-is-refused", func(t *testing.T) {
		before := c.stats().TCP.Unresolved
		expectNoServer(t, c.call(request{Op: "tcp", Src: hostPort("10.1.0.2", splitPort()), Dst: "192.0.2.10:80", Payload: "ping"}))
		if got := c.stats().TCP.Unresolved; got != before+1 {
			t.Fatalf("unresolved %d, want %d", got, before+1)
		}
	})

	t.Run("restart-purges", func(t *testing.T) {
		src := hostPort("10.1.0.2", splitPort())
		c.mustCall(request{Op: "record", Proto: "tcp", Client: src, Original: "192.0.2.10:80"})
		c.mustCall(request{Op: "record", Proto: "udp", Client: src, Original: "192.0.2.10:53"})
		if n := c.mustCall(request{Op: "stop"}).N; n != 0 {
			t.Fatalf("table holds %d entries after stop", n)
		}
		c.mustCall(request{Op: "record", Proto: "tcp", Client: src, Original: "192.0.2.10:80"}) // stale, before start
		e.start(Config{Interface: "ub"})
		if n := c.mustCall(request{Op: "tablelen"}).N; n != 0 {
			t.Fatalf("table holds %d entries after restart", n)
		}
		expectNoServer(t, c.call(request{Op: "tcp", Src: src, Dst: "192.0.2.10:80", Payload: "ping"}))
		if st := c.stats().TCP; st.Unresolved != 1 || st.Total != 0 {
			t.Fatalf("after restart: %+v", st)
		}
		expectServer(t, e.tcp(hostPort("10.1.0.2", splitPort()), "192.0.2.10:80", "", true), "B")
	})

	t.Run("tcp-bound-and-idle", func(t *testing.T) {
		c.mustCall(request{Op: "stop"})
		e.start(Config{Interface: "ub", MaxTCPSessions: 1, IdleTimeout: 300 * time.Millisecond})
		src := hostPort("10.1.0.2", splitPort())
		c.mustCall(request{Op: "record", Proto: "tcp", Client: src, Original: "192.0.2.10:80"})
		h := c.mustCall(request{Op: "hold", Src: src, Dst: "192.0.2.10:80"})
		if h.Data != "B\n" {
			t.Fatalf("held connection greeting %q", h.Data)
		}
		expectNoServer(t, e.tcp(hostPort("10.1.0.2", splitPort()), "192.0.2.10:80", "", true))
		if st := c.stats().TCP; st.Rejected != 1 || st.Active != 1 {
			t.Fatalf("bound: %+v", st)
		}
		w := c.call(request{Op: "wait", ID: h.ID, Timeout: 5000})
		if w.Err == "" || strings.Contains(w.Err, "timeout") {
			t.Fatalf("idle held connection: %+v", w)
		}
		c.waitStats("tcp idle expiry", func(st Stats) bool { return st.TCP.IdleExpired == 1 && st.TCP.Active == 0 })
		c.mustCall(request{Op: "close", ID: h.ID})
	})

	t.Run("interface-down-block", func(t *testing.T) {
		c.mustCall(request{Op: "stop"})
		e.start(Config{Interface: "ub", OnInterfaceDown: DownBlock, InterfacePoll: time.Minute})
		expectServer(t, e.tcp(hostPort("10.1.0.2", splitPort()), "192.0.2.10:80", "", true), "B")
		netnstest.Run(t, "ip", "-n", e.tp.c, "link", "set", "ub", "down")
		c.waitStats("interface down", func(st Stats) bool { return !st.Interface.Up })
		expectNoServer(t, e.tcp(hostPort("10.1.0.2", splitPort()), "192.0.2.10:80", "", true))
		src := hostPort("10.1.0.2", splitPort())
		c.mustCall(request{Op: "record", Proto: "udp", Client: src, Original: "192.0.2.10:53"})
		r := c.mustCall(request{Op: "udp", Src: src, Dsts: []string{"192.0.2.10:53"}, Timeout: 500})
		if r.Replies[0].Data != "" {
			t.Fatalf("udp through a down interface in block mode got %+v", r.Replies[0])
		}
		if st := c.stats(); st.TCP.Refused != 1 || st.UDP.Refused == 0 {
			t.Fatalf("refusals not counted: tcp %+v udp %+v", st.TCP, st.UDP)
		}
		e.tp.linkUp(t, "ub", "fd00:b::2/64")
		c.waitStats("interface up", func(st Stats) bool { return st.Interface.Up })
		expectServer(t, e.tcp(hostPort("10.1.0.2", splitPort()), "192.0.2.10:80", "", true), "B")
	})

	t.Run("interface-down-direct", func(t *testing.T) {
		c.mustCall(request{Op: "stop"})
		e.start(Config{Interface: "ub", OnInterfaceDown: DownDirect, InterfacePoll: time.Minute})
		netnstest.Run(t, "ip", "-n", e.tp.c, "link", "set", "ub", "down")
		t.Cleanup(func() {
			exec.Command("ip", "-n", e.tp.c, "link", "set", "ub", "up").Run()
		})
		c.waitStats("interface down", func(st Stats) bool { return !st.Interface.Up })
		// Unbound but still marked 1709: not redirected again (no loop), out through A.
		expectServer(t, e.tcp(hostPort("10.1.0.2", splitPort()), "192.0.2.10:80", "", true), "A")
		expectServer(t, e.tcp(hostPort("fd00:a::2", splitPort()), "[2001:db8::10]:80", "", true), "A")
		src := hostPort("10.1.0.2", splitPort())
		c.mustCall(request{Op: "record", Proto: "udp", Client: src, Original: "192.0.2.11:53"})
		r := c.mustCall(request{Op: "udp", Src: src, Dsts: []string{"192.0.2.11:53"}, Payload: "d"})
		if got := r.Replies[0]; got.From != "192.0.2.11:53" || !strings.HasPrefix(got.Data, "A|192.0.2.11|") {
			t.Fatalf("direct udp: %+v", got)
		}
		if st := c.stats(); st.TCP.Direct != 2 || st.UDP.Direct != 1 {
			t.Fatalf("direct not counted: tcp %+v udp %+v", st.TCP, st.UDP)
		}
	})
}

func TestNamespaceResolveAuto(t *testing.T) {
	e := newEnv(t)
	c := e.client
	resolve := func(spec string) netif.State { return *c.mustCall(request{Op: "resolve", Spec: spec}).State }
	if st := resolve("auto"); !st.Up || st.Interface.Name != "ua" ||
		st.Interface.V4 != netip.MustParseAddr("10.1.0.2") || st.Interface.V6 != netip.MustParseAddr("fd00:a::2") {
		t.Fatalf("auto = %+v", st)
	}
	// A tunnel holding a better default route is skipped.
	netnstest.Run(t, "ip", "-n", e.tp.c, "tuntap", "add", "dev", "office", "mode", "tun")
	netnstest.Run(t, "ip", "-n", e.tp.c, "addr", "add", "10.99.0.2/24", "dev", "office")
	netnstest.Run(t, "ip", "-n", e.tp.c, "link", "set", "office", "up")
	netnstest.Run(t, "ip", "-n", e.tp.c, "route", "add", "default", "dev", "office", "metric", "10")
	if st := resolve("auto"); st.Interface.Name != "ua" {
		t.Fatalf("auto with a tun default route = %+v", st)
	}
	if st := resolve("10.2.0.2"); st.Interface.Name != "ub" {
		t.Fatalf("by IP = %+v", st)
	}
	mac := strings.TrimSpace(netnstest.Run(t, "ip", "netns", "exec", e.tp.c, "cat", "/sys/class/net/ub/address"))
	if st := resolve(mac); st.Interface.Name != "ub" {
		t.Fatalf("by MAC %s = %+v", mac, st)
	}
	// The best physical default route gone: auto moves to ub.
	netnstest.Run(t, "ip", "-n", e.tp.c, "link", "set", "ua", "down")
	if st := resolve("auto"); st.Interface.Name != "ub" {
		t.Fatalf("auto with ua down = %+v", st)
	}
	if st := resolve("ua"); st.Up || st.Err == "" {
		t.Fatalf("ua down = %+v", st)
	}
}

// TestNamespaceKernelHandoff relays through the proxy with the kernel handoff: downloads arrive whole and in
// order (the echo of a pseudo-random upload), for IPv4 and IPv6; and an application that stops reading holds at
// most one window, after which everything still arrives.
func TestNamespaceKernelHandoff(t *testing.T) {
	e := newEnv(t)
	c := e.client
	const window = 1 << 20
	if r := c.call(request{Op: "start", Config: Config{Interface: "ub", Mode: ModeProxy}, Handoff: true, Window: window}); r.Err != "" {
		t.Fatalf("starting the proxy with the kernel handoff: %s", r.Err)
	}
	for _, fam := range []struct{ name, src, dst string }{
		{"v4", "10.1.0.2", "192.0.2.10"},
		{"v6", "fd00:a::2", "2001:db8::10"},
	} {
		t.Run("echo-"+fam.name, func(t *testing.T) {
			src, dst := hostPort(fam.src, splitPort()), hostPort(fam.dst, 80)
			c.mustCall(request{Op: "record", Proto: "tcp", Client: src, Original: dst})
			before := c.stats().TCP
			const size = 24 << 20
			r := c.call(request{Op: "bulk", Src: src, Dst: dst, Size: size, Timeout: 60_000})
			if r.Err != "" || !r.Equal || r.N != size+2 {
				t.Fatalf("echo of %d bytes: got %d bytes, equal %v, err %q", size, r.N, r.Equal, r.Err)
			}
			if after := c.stats().TCP; after.HandedOff != before.HandedOff+1 {
				t.Fatalf("handed off %d -> %d, want one more", before.HandedOff, after.HandedOff)
			}
		})
	}
	t.Run("window", func(t *testing.T) {
		src, dst := hostPort("10.1.0.2", splitPort()), hostPort("192.0.2.10", 80)
		c.mustCall(request{Op: "record", Proto: "tcp", Client: src, Original: dst})
		before := c.stats().TCP
		const size = 8 * window
		h := c.mustCall(request{Op: "bulkhold", Src: src, Dst: dst, Size: size})
		st := c.waitStats("the download waiting for the application", func(s Stats) bool {
			return s.TCP.HandoffWaits > before.HandoffWaits
		}).TCP
		if st.HandedOff != before.HandedOff+1 {
			t.Fatalf("handed off %d -> %d, want one more", before.HandedOff, st.HandedOff)
		}
		if moved := st.BytesIn - before.BytesIn; moved > window {
			t.Fatalf("%d bytes relayed to an application that read nothing; the window is %d", moved, window)
		}
		r := c.call(request{Op: "bulkread", ID: h.ID, Timeout: 60_000})
		if r.Err != "" || !r.Equal || r.N != size+2 {
			t.Fatalf("after the wait: got %d bytes, equal %v, err %q", r.N, r.Equal, r.Err)
		}
	})
	t.Run("application-resets", func(t *testing.T) {
		// The application resets its connection in the middle of a download, with a full window unread: the
		// session ends (its next redirect or window check fails) instead of hanging.
		src, dst := hostPort("10.1.0.2", splitPort()), hostPort("192.0.2.10", 80)
		c.mustCall(request{Op: "record", Proto: "tcp", Client: src, Original: dst})
		before := c.stats().TCP
		h := c.mustCall(request{Op: "bulkhold", Src: src, Dst: dst, Size: 8 * window})
		c.waitStats("the download waiting for the application", func(s Stats) bool {
			return s.TCP.HandoffWaits > before.HandoffWaits
		})
		c.mustCall(request{Op: "bulkabort", ID: h.ID})
		c.waitStats("the session to end", func(s Stats) bool { return s.TCP.Active == before.Active })
	})
	t.Run("stop-while-waiting", func(t *testing.T) {
		// Last: it stops the proxy. Sessions waiting for their application to read, or for their server, are cut
		// at the shutdown timeout (2 s), not after their idle round (half an hour with the default idle timeout).
		src, dst := hostPort("10.1.0.2", splitPort()), hostPort("192.0.2.10", 80)
		c.mustCall(request{Op: "record", Proto: "tcp", Client: src, Original: dst})
		before := c.stats().TCP
		// Twice the window: the upload can finish (the rest of the echo fits in the buffers on the way), and
		// the application keeps its write side open, so its socket outlives the proxy's end with neither a
		// reset nor a closed connection that would end the wait anyway.
		c.mustCall(request{Op: "bulkhold", Src: src, Dst: dst, Size: 2 * window, Open: true})
		c.waitStats("the download waiting for the application", func(s Stats) bool {
			return s.TCP.HandoffWaits > before.HandoffWaits
		})
		// And one whose download waits for the server (greeting read, then silence): its pump sits in poll(2),
		// which only the abort's wake-up ends.
		src2 := hostPort("10.1.0.2", splitPort())
		c.mustCall(request{Op: "record", Proto: "tcp", Client: src2, Original: dst})
		if h := c.mustCall(request{Op: "hold", Src: src2, Dst: dst}); h.Data != "B\n" {
			t.Fatalf("held connection's greeting %q", h.Data)
		}
		if r := c.call(request{Op: "stop", Timeout: 60_000}); r.Err != "" || r.Elapsed > 10_000 {
			t.Fatalf("stopping with a session waiting took %d ms (err %q); want the 2 s shutdown timeout", r.Elapsed, r.Err)
		}
	})
}
