package kextemu

import (
	"context"
	"errors"
	"io"
	"net/netip"
	"testing"
	"time"

	"github.com/warden-fw/warden/backend/windowskext/kextproto"
)

func conn(port uint16) kextproto.Connection {
	return kextproto.Connection{ProcessID: 1, Protocol: 6,
		Local:  netip.AddrPortFrom(netip.MustParseAddr("10.0.0.1"), 40000),
		Remote: netip.AddrPortFrom(netip.MustParseAddr("1.2.3.4"), port)}
}

// TestReadBatching checks the driver's read semantics (kext-protocol.md 1.3): as many infos as fit without
// waiting, the one that does not fit split and continued first by the next read.
func TestReadBatching(t *testing.T) {
	d := New(Options{})
	for i := range 3 {
		d.Connect(conn(uint16(i+1)), false) // 40 bytes each
	}
	var lens []int
	var stream []byte
	buf := make([]byte, 60)
	for range 3 {
		n, err := d.Read(buf)
		if err != nil {
			t.Fatal(err)
		}
		lens = append(lens, n)
		stream = append(stream, buf[:n]...)
		if len(stream) == 120 {
			break
		}
	}
	// 40 + 20 of the second; its other 20 + the third 40.
	if len(lens) != 2 || lens[0] != 60 || lens[1] != 60 {
		t.Fatalf("read sizes %v, want [60 60]", lens)
	}
	dec := kextproto.NewDecoder(&sliceReader{stream}, 0)
	for i := range 3 {
		rec, err := dec.Next()
		if err != nil || rec.Conn.Remote.Port() != uint16(i+1) || rec.Conn.ID != uint64(i+1) {
			t.Fatalf("record %d: %+v, %v", i, rec, err)
		}
	}

	// A buffer with no more than a header's room left takes no further info.
	d.Connect(conn(9), false)
	d.Connect(conn(10), false)
	if n, _ := d.Read(make([]byte, 45)); n != 40 {
		t.Fatalf("read with 5 bytes to spare returned %d bytes, want 40", n)
	}
}

type sliceReader struct{ b []byte }

func (r *sliceReader) Read(p []byte) (int, error) {
	if len(r.b) == 0 {
		return 0, io.EOF
	}
	n := copy(p, r.b)
	r.b = r.b[n:]
	return n, nil
}

func TestShutdownEndsReads(t *testing.T) {
	d := New(Options{})
	id := d.Connect(conn(1), false)
	done := make(chan error, 1)
	go func() {
		buf := make([]byte, 100)
		if _, err := d.Read(buf); err != nil { // the queued info
			done <- err
			return
		}
		_, err := d.Read(buf) // blocks until shutdown
		done <- err
	}()
	if _, err := d.Write([]byte{byte(kextproto.CmdShutdown)}); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err != io.EOF {
			t.Fatalf("read after shutdown: %v, want EOF", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("read still blocked after shutdown")
	}
	c := conn(1)
	if v, ok := d.CachedVerdict(c.Protocol, c.Local, c.Remote); !ok || v != kextproto.VerdictPermanentBlock {
		t.Fatalf("pending packet %d after shutdown cached as %v %v, want permanent block", id, v, ok)
	}
}

func TestCommands(t *testing.T) {
	d := New(Options{})
	c := conn(443)
	id := d.Connect(c, false)
	verdict, _ := kextproto.AppendVerdict(nil, id, kextproto.VerdictAccept)
	unknown, _ := kextproto.AppendVerdict(nil, 99, kextproto.VerdictAccept)
	// The driver ignores the local address when updating.
	update, _ := kextproto.AppendUpdate(nil, 6, netip.MustParseAddrPort("192.168.9.9:40000"), c.Remote, kextproto.VerdictPermanentBlock)
	for _, w := range [][]byte{verdict, unknown, update, append(verdict[:len(verdict):len(verdict)], 0)} {
		if n, err := d.Write(w); err != nil || n != len(w) {
			t.Fatalf("write: %d, %v", n, err)
		}
	}
	cmds := d.Commands()
	if len(cmds) != 4 || cmds[0].Err != nil || !errors.Is(cmds[1].Err, ErrUnknownID) || cmds[2].Err != nil || cmds[3].Err == nil {
		t.Fatalf("commands: %+v", cmds)
	}
	if v, ok := d.CachedVerdict(6, c.Local, c.Remote); !ok || v != kextproto.VerdictPermanentBlock {
		t.Fatalf("cache after update: %v %v", v, ok)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if got, err := d.WaitVerdict(ctx, id); err != nil || got.Verdict != kextproto.VerdictAccept {
		t.Fatalf("WaitVerdict: %+v, %v", got, err)
	}
}
