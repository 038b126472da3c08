package sandbox

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Outcomes of a probe, as the agent reports them.
const (
	// Connected: a server answered (Response.Server names it).
	Connected = "connected"
	// Refused: refused at once (TCP reset, ICMP unreachable or prohibited, or closed before any answer).
	Refused = "refused"
	// TimedOut: nothing came back before the timeout (a silent drop).
	TimedOut = "timeout"
	// DroppedLocally: the local kernel said a packet was dropped (EPERM from a firewall DROP on send).
	DroppedLocally = "dropped"
	// Failed: any other error.
	Failed = "error"
)

// Request is one instruction to an agent.
type Request struct {
	// Op is one of: serve, tcp, udp, many, hold, ping, close, http, dns-serve, dns-count, dns (see dns.go).
	Op string `json:"op"`
	// Name is what a server answers with (serve).
	Name string `json:"name,omitempty"`
	// Addrs are the addresses to serve on; TCP and UDP the ports (serve).
	Addrs []string `json:"addrs,omitempty"`
	TCP   []uint16 `json:"tcp,omitempty"`
	UDP   []uint16 `json:"udp,omitempty"`
	// Src is an optional local address:port to connect from.
	Src string `json:"src,omitempty"`
	// Dst is the destination (tcp, many, hold); Dsts the destinations one UDP socket sends to in turn (udp).
	Dst  string   `json:"dst,omitempty"`
	Dsts []string `json:"dsts,omitempty"`
	// Connect makes udp use a connected socket (one destination), so ICMP errors are reported.
	Connect bool `json:"connect,omitempty"`
	// Payload is sent after the greeting (tcp: echoed back) or as the datagram (udp).
	Payload string `json:"payload,omitempty"`
	// ID names a held connection (ping, close).
	ID int `json:"id,omitempty"`
	// Count and Parallel shape many.
	Count    int    `json:"count,omitempty"`
	Parallel int    `json:"parallel,omitempty"`
	URL      string `json:"url,omitempty"`
	// TimeoutMS bounds each network operation (default 3000).
	TimeoutMS int `json:"timeout_ms,omitempty"`
	// Records is the zone a DNS server answers from (dns-serve).
	Records []DNSRecord `json:"records,omitempty"`
	// QName and QType are the question of a DNS query (dns; QType defaults to A); Net is its transport,
	// udp (default) or tcp.
	QName string `json:"qname,omitempty"`
	QType string `json:"qtype,omitempty"`
	Net   string `json:"net,omitempty"`
}

// UDPReply is the outcome of one datagram sent to one destination.
type UDPReply struct {
	Dst     string        `json:"dst"`
	Outcome string        `json:"outcome"`
	Detail  string        `json:"detail,omitempty"`
	From    string        `json:"from,omitempty"`
	Server  string        `json:"server,omitempty"`
	Echo    string        `json:"echo,omitempty"`
	Elapsed time.Duration `json:"elapsed"`
}

// Response is an agent's answer.
type Response struct {
	// Err reports a failed request (a bad request, a port that could not be served); network outcomes are in
	// Outcome instead.
	Err     string `json:"err,omitempty"`
	Outcome string `json:"outcome,omitempty"`
	Detail  string `json:"detail,omitempty"`
	// Server is the name the server greeted with; Echo what it echoed.
	Server string `json:"server,omitempty"`
	Echo   string `json:"echo,omitempty"`
	// Peer and Local are the connection's addresses as the client sees them.
	Peer    string     `json:"peer,omitempty"`
	Local   string     `json:"local,omitempty"`
	ID      int        `json:"id,omitempty"`
	Replies []UDPReply `json:"replies,omitempty"`
	// Servers counts answers by server name (many); Failures the connections that got none.
	Servers  map[string]int `json:"servers,omitempty"`
	Failures int            `json:"failures,omitempty"`
	Status   int            `json:"status,omitempty"`
	// Listening lists the addresses serve bound (useful with port 0).
	Listening []string `json:"listening,omitempty"`
	Body      string   `json:"body,omitempty"`
	// Rcode and Answers are a DNS reply (dns); DNSQueries counts the questions a DNS server was asked,
	// keyed "net name TYPE" (dns-count).
	Rcode      string         `json:"rcode,omitempty"`
	Answers    []DNSRecord    `json:"answers,omitempty"`
	DNSQueries map[string]int `json:"dns_queries,omitempty"`
	Elapsed    time.Duration  `json:"elapsed"`
}

