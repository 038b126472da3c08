package splittun

import (
	"encoding/binary"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"
)

// Benchmarks run in-process on loopback: the fake platform plays the pipeline (it records the entry as the
// connection arrives), so "proxy" includes a table Record+Take per connection, as in production.

func sinkServer(b *testing.B) netip.AddrPort {
	return serveTCP(b, "tcp4", "127.0.0.1:0", func(c net.Conn) {
		defer c.Close()
		n, _ := io.Copy(io.Discard, c)
		binary.Write(c, binary.BigEndian, n) // tell the writer everything arrived
	})
}

func BenchmarkTCPBulk(b *testing.B) {
	const chunk = 1 << 20
	buf := make([]byte, chunk)
	run := func(b *testing.B, target netip.AddrPort) {
		c, err := net.DialTCP("tcp4", nil, net.TCPAddrFromAddrPort(target))
		if err != nil {
			b.Fatal(err)
		}
		defer c.Close()
		b.SetBytes(chunk)
		b.ResetTimer()
		for b.Loop() {
			if _, err := c.Write(buf); err != nil {
				b.Fatal(err)
			}
		}
		c.CloseWrite()
		var n int64
		if err := binary.Read(c, binary.BigEndian, &n); err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		if n != int64(b.N)*chunk {
			b.Fatalf("server got %d bytes, want %d", n, int64(b.N)*chunk)
		}
	}
	b.Run("direct", func(b *testing.B) { run(b, sinkServer(b)) })
	b.Run("proxy", func(b *testing.B) {
		h := newHarness(b, Config{})
		h.route(sinkServer(b))
		run(b, h.tcp[0])
	})
}

func udpEcho(b testing.TB) netip.AddrPort {
	pc, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { pc.Close() })
	go func() {
		buf := make([]byte, 2000)
		for {
			n, from, err := pc.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			pc.WriteToUDPAddrPort(buf[:n], from)
		}
	}()
	return unmap(pc.LocalAddr().(*net.UDPAddr).AddrPort())
}

func udpRoundTrips(tb testing.TB, c *net.UDPConn, n int) {
	msg := make([]byte, 64)
	buf := make([]byte, 2000)
	for i := 0; i < n; i++ {
		if _, err := c.Write(msg); err != nil {
			tb.Fatal(err)
		}
		if _, err := c.Read(buf); err != nil {
			tb.Fatal(err)
		}
	}
}

func BenchmarkUDPRequestResponse(b *testing.B) {
	run := func(b *testing.B, target netip.AddrPort) {
		c, err := net.DialUDP("udp4", nil, net.UDPAddrFromAddrPort(target))
		if err != nil {
			b.Fatal(err)
		}
		defer c.Close()
		c.SetReadDeadline(time.Now().Add(time.Minute))
		udpRoundTrips(b, c, 1) // the session exists before timing starts
		b.ReportAllocs()
		b.ResetTimer()
		for b.Loop() {
			udpRoundTrips(b, c, 1)
		}
	}
	b.Run("direct", func(b *testing.B) { run(b, udpEcho(b)) })
	b.Run("proxy", func(b *testing.B) {
		h := newHarness(b, Config{})
		h.route(udpEcho(b))
		run(b, h.udp[0])
	})
}

func BenchmarkTCPConnect(b *testing.B) {
	greeter := func(b *testing.B) netip.AddrPort {
		return serveTCP(b, "tcp4", "127.0.0.1:0", func(c net.Conn) {
			c.Write([]byte{1})
			c.Close()
		})
	}
	run := func(b *testing.B, target netip.AddrPort) {
		one := make([]byte, 1)
		for b.Loop() {
			c, err := net.DialTCP("tcp4", nil, net.TCPAddrFromAddrPort(target))
			if err != nil {
				b.Fatal(err)
			}
			if _, err := io.ReadFull(c, one); err != nil {
				b.Fatal(err)
			}
			c.SetLinger(0) // no TIME_WAIT pile-up across iterations
			c.Close()
		}
	}
	b.Run("direct", func(b *testing.B) { run(b, greeter(b)) })
	b.Run("proxy", func(b *testing.B) {
		h := newHarness(b, Config{})
		h.route(greeter(b))
		run(b, h.tcp[0])
	})
}

// TestUDPRelayAllocs proves the steady-state UDP path (both directions through an existing session) does not
// allocate per packet.
func TestUDPRelayAllocs(t *testing.T) {
	if testing.Short() || raceEnabled {
		t.Skip("allocation count needs a quiet process without the race detector")
	}
	h := newHarness(t, Config{})
	h.route(udpEcho(t))
	c, err := net.DialUDP("udp4", nil, net.UDPAddrFromAddrPort(h.udp[0]))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(time.Minute))
	udpRoundTrips(t, c, 10)
	// AllocsPerRun counts every goroutine's allocations: the client, the echo server and both proxy loops.
	if n := testing.AllocsPerRun(500, func() { udpRoundTrips(t, c, 1) }); n > 0 {
		t.Fatalf("%.1f allocations per UDP round trip through the proxy, want 0", n)
	}
}
