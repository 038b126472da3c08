package process

import (
	"encoding/binary"
	"net/netip"
	"testing"
	"time"
)

// Events as the programs write them (see mirror_linux.go).
func ownerEvent(cookie uint64, tgid int32, comm string) []byte {
	var e ownerEntry
	e.tgid, e.seenNs = tgid, 1e9
	copy(e.comm[:], comm)
	v := encodeOwnerValue(e)
	return binary.NativeEndian.AppendUint64(v[:], cookie)
}

func tupleEvent(val uint64, k tupleKey) []byte {
	return append(binary.NativeEndian.AppendUint64(nil, val), k[:]...)
}

func releaseEvent(cookie uint64) []byte { return binary.NativeEndian.AppendUint64(nil, cookie) }

func connectEvent(val, cookie uint64, k tupleKey, tgid int32, comm string) []byte {
	return append(tupleEvent(val, k), ownerEvent(cookie, tgid, comm)...)
}

func testKey(t *testing.T, lport uint16) tupleKey {
	t.Helper()
	k, ok := encodeTupleKey(ipprotoTCP, netip.AddrPortFrom(netip.MustParseAddr("10.0.0.1"), lport),
		netip.MustParseAddrPort("10.0.0.2:443"), true)
	if !ok {
		t.Fatal("key")
	}
	return k
}

func expectMirror(t *testing.T, m *socketMirror, what string, k tupleKey, want mirrorAnswer, tgid int32) {
	t.Helper()
	e, got := m.lookup(&k)
	if got != want || (want == mirrorFound && e.tgid != tgid) {
		t.Errorf("%s: answer %d (tgid %d), want %d (tgid %d)", what, got, e.tgid, want, tgid)
	}
}

func TestSocketMirrorReplaysEvents(t *testing.T) {
	m := newSocketMirror()
	k1, k2 := testKey(t, 1000), testKey(t, 1001)

	expectMirror(t, m, "empty, complete", k1, mirrorNone, 0)
	m.apply(ownerEvent(7, 100, "curl"))
	m.apply(tupleEvent(7, k1))
	expectMirror(t, m, "socket 7 on k1", k1, mirrorFound, 100)
	if e, _ := m.lookup(&k1); string(e.commBytes()) != "curl" {
		t.Errorf("comm %q", e.commBytes())
	}

	// Another process uses the socket: the owner is rewritten.
	m.apply(ownerEvent(7, 200, "child"))
	expectMirror(t, m, "socket 7 rewritten", k1, mirrorFound, 200)

	// Release removes the socket and its first tuple.
	m.apply(releaseEvent(7))
	expectMirror(t, m, "socket 7 released", k1, mirrorNone, 0)
	if len(m.tuples) != 0 || len(m.owners) != 0 {
		t.Errorf("after release: %d tuples, %d owners", len(m.tuples), len(m.owners))
	}

	// A second open socket claiming a key that names an open one: ambiguous, and it stays so even when the
	// program's own ambiguity event and a later claim arrive in either order.
	m.apply(ownerEvent(8, 300, "a"))
	m.apply(ownerEvent(9, 400, "b"))
	m.apply(tupleEvent(8, k2))
	m.apply(tupleEvent(9, k2))
	expectMirror(t, m, "k2 claimed by two open sockets", k2, mirrorNone, 0)
	m.apply(tupleEvent(tupleAmbiguous, k2))
	m.apply(tupleEvent(9, k2))
	expectMirror(t, m, "k2 ambiguous for good", k2, mirrorNone, 0)

	// A closed socket's key is taken over by a new socket.
	k3 := testKey(t, 1002)
	m.apply(tupleEvent(8, k3))
	m.apply(releaseEvent(8))
	m.apply(ownerEvent(10, 500, "new"))
	m.apply(tupleEvent(10, k3))
	expectMirror(t, m, "k3 taken over", k3, mirrorFound, 500)

	// A UDP socket's connect: its user and its tuple in one event.
	k4 := testKey(t, 1003)
	m.apply(connectEvent(13, 13, k4, 700, "dig"))
	expectMirror(t, m, "connect event", k4, mirrorFound, 700)
	// A connect that another open socket's key makes ambiguous.
	m.apply(connectEvent(14, 14, k4, 800, "dig2"))
	expectMirror(t, m, "connect event on an open socket's key", k4, mirrorNone, 0)
	if o, ok := m.owners[14]; !ok || o.e.tgid != 800 {
		t.Errorf("connect event's owner: %+v %v", o, ok)
	}
	// The tuple a connect event reports is its socket's first, which the socket's release removes.
	m2 := newSocketMirror()
	m2.apply(connectEvent(21, 21, k4, 900, "nc"))
	m2.apply(releaseEvent(21))
	if len(m2.tuples) != 0 || len(m2.owners) != 0 {
		t.Errorf("after a connect event and the release: %d tuples, %d owners", len(m2.tuples), len(m2.owners))
	}

	// An event the mirror does not understand: everything it knew may be wrong, so it knows nothing.
	m.apply([]byte{1, 2, 3})
	if m.complete || m.resets != 1 {
		t.Fatalf("after a malformed event: complete %v, resets %d", m.complete, m.resets)
	}
	expectMirror(t, m, "after reset", k3, mirrorUnknown, 0)
	m.apply(ownerEvent(11, 600, "later"))
	m.apply(tupleEvent(11, k1))
	expectMirror(t, m, "learnt after reset", k1, mirrorFound, 600)
	m.apply(tupleEvent(12, k2)) // socket 12 was created before the reset: its owner is unknown here
	expectMirror(t, m, "owner unknown after reset", k2, mirrorUnknown, 0)
}