// Classify maps a network error to an outcome.
func Classify(err error) string {
	var ne net.Error
	switch {
	case err == nil:
		return Connected
	case errors.Is(err, os.ErrDeadlineExceeded), errors.As(err, &ne) && ne.Timeout():
		return TimedOut
	case errors.Is(err, syscall.EPERM):
		return DroppedLocally
	case errors.Is(err, syscall.ECONNREFUSED), errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EHOSTUNREACH),
		errors.Is(err, syscall.ENETUNREACH), errors.Is(err, syscall.EACCES), errors.Is(err, syscall.EPIPE),
		errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return Refused
	}
	return Failed
}

// agent is the serving and probing side.
type agent struct {
	mu      sync.Mutex // guards held, nextID and dns
	held    map[int]*heldConn
	nextID  int
	dns     map[string]*dnsZone // DNS servers by name (dns-serve)
	closers []io.Closer
}

type heldConn struct {
	c net.Conn
	r *bufio.Reader
}

// RunAgent serves requests read from in, one JSON object per line, answering each with one line on out, until
// in ends. Everything it opened is closed before it returns.
func RunAgent(in io.Reader, out io.Writer) error {
	a := &agent{held: map[int]*heldConn{}, dns: map[string]*dnsZone{}}
	defer a.closeAll()
	sc := bufio.NewScanner(in)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	enc := json.NewEncoder(out)
	for sc.Scan() {
		var req Request
		var resp Response
		if err := json.Unmarshal(sc.Bytes(), &req); err != nil {
			resp.Err = "bad request: " + err.Error()
		} else {
			resp = a.handle(&req)
		}
		if err := enc.Encode(resp); err != nil {
			return err
		}
	}
	return sc.Err()
}

func (a *agent) closeAll() {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, h := range a.held {
		h.c.Close()
	}
	for _, c := range a.closers {
		c.Close()
	}
}

func (r *Request) timeout() time.Duration {
	if r.TimeoutMS > 0 {
		return time.Duration(r.TimeoutMS) * time.Millisecond
	}
	return 3 * time.Second
}

func (a *agent) handle(req *Request) Response {
	start := time.Now()
	var resp Response
	switch req.Op {
	case "serve":
		var err error
		if resp.Listening, err = a.serve(req); err != nil {
			resp.Err = err.Error()
		}
	case "tcp":
		resp = probeTCP(req)
	case "udp":
		resp = probeUDP(req)
	case "many":
		resp = a.many(req)
	case "hold":
		resp = a.hold(req)
	case "ping":
		resp = a.ping(req)
	case "close":
		a.mu.Lock()
		if h, ok := a.held[req.ID]; ok {
			h.c.Close()
			delete(a.held, req.ID)
		}
		a.mu.Unlock()
	case "http":
		resp = fetch(req)
	case "dns-serve":
		var err error
		if resp.Listening, err = a.serveDNS(req); err != nil {
			resp.Err = err.Error()
		}
	case "dns-count":
		resp = a.countDNS(req)
	case "dns":
		resp = queryDNS(req)
	default:
		resp.Err = fmt.Sprintf("unknown op %q", req.Op)
	}
	resp.Elapsed = time.Since(start)
	return resp
}

