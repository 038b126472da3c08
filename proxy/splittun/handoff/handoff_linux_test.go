package handoff

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/warden-fw/warden/backend/netnstest"
)

// pair is a loopback connection made the way the proxy sees one: client dials the listener, relay is the
// accepted end. No DNAT here, so the "original destination" is the listener itself.
type pair struct {
	client, relay      *net.TCPConn
	clientEP, original netip.AddrPort
}

func connect(h *Handoff, clientEP netip.AddrPort, expect bool) (*pair, error) {
	ln, err := net.ListenTCP("tcp", net.TCPAddrFromAddrPort(netip.MustParseAddrPort("127.0.0.1:0")))
	if err != nil {
		return nil, err
	}
	defer ln.Close()
	original := ln.Addr().(*net.TCPAddr).AddrPort()
	if expect {
		if err := h.Expect(clientEP, original); err != nil {
			return nil, err
		}
	}
	d := net.Dialer{LocalAddr: net.TCPAddrFromAddrPort(clientEP), Timeout: 5 * time.Second}
	c, err := d.Dial("tcp", original.String())
	if err != nil {
		return nil, err
	}
	r, err := ln.AcceptTCP()
	if err != nil {
		c.Close()
		return nil, err
	}
	return &pair{client: c.(*net.TCPConn), relay: r, clientEP: clientEP, original: original}, nil
}

// tcpInfo reads c's TCP_INFO.
func tcpInfo(c *net.TCPConn) (*unix.TCPInfo, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return nil, err
	}
	var info *unix.TCPInfo
	var ierr error
	if err := rc.Control(func(fd uintptr) { info, ierr = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO) }); err != nil {
		return nil, err
	}
	return info, ierr
}

// bytesSent is what c's TCP has sent (tcpi_bytes_sent).
func bytesSent(c *net.TCPConn) (uint64, error) {
	info, err := tcpInfo(c)
	if err != nil {
		return 0, err
	}
	return info.Bytes_sent, nil
}

// attached is an expected connection from clientEP, paired by Attach.
func attached(h *Handoff, clientEP string) (*pair, *Client, error) {
	p, err := connect(h, netip.MustParseAddrPort(clientEP), true)
	if err != nil {
		return nil, nil, err
	}
	hc, err := h.Attach(p.relay, p.clientEP, p.original)
	if err != nil {
		p.close()
		return nil, nil, fmt.Errorf("attach: %w", err)
	}
	return p, hc, nil
}

func (p *pair) close() {
	p.client.Close()
	p.relay.Close()
}

