package splittun

import (
	"bytes"
	"io"
	"net"
	"testing"
	"time"
)

// TestTCPRelayGathersBulkAndReleasesTail: a bulk download makes the relay gather, and bytes the sender writes
// once the download has arrived, then waiting without closing, still arrive although they are below the mark.
func TestTCPRelayGathersBulkAndReleasesTail(t *testing.T) {
	h := newHarness(t, Config{})
	const bulk = 32 << 20
	tail := []byte("tail: the sender now waits for an answer")
	for i, fam := range []string{"tcp4", "tcp6"} {
		t.Run(fam, func(t *testing.T) {
			before := h.p.Stats().TCP.BulkGathers
			bulkArrived := make(chan struct{})
			loop := map[string]string{"tcp4": "127.0.0.1:0", "tcp6": "[::1]:0"}[fam]
			dst := serveTCP(t, fam, loop, func(c net.Conn) {
				defer c.Close()
				chunk := bytes.Repeat([]byte{'b'}, 1<<20)
				for range bulk / len(chunk) {
					if _, err := c.Write(chunk); err != nil {
						return
					}
				}
				select {
				case <-bulkArrived: // the relay has nothing left to read: the tail comes alone
				case <-time.After(10 * time.Second):
					return
				}
				if _, err := c.Write(tail); err != nil {
					return
				}
				io.Copy(io.Discard, c) // paused, connection open, until the client is done
			})
			h.route(dst)
			c := h.dialTCP(t, i)
			defer c.Close()
			// Without the gathering deadline the tail would wait for the relay's idle round (minutes).
			c.SetReadDeadline(time.Now().Add(10 * time.Second))
			if n, err := io.CopyN(io.Discard, c, bulk); err != nil {
				t.Fatalf("bulk: %d bytes, %v", n, err)
			}
			close(bulkArrived)
			got := make([]byte, len(tail))
			if _, err := io.ReadFull(c, got); err != nil {
				t.Fatalf("tail: %v", err)
			}
			if !bytes.Equal(got, tail) {
				t.Fatalf("tail %q, want %q", got, tail)
			}
			if g := h.p.Stats().TCP.BulkGathers - before; g == 0 {
				t.Fatalf("a %d MiB download through the relay never gathered", bulk>>20)
			}
		})
	}
}

// TestTCPRelayRequestResponseDoesNotGather: small exchanges never raise the mark, so they are never held back.
func TestTCPRelayRequestResponseDoesNotGather(t *testing.T) {
	h := newHarness(t, Config{})
	h.route(echoServer(t, "tcp4", "127.0.0.1:0", ""))
	c := h.dialTCP(t, 0)
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	msg, got := bytes.Repeat([]byte{'q'}, 1000), make([]byte, 1000)
	for range 200 {
		if _, err := c.Write(msg); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(c, got); err != nil {
			t.Fatal(err)
		}
	}
	if g := h.p.Stats().TCP.BulkGathers; g != 0 {
		t.Fatalf("request and response traffic gathered %d times", g)
	}
}