// serve answers TCP (the name and a newline, then an echo until EOF) and UDP ("name|local address|payload") on
// every address and port. UDP sockets are bound to the exact address so replies leave from it.
func (a *agent) serve(req *Request) ([]string, error) {
	var listening []string
	for _, s := range req.Addrs {
		ip, err := netip.ParseAddr(s)
		if err != nil {
			return listening, fmt.Errorf("serve: %w", err)
		}
		for _, port := range req.TCP {
			ln, err := net.ListenTCP("tcp", net.TCPAddrFromAddrPort(netip.AddrPortFrom(ip, port)))
			if err != nil {
				return listening, fmt.Errorf("serve: %w", err)
			}
			a.closers = append(a.closers, ln)
			listening = append(listening, "tcp "+ln.Addr().String())
			go acceptLoop(ln, req.Name)
		}
		for _, port := range req.UDP {
			uc, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(ip, port)))
			if err != nil {
				return listening, fmt.Errorf("serve: %w", err)
			}
			a.closers = append(a.closers, uc)
			listening = append(listening, "udp "+uc.LocalAddr().String())
			go udpLoop(uc, req.Name, ip)
		}
	}
	return listening, nil
}

func acceptLoop(ln *net.TCPListener, name string) {
	for {
		c, err := ln.AcceptTCP()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			if _, err := io.WriteString(c, name+"\n"); err != nil {
				return
			}
			_, _ = io.Copy(c, c)
		}()
	}
}

func udpLoop(uc *net.UDPConn, name string, ip netip.Addr) {
	buf := make([]byte, 2048)
	for {
		n, from, err := uc.ReadFromUDPAddrPort(buf)
		if err != nil {
			return
		}
		_, _ = uc.WriteToUDPAddrPort([]byte(name+"|"+ip.String()+"|"+string(buf[:n])), from)
	}
}

func dialer(req *Request, network string) (*net.Dialer, error) {
	d := &net.Dialer{Timeout: req.timeout()}
	if req.Src != "" {
		ap, err := netip.ParseAddrPort(req.Src)
		if err != nil {
			return nil, err
		}
		if network == "udp" {
			d.LocalAddr = net.UDPAddrFromAddrPort(ap)
		} else {
			d.LocalAddr = net.TCPAddrFromAddrPort(ap)
		}
	}
	return d, nil
}

// probeTCP connects, reads the greeting and, with a payload, checks the echo.
func probeTCP(req *Request) Response {
	var resp Response
	d, err := dialer(req, "tcp")
	if err != nil {
		resp.Err = err.Error()
		return resp
	}
	deadline := time.Now().Add(req.timeout())
	c, err := d.Dial("tcp", req.Dst)
	if err != nil {
		resp.Outcome, resp.Detail = Classify(err), err.Error()
		return resp
	}
	defer c.Close()
	resp.Peer, resp.Local = c.RemoteAddr().String(), c.LocalAddr().String()
	_ = c.SetDeadline(deadline)
	r := bufio.NewReader(c)
	greeting, err := r.ReadString('\n')
	if err != nil {
		resp.Outcome, resp.Detail = Classify(err), "no answer: "+err.Error()
		return resp
	}
	resp.Outcome, resp.Server = Connected, strings.TrimSuffix(greeting, "\n")
	if req.Payload != "" {
		if _, err := io.WriteString(c, req.Payload+"\n"); err != nil {
			resp.Outcome, resp.Detail = Classify(err), "echo: "+err.Error()
			return resp
		}
		echo, err := r.ReadString('\n')
		if err != nil {
			resp.Outcome, resp.Detail = Classify(err), "echo: "+err.Error()
			return resp
		}
		resp.Echo = strings.TrimSuffix(echo, "\n")
	}
	return resp
}