// inNamespace runs f in a fresh namespace with the handoff loaded there; f's error fails the test.
func inNamespace(t *testing.T, f func(h *Handoff) error) {
	netnstest.RequireRoot(t)
	ns := "wd-ho-" + netnstest.Suffix()
	netnstest.NewNS(t, ns)
	var err error
	netnstest.InNS(t, ns, func() {
		var h *Handoff
		if h, err = Load(); err != nil {
			return
		}
		defer h.Close()
		err = f(h)
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestHandoffDelivers: what the relay writes after Attach reaches the application in order, with the
// relay's FIN after it; Queued sees what the application has not read; the application's own writes still
// reach the relay over the loopback connection.
func TestHandoffDelivers(t *testing.T) {
	inNamespace(t, func(h *Handoff) error {
		p, hc, err := attached(h, "127.0.0.2:40123")
		if err != nil {
			return err
		}
		defer p.close()
		defer hc.Detach()

		// A handed-off write is queued at the application by the time Write returns.
		first := bytes.Repeat([]byte("q"), 1<<20)
		if _, err := p.relay.Write(first); err != nil {
			return err
		}
		q, err := hc.Queued()
		if err != nil || q < len(first) {
			return fmt.Errorf("queued %d (%v) after a %d-byte write, want at least that", q, err, len(first))
		}
		// ... and never went out over the loopback connection.
		if sent, err := bytesSent(p.relay); err != nil || sent != 0 {
			return fmt.Errorf("the relay's TCP sent %d bytes (%v), want 0: the write was not handed off", sent, err)
		}
		got := make([]byte, len(first))
		if _, err := io.ReadFull(p.client, got); err != nil || !bytes.Equal(got, first) {
			return fmt.Errorf("first block: %v (equal %v)", err, bytes.Equal(got, first))
		}
		if q, err := hc.Queued(); err != nil || q != 0 {
			return fmt.Errorf("queued %d (%v) after reading everything, want 0", q, err)
		}

		// Uploads: unchanged.
		if _, err := p.client.Write([]byte("up")); err != nil {
			return err
		}
		up := make([]byte, 2)
		if _, err := io.ReadFull(p.relay, up); err != nil || string(up) != "up" {
			return fmt.Errorf("upload: %q %v", up, err)
		}

		// A large download in many writes of odd sizes, then the relay's FIN: everything arrives, in order,
		// before the end.
		want := make([]byte, 16<<20)
		rng := rand.New(rand.NewPCG(1, 2))
		for i := range want {
			want[i] = byte(rng.Uint32())
		}
		werr := make(chan error, 1)
		go func() {
			rest := want
			for len(rest) > 0 {
				n := min(len(rest), 1+rng.IntN(200_000))
				if _, err := p.relay.Write(rest[:n]); err != nil {
					werr <- err
					return
				}
				rest = rest[n:]
			}
			werr <- p.relay.CloseWrite()
		}()
		p.client.SetReadDeadline(time.Now().Add(30 * time.Second))
		all, err := io.ReadAll(p.client)
		if err := <-werr; err != nil {
			return fmt.Errorf("relay writes: %w", err)
		}
		if err != nil {
			return fmt.Errorf("reading the download: %w", err)
		}
		if !bytes.Equal(all, want) {
			return fmt.Errorf("download of %d bytes came as %d different bytes", len(want), len(all))
		}
		return nil
	})
}

// TestHandoffOnlyExpected: a connection nobody expected is not paired, and its traffic is untouched.
func TestHandoffOnlyExpected(t *testing.T) {
	inNamespace(t, func(h *Handoff) error {
		p, err := connect(h, netip.MustParseAddrPort("127.0.0.2:40124"), false)
		if err != nil {
			return err
		}
		defer p.close()
		if hc, err := h.Attach(p.relay, p.clientEP, p.original); !errors.Is(err, ErrNotPaired) {
			if hc != nil {
				hc.Detach()
			}
			return fmt.Errorf("attach of an unexpected connection: %v, want ErrNotPaired", err)
		}
		if _, err := p.relay.Write([]byte("plain")); err != nil {
			return err
		}
		if sent, err := bytesSent(p.relay); err != nil || sent != 5 {
			return fmt.Errorf("the relay's TCP sent %d bytes (%v), want 5", sent, err)
		}
		got := make([]byte, 5)
		if _, err := io.ReadFull(p.client, got); err != nil || string(got) != "plain" {
			return fmt.Errorf("plain connection: %q %v", got, err)
		}
		return nil
	})
}

// TestHandoffDrain: Drain reports an application holding unread handed-off data while its context allows no
// wait, waits for it to read otherwise, and finds nothing pending once it has.
func TestHandoffDrain(t *testing.T) {
	inNamespace(t, func(h *Handoff) error {
		p, hc, err := attached(h, "127.0.0.2:40125")
		if err != nil {
			return err
		}
		defer p.close()
		hc.Detach() // the session is over; the data stays with the application
		block := bytes.Repeat([]byte("d"), 256<<10)
		if _, err := p.relay.Write(block); err != nil {
			return err
		}
		done, cancel := context.WithCancel(context.Background())
		cancel()
		if n := h.Drain(done); n != 1 {
			return fmt.Errorf("drain without time: %d pending, want 1", n)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		drained := make(chan int, 1)
		go func() { drained <- h.Drain(ctx) }()
		select {
		case n := <-drained:
			return fmt.Errorf("drain returned %d before the application read", n)
		default:
		}
		if _, err := io.ReadFull(p.client, make([]byte, len(block))); err != nil {
			return err
		}
		if n := <-drained; n != 0 {
			return fmt.Errorf("drain after the application read everything: %d pending", n)
		}
		return nil
	})
}

// TestHandoffDataOutlivesClose: an application that half-closed first still reads everything handed off after
// the relay's FIN has closed the connection in both directions (its socket is in CLOSE, still in the map).
func TestHandoffDataOutlivesClose(t *testing.T) {
	inNamespace(t, func(h *Handoff) error {
		p, hc, err := attached(h, "127.0.0.2:40127")
		if err != nil {
			return err
		}
		defer p.close()
		defer hc.Detach()
		if err := p.client.CloseWrite(); err != nil {
			return err
		}
		block := bytes.Repeat([]byte("x"), 1<<20)
		if _, err := p.relay.Write(block); err != nil {
			return err
		}
		if err := p.relay.CloseWrite(); err != nil {
			return err
		}
		// No event says the FIN has been processed: look at the state, bounded.
		const tcpClose = 7
		var state uint8
		for deadline := time.Now().Add(5 * time.Second); state != tcpClose; time.Sleep(2 * time.Millisecond) {
			if time.Now().After(deadline) {
				return fmt.Errorf("the application socket stayed in state %d", state)
			}
			info, err := tcpInfo(p.client)
			if err != nil {
				return err
			}
			state = info.State
		}
		got, err := io.ReadAll(p.client)
		if err != nil || !bytes.Equal(got, block) {
			return fmt.Errorf("after the close: read %d of %d bytes, err %v", len(got), len(block), err)
		}
		return nil
	})
}

// TestHandoffAfterClose: a Handoff used after Close answers ErrClosed instead of touching freed maps.
func TestHandoffAfterClose(t *testing.T) {
	inNamespace(t, func(h *Handoff) error {
		p, hc, err := attached(h, "127.0.0.2:40128")
		if err != nil {
			return err
		}
		defer p.close()
		if err := h.Close(); err != nil {
			return err
		}
		hc.Detach()
		if err := h.Expect(p.clientEP, p.original); !errors.Is(err, ErrClosed) {
			return fmt.Errorf("Expect after Close: %v", err)
		}
		if _, err := h.Attach(p.relay, p.clientEP, p.original); !errors.Is(err, ErrClosed) {
			return fmt.Errorf("Attach after Close: %v", err)
		}
		if _, err := hc.Queued(); err == nil {
			return fmt.Errorf("Queued after Close answered")
		}
		if n := h.Drain(context.Background()); n != 0 {
			return fmt.Errorf("Drain after Close: %d", n)
		}
		return nil
	})
}
