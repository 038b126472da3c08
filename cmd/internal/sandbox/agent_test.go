package sandbox

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// pipeAgent runs RunAgent in-process behind pipes and returns a driver for it.
func pipeAgent(t *testing.T) *Agent {
	t.Helper()
	inR, inW := io.Pipe()
	outR, outW := io.Pipe()
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := RunAgent(inR, outW); err != nil {
			t.Errorf("RunAgent: %v", err)
		}
		outW.Close()
	}()
	a := &Agent{in: inW, lines: make(chan string, 1), done: done}
	go readLines(outR, a.lines)
	t.Cleanup(func() {
		inW.Close()
		<-done
	})
	return a
}

// freePort returns a loopback port nothing listens on (bound and released at once).
func freePort(t *testing.T, network string) string {
	t.Helper()
	if network == "udp" {
		c, err := net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		return c.LocalAddr().String()
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

func served(t *testing.T, a *Agent, name string) (tcp, udp string) {
	t.Helper()
	r, err := a.Call(Request{Op: "serve", Name: name, Addrs: []string{"127.0.0.1"}, TCP: []uint16{0}, UDP: []uint16{0}})
	if err != nil {
		t.Fatal(err)
	}
	if len(r.Listening) != 2 {
		t.Fatalf("serve: listening %v", r.Listening)
	}
	return strings.TrimPrefix(r.Listening[0], "tcp "), strings.TrimPrefix(r.Listening[1], "udp ")
}

func TestAgentProbes(t *testing.T) {
	a := pipeAgent(t)
	tcpAddr, udpAddr := served(t, a, "S")
	closedTCP, closedUDP := freePort(t, "tcp"), freePort(t, "udp")
	// A UDP socket that never answers: a probe to it must time out.
	silent, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()

	type result struct{ Outcome, Server, Echo, Peer string }
	for _, c := range []struct {
		name string
		req  Request
		want result
	}{
		{"tcp served", Request{Op: "tcp", Dst: tcpAddr, Payload: "hi"}, result{Connected, "S", "hi", tcpAddr}},
		{"tcp closed port", Request{Op: "tcp", Dst: closedTCP}, result{Outcome: Refused}},
		{"udp served", Request{Op: "udp", Dst: udpAddr, Connect: true, Payload: "x"}, result{Connected, "S", "x@" + udpAddr, udpAddr}},
		{"udp unconnected", Request{Op: "udp", Dst: udpAddr, Payload: "y"}, result{Connected, "S", "y@" + udpAddr, udpAddr}},
		{"udp closed port", Request{Op: "udp", Dst: closedUDP, Connect: true, Payload: "z"}, result{Outcome: Refused}},
		{"udp silent", Request{Op: "udp", Dst: silent.LocalAddr().String(), Connect: true, TimeoutMS: 100}, result{Outcome: TimedOut}},
	} {
		r, err := a.Call(c.req)
		if err != nil {
			t.Errorf("%s: %v", c.name, err)
			continue
		}
		got := result{r.Outcome, r.Server, r.Echo, r.Peer}
		if c.want.Outcome != Connected {
			got = result{Outcome: r.Outcome}
		}
		if diff := cmp.Diff(c.want, got); diff != "" {
			t.Errorf("%s (-want +got):\n%s\ndetail: %s", c.name, diff, r.Detail)
		}
	}

	// One socket, several destinations: one reply each, from the right one.
	_, udp2 := served(t, a, "T")
	r, err := a.Call(Request{Op: "udp", Dsts: []string{udpAddr, udp2}, Payload: "m"})
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, rep := range r.Replies {
		got = append(got, rep.Server+" "+rep.From+" "+rep.Echo)
	}
	if diff := cmp.Diff([]string{"S " + udpAddr + " m@" + udpAddr, "T " + udp2 + " m@" + udp2}, got); diff != "" {
		t.Errorf("multi-destination udp (-want +got):\n%s", diff)
	}

	r, err = a.Call(Request{Op: "many", Dst: tcpAddr, Count: 20, Parallel: 4})
	if err != nil || r.Servers["S"] != 20 || r.Failures != 0 {
		t.Errorf("many: %+v, %v", r, err)
	}
	r, err = a.Call(Request{Op: "many", Dst: closedTCP, Count: 3, Parallel: 2})
	if err != nil || r.Failures != 3 || len(r.Servers) != 0 {
		t.Errorf("many to a closed port: %+v, %v", r, err)
	}
}

func TestAgentHoldPingClose(t *testing.T) {
	a := pipeAgent(t)
	// A server that goes away while a connection is held: the next ping must say so.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	conns := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		fmt.Fprintln(c, "H")
		conns <- c
	}()
	h, err := a.Call(Request{Op: "hold", Dst: ln.Addr().String()})
	if err != nil || h.Outcome != Connected || h.Server != "H" || h.ID == 0 {
		t.Fatalf("hold: %+v %v", h, err)
	}
	srv := <-conns
	go func() { _, _ = io.Copy(srv, srv) }()
	if r, err := a.Call(Request{Op: "ping", ID: h.ID, Payload: "one"}); err != nil || r.Outcome != Connected || r.Echo != "one" {
		t.Errorf("ping: %+v %v", r, err)
	}
	// RST: linger 0 on close.
	_ = srv.(*net.TCPConn).SetLinger(0)
	srv.Close()
	if r, err := a.Call(Request{Op: "ping", ID: h.ID, TimeoutMS: 2000}); err != nil || r.Outcome != Refused {
		t.Errorf("ping after the server reset: %+v %v", r, err)
	}
	if _, err := a.Call(Request{Op: "close", ID: h.ID}); err != nil {
		t.Error(err)
	}
	if _, err := a.Call(Request{Op: "ping", ID: h.ID}); err == nil {
		t.Error("ping of a closed connection succeeded")
	}
	if _, err := a.Call(Request{Op: "bogus"}); err == nil || !strings.Contains(err.Error(), "unknown op") {
		t.Errorf("unknown op: %v", err)
	}
}

func TestAgentHTTP(t *testing.T) {
	a := pipeAgent(t)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "metrics") }))
	defer srv.Close()
	r, err := a.Call(Request{Op: "http", URL: srv.URL})
	if err != nil || r.Status != 200 || r.Body != "metrics" {
		t.Errorf("http: %+v %v", r, err)
	}
}

func TestClassify(t *testing.T) {
	d := net.Dialer{Timeout: 50 * time.Millisecond}
	_, err := d.Dial("tcp", freePort(t, "tcp"))
	if got := Classify(err); got != Refused {
		t.Errorf("connection refused: %s (%v)", got, err)
	}
	if got := Classify(nil); got != Connected {
		t.Errorf("nil: %s", got)
	}
	if got := Classify(io.EOF); got != Refused {
		t.Errorf("EOF: %s", got)
	}
	if got := Classify(&net.OpError{Op: "read", Err: timeoutErr{}}); got != TimedOut {
		t.Errorf("timeout: %s", got)
	}
	if got := Classify(exec.ErrNotFound); got != Failed {
		t.Errorf("other: %s", got)
	}
}

type timeoutErr struct{}

func (timeoutErr) Error() string   { return "i/o timeout" }
func (timeoutErr) Timeout() bool   { return true }
func (timeoutErr) Temporary() bool { return true }