// probeUDP sends one datagram to each destination in turn from one socket and waits for each reply.
func probeUDP(req *Request) Response {
	var resp Response
	dsts := req.Dsts
	if req.Dst != "" {
		dsts = append([]string{req.Dst}, dsts...)
	}
	var c *net.UDPConn
	var err error
	var local *net.UDPAddr
	if req.Src != "" {
		ap, perr := netip.ParseAddrPort(req.Src)
		if perr != nil {
			resp.Err = perr.Error()
			return resp
		}
		local = net.UDPAddrFromAddrPort(ap)
	}
	if req.Connect {
		if len(dsts) != 1 {
			resp.Err = "connect needs exactly one destination"
			return resp
		}
		var ra *net.UDPAddr
		if ra, err = net.ResolveUDPAddr("udp", dsts[0]); err == nil {
			c, err = net.DialUDP("udp", local, ra)
		}
	} else {
		network := "udp"
		if local == nil && len(dsts) > 0 && strings.HasPrefix(dsts[0], "[") {
			network = "udp6"
		}
		c, err = net.ListenUDP(network, local)
	}
	if err != nil {
		resp.Err = err.Error()
		return resp
	}
	defer c.Close()
	resp.Local = c.LocalAddr().String()
	buf := make([]byte, 2048)
	for _, dst := range dsts {
		r := UDPReply{Dst: dst}
		start := time.Now()
		ap, perr := netip.ParseAddrPort(dst)
		if perr != nil {
			resp.Err = perr.Error()
			return resp
		}
		payload := []byte(req.Payload + "@" + dst)
		if req.Connect {
			_, err = c.Write(payload)
		} else {
			_, err = c.WriteToUDPAddrPort(payload, ap)
		}
		if err == nil {
			_ = c.SetReadDeadline(time.Now().Add(req.timeout()))
			var n int
			var from netip.AddrPort
			n, from, err = c.ReadFromUDPAddrPort(buf)
			if err == nil {
				r.From = netip.AddrPortFrom(from.Addr().Unmap(), from.Port()).String()
				parts := strings.SplitN(string(buf[:n]), "|", 3)
				r.Server = parts[0]
				if len(parts) == 3 {
					r.Echo = parts[2]
				}
			}
		}
		r.Outcome = Classify(err)
		if err != nil {
			r.Detail = err.Error()
		}
		r.Elapsed = time.Since(start)
		resp.Replies = append(resp.Replies, r)
	}
	if len(resp.Replies) == 1 {
		r := resp.Replies[0]
		resp.Outcome, resp.Detail, resp.Server, resp.Peer, resp.Echo = r.Outcome, r.Detail, r.Server, r.From, r.Echo
	}
	return resp
}

// many makes Count TCP connections to Dst, Parallel at a time, and counts which server greeted each.
func (a *agent) many(req *Request) Response {
	resp := Response{Servers: map[string]int{}}
	par := max(req.Parallel, 1)
	jobs := make(chan struct{})
	var mu sync.Mutex
	var wg sync.WaitGroup
	for range par {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range jobs {
				r := probeTCP(&Request{Dst: req.Dst, TimeoutMS: req.TimeoutMS})
				mu.Lock()
				if r.Outcome == Connected {
					resp.Servers[r.Server]++
				} else {
					resp.Failures++
					if resp.Detail == "" {
						resp.Detail = r.Outcome + ": " + r.Detail
					}
				}
				mu.Unlock()
			}
		}()
	}
	for range req.Count {
		jobs <- struct{}{}
	}
	close(jobs)
	wg.Wait()
	return resp
}

// hold connects, reads the greeting and keeps the connection for ping and close.
func (a *agent) hold(req *Request) Response {
	var resp Response
	d, err := dialer(req, "tcp")
	if err != nil {
		resp.Err = err.Error()
		return resp
	}
	c, err := d.Dial("tcp", req.Dst)
	if err != nil {
		resp.Outcome, resp.Detail = Classify(err), err.Error()
		return resp
	}
	resp.Peer, resp.Local = c.RemoteAddr().String(), c.LocalAddr().String()
	r := bufio.NewReader(c)
	_ = c.SetReadDeadline(time.Now().Add(req.timeout()))
	greeting, err := r.ReadString('\n')
	if err != nil {
		c.Close()
		resp.Outcome, resp.Detail = Classify(err), err.Error()
		return resp
	}
	_ = c.SetReadDeadline(time.Time{})
	resp.Outcome, resp.Server = Connected, strings.TrimSuffix(greeting, "\n")
	a.mu.Lock()
	a.nextID++
	resp.ID = a.nextID
	a.held[resp.ID] = &heldConn{c: c, r: r}
	a.mu.Unlock()
	return resp
}

