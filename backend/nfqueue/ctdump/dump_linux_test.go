package ctdump

import (
	"errors"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/warden-fw/warden/backend/netnstest"
)

// TestDumpNamespace lists a namespace's conntrack table after real traffic: a live TCP connection, one that
// ended (TIME_WAIT), and UDP flows over IPv4 and IPv6, each found by its tuples.
func TestDumpNamespace(t *testing.T) {
	netnstest.RequireRoot(t, "ip", "iptables", "ip6tables")
	ns := "ctd-" + netnstest.Suffix()
	netnstest.NewNS(t, ns)
	// Conntrack runs in a namespace, per family, only once a rule needs it.
	for _, ipt := range []string{"iptables", "ip6tables"} {
		netnstest.Run(t, "ip", "netns", "exec", ns, ipt, "-A", "OUTPUT", "-m", "conntrack", "--ctstate", "NEW")
	}

	var live, ended net.Conn
	var udp4, udp6 netip.AddrPort // the client ends
	var setupErr error
	netnstest.InNS(t, ns, func() { live, ended, udp4, udp6, setupErr = makeFlows(t) })
	if setupErr != nil {
		t.Fatal(setupErr)
	}
	liveLocal := live.LocalAddr().(*net.TCPAddr).AddrPort()
	endedLocal := ended.LocalAddr().(*net.TCPAddr).AddrPort()

	find := func() (map[netip.AddrPort]Flow, error) {
		flows := map[netip.AddrPort]Flow{}
		var err error
		netnstest.InNS(t, ns, func() {
			err = Dump(func(f *Flow) { flows[f.Orig.Src] = *f })
		})
		return flows, err
	}
	// The ended connection reaches TIME_WAIT once the last ACK has passed; on loopback that is at once, but
	// the closes run on other goroutines: look a bounded number of times.
	var flows map[netip.AddrPort]Flow
	deadline := time.Now().Add(5 * time.Second)
	for i := 0; ; i++ {
		var err error
		if flows, err = find(); err != nil {
			t.Fatalf("Dump: %v", err)
		}
		if f, ok := flows[endedLocal]; (ok && f.Ended()) || i == 100 || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond) // polling the kernel's table: there is no event for a state change
	}

	check := func(name string, src netip.AddrPort, proto uint8, wantEnded bool) {
		t.Helper()
		f, ok := flows[src]
		switch {
		case !ok:
			t.Errorf("%s (from %s): not in the dump", name, src)
		case f.Proto != proto || f.Ended() != wantEnded:
			t.Errorf("%s: proto %d, ended %v (state %d); want proto %d, ended %v", name, f.Proto, f.Ended(), f.TCPState,
				proto, wantEnded)
		case f.Reply.Dst != src || f.Reply.Src != f.Orig.Dst:
			t.Errorf("%s: reply tuple %v is not the original %v reversed", name, f.Reply, f.Orig)
		}
	}
	check("live TCP connection", liveLocal, 6, false)
	check("closed TCP connection", endedLocal, 6, true)
	check("UDP flow over IPv4", udp4, 17, false)
	check("UDP flow over IPv6", udp6, 17, false)
	if f := flows[liveLocal]; !f.HasTCPState || f.TCPState != 3 {
		t.Errorf("live TCP connection: state %d (known %v), want ESTABLISHED (3)", f.TCPState, f.HasTCPState)
	}
}

// makeFlows runs in the namespace: it leaves one TCP connection open, closes another from both sides, and
// sends one UDP datagram over each family. It must not call t.Fatal (it runs on InNS's goroutine).
func makeFlows(t *testing.T) (live, ended net.Conn, udp4, udp6 netip.AddrPort, err error) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		return nil, nil, udp4, udp6, err
	}
	t.Cleanup(func() { ln.Close() })
	accepted := make(chan net.Conn, 2)
	go func() {
		for range 2 {
			c, err := ln.Accept()
			if err != nil {
				close(accepted)
				return
			}
			accepted <- c
		}
	}()
	if live, err = net.Dial("tcp4", ln.Addr().String()); err != nil {
		return nil, nil, udp4, udp6, err
	}
	t.Cleanup(func() { live.Close() })
	serverLive := <-accepted
	if serverLive == nil {
		return nil, nil, udp4, udp6, errors.New("accept failed")
	}
	t.Cleanup(func() { serverLive.Close() })
	if ended, err = net.Dial("tcp4", ln.Addr().String()); err != nil {
		return nil, nil, udp4, udp6, err
	}
	serverEnded := <-accepted
	if serverEnded == nil {
		return nil, nil, udp4, udp6, errors.New("accept failed")
	}
	// The client closes first, the server on seeing the end: the client's side goes to TIME_WAIT.
	ended.Close()
	if _, err := io.Copy(io.Discard, serverEnded); err != nil {
		return nil, nil, udp4, udp6, err
	}
	serverEnded.Close()

	for _, network := range []string{"udp4", "udp6"} {
		addr := "127.0.0.1:0"
		if network == "udp6" {
			addr = "[::1]:0"
		}
		srv, err := net.ListenPacket(network, addr)
		if err != nil {
			return nil, nil, udp4, udp6, err
		}
		t.Cleanup(func() { srv.Close() })
		c, err := net.Dial(network, srv.LocalAddr().String())
		if err != nil {
			return nil, nil, udp4, udp6, err
		}
		t.Cleanup(func() { c.Close() })
		if _, err := c.Write([]byte("x")); err != nil {
			return nil, nil, udp4, udp6, err
		}
		src := c.LocalAddr().(*net.UDPAddr).AddrPort()
		if network == "udp4" {
			udp4 = netip.AddrPortFrom(src.Addr().Unmap(), src.Port())
		} else {
			udp6 = src
		}
	}
	return live, ended, udp4, udp6, nil
}

// BenchmarkDump lists a table of loopback UDP flows; b.N listings. It reports the cost per entry listed.
func BenchmarkDump(b *testing.B) {
	netnstest.RequireRoot(b, "ip", "iptables")
	ns := "ctdb-" + netnstest.Suffix()
	netnstest.NewNS(b, ns)
	netnstest.Run(b, "ip", "netns", "exec", ns, "iptables", "-A", "OUTPUT", "-m", "conntrack", "--ctstate", "NEW")
	const flows = 20000
	var setupErr error
	netnstest.InNS(b, ns, func() {
		srv, err := net.ListenPacket("udp4", "127.0.0.1:0")
		if err != nil {
			setupErr = err
			return
		}
		defer srv.Close()
		to := srv.LocalAddr().(*net.UDPAddr)
		for i := 0; i < flows && setupErr == nil; i++ {
			c, err := net.DialUDP("udp4", nil, to)
			if err != nil {
				setupErr = err
				return
			}
			_, setupErr = c.Write([]byte("x"))
			c.Close()
		}
	})
	if setupErr != nil {
		b.Fatal(setupErr)
	}
	b.ResetTimer()
	n := 0
	var err error
	netnstest.InNS(b, ns, func() {
		for i := 0; i < b.N && err == nil; i++ {
			err = Dump(func(*Flow) { n++ })
		}
	})
	if err != nil {
		b.Fatal(err)
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(max(n, 1)), "ns/entry")
	b.ReportMetric(float64(n)/float64(b.N), "entries")
}
