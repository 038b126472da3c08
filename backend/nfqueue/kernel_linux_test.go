package nfqueue

import (
	"io"
	"net"
	"net/netip"
	"testing"
	"time"
)

// Ports of the test policy.
const (
	portAllow uint16 = 8001
	portBlock uint16 = 8002
	portDrop  uint16 = 8003
	portOnce  uint16 = 8004 // accepted packet by packet, not permanently
)

func verdictRules() []childRule {
	return []childRule{
		{Dir: "out", Port: portAllow, Verdict: "accept", Permanent: true},
		{Dir: "out", Port: portBlock, Verdict: "block", Permanent: true},
		{Dir: "out", Port: portDrop, Verdict: "drop", Permanent: true},
		{Dir: "out", Port: portOnce, Verdict: "accept"},
	}
}

// families runs f once for IPv4 and once for IPv6 addresses of the net.
func families(t *testing.T, n *testNet, f func(t *testing.T, server, server2 netip.Addr)) {
	t.Run("ipv4", func(t *testing.T) { f(t, n.ServerV4, n.Server2V4) })
	t.Run("ipv6", func(t *testing.T) { f(t, n.ServerV6, n.Server2V6) })
}

func TestKernelTCPVerdicts(t *testing.T) {
	t.Parallel()
	n := newTestNet(t)
	srv := map[uint16]*tcpServer{}
	for _, p := range []uint16{portAllow, portBlock, portDrop, portOnce} {
		srv[p] = listenTCP(t, n.server, p)
	}
	startWarden(t, n.client, childConfig{Rules: verdictRules()})
	families(t, n, func(t *testing.T, server, _ netip.Addr) {
		for _, p := range []uint16{portAllow, portOnce} {
			c, err := dial(t, n.client, net.Dialer{}, "tcp", netip.AddrPortFrom(server, p), 3*time.Second)
			if err != nil {
				t.Fatalf("allowed port %d: %v", p, err)
			}
			echo(t, c)
		}

		start := time.Now()
		_, err := dial(t, n.client, net.Dialer{}, "tcp", netip.AddrPortFrom(server, portBlock), 3*time.Second)
		if !isRefused(err) {
			t.Errorf("blocked port: got %v, want connection refused", err)
		}
		if d := time.Since(start); d > 500*time.Millisecond {
			t.Errorf("blocked connect took %v, want an immediate refusal", d)
		}

		_, err = dial(t, n.client, net.Dialer{}, "tcp", netip.AddrPortFrom(server, portDrop), 1500*time.Millisecond)
		if !isTimeout(err) {
			t.Errorf("dropped port: got %v, want a timeout", err)
		}
	})
	if a := srv[portBlock].accepted.Load() + srv[portDrop].accepted.Load(); a != 0 {
		t.Errorf("server accepted %d blocked/dropped connections", a)
	}
}

// echo checks a connection carries data both ways.
func echo(t *testing.T, c net.Conn) {
	t.Helper()
	_ = c.SetDeadline(time.Now().Add(3 * time.Second))
	if _, err := c.Write([]byte("hello")); err != nil {
		t.Fatalf("write: %v", err)
	}
	buf := make([]byte, 5)
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "hello" {
		t.Fatalf("echo: %q, %v", buf, err)
	}
}
