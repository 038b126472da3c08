package process

import (
	"net"
	"net/netip"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/warden-fw/warden/backend"
	"github.com/warden-fw/warden/backend/netnstest"
)

func newTestConn(t *testing.T) *diagConn {
	t.Helper()
	netnstest.RequireRoot(t)
	c, err := newDiagConn()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(c.fd) })
	return c
}

// TestDiagExactLookupOrder pins the kernel behaviour findSocketOn relies on: an exact TCP request names the
// socket's own end in src, an exact UDP request names the remote end in src (the receive path's order), and the
// UDP lookup finds unconnected sockets too.
func TestDiagExactLookupOrder(t *testing.T) {
	c := newTestConn(t)
	u1, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer u1.Close()
	u2, err := net.DialUDP("udp4", nil, u1.LocalAddr().(*net.UDPAddr))
	if err != nil {
		t.Fatal(err)
	}
	defer u2.Close()
	a1 := u1.LocalAddr().(*net.UDPAddr).AddrPort()
	a2 := u2.LocalAddr().(*net.UDPAddr).AddrPort()

	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	t2, err := net.Dial("tcp4", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer t2.Close()
	l1 := ln.Addr().(*net.TCPAddr).AddrPort()
	l2 := t2.LocalAddr().(*net.TCPAddr).AddrPort()

	for _, tc := range []struct {
		name      string
		req       diagReq
		wantLocal netip.AddrPort
	}{
		{"udp connected", diagReq{Family: afInet, Protocol: ipprotoUDP, States: allStates, Src: a1, Dst: a2}, a2},
		{"udp unconnected", diagReq{Family: afInet, Protocol: ipprotoUDP, States: allStates, Src: a2, Dst: a1}, a1},
		{"tcp established", diagReq{Family: afInet, Protocol: ipprotoTCP, States: allStates, Src: l2, Dst: l1}, l2},
		{"tcp listener", diagReq{Family: afInet, Protocol: ipprotoTCP, States: allStates, Src: l1, Dst: netip.MustParseAddrPort("127.0.0.1:9")}, l1},
	} {
		s, err := c.get(&tc.req)
		if err != nil {
			t.Errorf("%s: %v", tc.name, err)
			continue
		}
		if s.local != tc.wantLocal || s.inode == 0 {
			t.Errorf("%s: got socket %v (inode %d), want %v", tc.name, s.local, s.inode, tc.wantLocal)
		}
	}
	if _, err := c.get(&diagReq{Family: afInet, Protocol: ipprotoUDP, States: allStates, Src: a2, Dst: netip.MustParseAddrPort("127.0.0.1:1")}); err != errNotFound {
		t.Errorf("lookup of an unbound port: %v, want errNotFound", err)
	}
	// findSocketOn must never answer with the connection's other end.
	for _, tc := range []struct {
		proto         backend.Protocol
		local, remote netip.AddrPort
	}{{backend.UDP, a2, a1}, {backend.UDP, a1, a2}, {backend.TCP, l2, l1}} {
		s, err := findSocketOn(c, tc.proto, backend.Outbound, tc.local, tc.remote, 0)
		if err != nil || s.local != tc.local {
			t.Errorf("findSocketOn(%v %v -> %v) = %v, %v", tc.proto, tc.local, tc.remote, s.local, err)
		}
	}
}

// TestDiagDumpFallback finds a device-bound UDP socket, which the exact lookup with ifindex 0 misses.
func TestDiagDumpFallback(t *testing.T) {
	c := newTestConn(t)
	lc := net.ListenConfig{Control: bindToDevice("lo")}
	pc, err := lc.ListenPacket(t.Context(), "udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	local := pc.LocalAddr().(*net.UDPAddr).AddrPort()
	remote := netip.MustParseAddrPort("127.0.0.1:9")
	if _, err := c.get(&diagReq{Family: afInet, Protocol: ipprotoUDP, States: allStates, Src: remote, Dst: local}); err != errNotFound {
		t.Logf("exact lookup of a device-bound socket: %v (the fallback is not exercised)", err)
	}
	s, err := findSocketOn(c, backend.UDP, backend.Outbound, local, remote, 0)
	if err != nil || s.local != local || s.inode == 0 {
		t.Fatalf("findSocketOn = %v (inode %d), %v; want %v", s.local, s.inode, err, local)
	}
}