// TestSocketMirrorBounded checks the mirror stays bounded when sockets send to many peers (tuples release does
// not remove), by pruning closed sockets' tuples.
func TestSocketMirrorBounded(t *testing.T) {
	m := newSocketMirror()
	for i := range mirrorTupleSlack + 10 {
		c := uint64(i + 1)
		m.apply(ownerEvent(c, 1, "x"))
		k := testKey(t, uint16(i))
		k[tupleRemoteOff] = byte(i >> 16) // distinct keys beyond the port's range
		m.apply(tupleEvent(c, k))
		k[tupleRPortOff] = 1 // a second peer: stays after release, until pruned
		m.apply(tupleEvent(c, k))
		m.apply(releaseEvent(c))
	}
	if n := len(m.tuples); n > mirrorTupleSlack {
		t.Fatalf("%d tuples held for no open socket", n)
	}
	if !m.complete || m.resets != 0 {
		t.Fatalf("pruning closed sockets' tuples made the mirror incomplete (resets %d)", m.resets)
	}
	// Open sockets' tuples survive a prune.
	m.apply(ownerEvent(1<<40, 9, "open"))
	open := testKey(t, 7)
	open[tupleLocalOff] = 0xfe
	m.apply(tupleEvent(1<<40, open))
	for i := range mirrorTupleSlack {
		k := testKey(t, uint16(i))
		k[tupleLocalOff] = 0xfd
		m.apply(tupleEvent(uint64(1<<41+i), k)) // sockets the mirror never saw open
	}
	expectMirror(t, m, "open socket after pruning", open, mirrorFound, 9)
}

func FuzzSocketMirror(f *testing.F) {
	f.Add(ownerEvent(1, 2, "a"), tupleEvent(1, tupleKey{}), releaseEvent(1))
	f.Add(connectEvent(1, 1, tupleKey{}, 2, "a"), connectEvent(2, 2, tupleKey{}, 3, "b"), releaseEvent(1))
	f.Fuzz(func(t *testing.T, a, b, c []byte) {
		m := newSocketMirror()
		for _, ev := range [][]byte{a, b, c, a} {
			m.apply(ev)
		}
		var k tupleKey
		m.lookup(&k)
	})
}

// TestNextSyncWait checks the ring reader's pacing: an idle ring is read ever more rarely, up to once a
// second; a filling one often enough that it would be at most a quarter full at the next read.
func TestNextSyncWait(t *testing.T) {
	const size = 1 << 17
	wait := mirrorSyncMin
	for range 10 {
		wait = nextSyncWait(wait, 0, size)
	}
	if wait != mirrorSyncMax {
		t.Errorf("idle ring: wait %v after ten empty reads, want %v", wait, mirrorSyncMax)
	}
	for _, c := range []struct {
		wait    time.Duration
		drained int
		want    time.Duration
	}{
		{time.Second, size / 8, time.Second},                       // a quarter would take 2 s: capped at 1 s
		{200 * time.Millisecond, size / 4, 200 * time.Millisecond}, // a quarter in 200 ms: keep it
		{time.Second, size / 2, 500 * time.Millisecond},            // half in 1 s: read twice as often
		{time.Second, size, 250 * time.Millisecond},                // full in 1 s
		{10 * time.Millisecond, size, mirrorSyncMin},               // full in 10 ms: 2.5 ms, floored
		{100 * time.Millisecond, 100, 200 * time.Millisecond},      // a trickle: grow, at most twice
	} {
		if got := nextSyncWait(c.wait, c.drained, size); got != c.want {
			t.Errorf("after %v with %d bytes drained: wait %v, want %v", c.wait, c.drained, got, c.want)
		}
	}
	if got := nextSyncWait(mirrorSyncMin, 5, 0); got != 2*mirrorSyncMin {
		t.Errorf("closed ring: wait %v, want %v", got, 2*mirrorSyncMin)
	}
}