// ping sends a line on a held connection and waits for its echo.
func (a *agent) ping(req *Request) Response {
	var resp Response
	a.mu.Lock()
	h := a.held[req.ID]
	a.mu.Unlock()
	if h == nil {
		resp.Err = fmt.Sprintf("no held connection %d", req.ID)
		return resp
	}
	_ = h.c.SetDeadline(time.Now().Add(req.timeout()))
	msg := req.Payload
	if msg == "" {
		msg = "ping"
	}
	if _, err := io.WriteString(h.c, msg+"\n"); err != nil {
		resp.Outcome, resp.Detail = Classify(err), err.Error()
		return resp
	}
	line, err := h.r.ReadString('\n')
	if err != nil {
		resp.Outcome, resp.Detail = Classify(err), err.Error()
		return resp
	}
	resp.Outcome, resp.Echo = Connected, strings.TrimSuffix(line, "\n")
	return resp
}

func fetch(req *Request) Response {
	var resp Response
	ctx, cancel := context.WithTimeout(context.Background(), req.timeout())
	defer cancel()
	hreq, err := http.NewRequestWithContext(ctx, http.MethodGet, req.URL, nil)
	if err != nil {
		resp.Err = err.Error()
		return resp
	}
	r, err := http.DefaultClient.Do(hreq)
	if err != nil {
		resp.Outcome, resp.Detail = Classify(err), err.Error()
		return resp
	}
	defer r.Body.Close()
	body, err := io.ReadAll(io.LimitReader(r.Body, 16<<20))
	if err != nil {
		resp.Outcome, resp.Detail = Classify(err), err.Error()
		return resp
	}
	resp.Outcome, resp.Status, resp.Body = Connected, r.StatusCode, string(body)
	return resp
}

// Agent is the driving side of an agent process.
type Agent struct {
	cmd   *exec.Cmd
	in    io.WriteCloser
	lines chan string
	done  chan struct{}

	mu sync.Mutex // serialises calls
}

// StartAgent starts cmd, which must run RunAgent inside the intended namespace (e.g. `ip netns exec NS warden
// demo agent`). Its stderr is left as the caller set it.
func StartAgent(cmd *exec.Cmd) (*Agent, error) {
	in, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting agent: %w", err)
	}
	a := &Agent{cmd: cmd, in: in, lines: make(chan string, 1), done: make(chan struct{})}
	go readLines(out, a.lines)
	go func() {
		_ = cmd.Wait()
		close(a.done)
	}()
	return a, nil
}

// readLines sends each line of r to lines and closes lines at the end.
func readLines(r io.Reader, lines chan<- string) {
	defer close(lines)
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 32<<20)
	for sc.Scan() {
		lines <- sc.Text()
	}
}

// Call sends one request and waits for its answer, for at most the request's own time bound plus a margin.
func (a *Agent) Call(req Request) (Response, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	b, err := json.Marshal(req)
	if err != nil {
		return Response{}, err
	}
	if _, err := a.in.Write(append(b, '\n')); err != nil {
		return Response{}, fmt.Errorf("agent %s: %w", req.Op, err)
	}
	bound := 20*time.Second + req.timeout()*time.Duration(1+len(req.Dsts)+req.Count)
	timer := time.NewTimer(bound)
	defer timer.Stop()
	select {
	case line, ok := <-a.lines:
		if !ok {
			return Response{}, fmt.Errorf("agent %s: the agent exited", req.Op)
		}
		var resp Response
		if err := json.Unmarshal([]byte(line), &resp); err != nil {
			return Response{}, fmt.Errorf("agent %s: %w (%q)", req.Op, err, line)
		}
		if resp.Err != "" {
			return resp, fmt.Errorf("agent %s: %s", req.Op, resp.Err)
		}
		return resp, nil
	case <-timer.C:
		return Response{}, fmt.Errorf("agent %s: no answer within %v", req.Op, bound)
	}
}

// Close ends the agent: its input closes, and if it has not exited within a few seconds it is killed.
func (a *Agent) Close() error {
	a.in.Close()
	select {
	case <-a.done:
		return nil
	case <-time.After(5 * time.Second):
	}
	_ = a.cmd.Process.Kill()
	<-a.done
	return errors.New("agent did not exit; killed")
}

// PID returns the agent's process id.
func (a *Agent) PID() int { return a.cmd.Process.Pid }
