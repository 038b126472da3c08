package process

import "encoding/binary"

// The socket mirror: the kernel programs report every write to the owner and tuple maps, and every socket
// release, as events in a BPF ring buffer (see ebpf_linux.go), and user space replays them into Go maps. An
// outbound connection is then resolved without any system call: the ring is shared memory, read in place.
// The BPF maps stay the reference: whenever the mirror may have missed an event (the ring was full, or the
// mirror was cleared to bound its size), it says so and lookups it cannot answer go to the maps.
//
// Events are told apart by their length, which is the layout of the programs' stack frame they copy:
//
//	ownerEventSize:   owner value (ownerValueSize bytes, see ownermap.go), then the u64 socket cookie
//	tupleEventSize:   u64 tuple value (a cookie, or tupleAmbiguous), then the tuple key (tupleKeySize bytes)
//	releaseEventSize: u64 socket cookie
//	connectEventSize: a tuple event, then an owner event (a UDP socket's connect: its user and its tuple)
const (
	ownerEventSize   = ownerValueSize + ownerKeySize
	tupleEventSize   = tupleValueSize + tupleKeySize
	releaseEventSize = ownerKeySize
	connectEventSize = tupleEventSize + ownerEventSize
)

// mirrorMaxSockets bounds the mirror's owner entries (open sockets) and, with mirrorTupleSlack, its tuple
// entries; beyond them it is cleared and marked incomplete.
const (
	mirrorMaxSockets = 1 << 18
	mirrorTupleSlack = 1 << 16
)

type tupleKey = [tupleKeySize]byte

// mirrorOwner is a mirrored owner entry and the first tuple recorded for its socket, forgotten with it. It
// holds no pointer, and neither do the mirror's maps: the garbage collector never scans them.
type mirrorOwner struct {
	e        ownerEntry
	tuple    tupleKey
	hasTuple bool
}

// socketMirror replays the programs' events. It is not safe for concurrent use; the Linux ring reader
// serialises access.
type socketMirror struct {
	owners map[uint64]mirrorOwner
	tuples map[tupleKey]uint64
	// complete is true while the mirror has seen every event since the maps were created: a key it lacks is
	// then absent from the maps too.
	complete bool
	resets   uint64
}

func newSocketMirror() *socketMirror {
	return &socketMirror{owners: make(map[uint64]mirrorOwner), tuples: make(map[tupleKey]uint64), complete: true}
}

// apply replays one event. An event of unknown length (a bug) makes the mirror incomplete rather than wrong.
func (m *socketMirror) apply(ev []byte) {
	ne := binary.NativeEndian
	switch len(ev) {
	case connectEventSize:
		// The owner first: the tuple is the socket's, whose user the event names.
		m.apply(ev[tupleEventSize:])
		m.apply(ev[:tupleEventSize])
	case ownerEventSize:
		cookie := ne.Uint64(ev[ownerValueSize:])
		e := decodeOwnerValue((*[ownerValueSize]byte)(ev[:ownerValueSize]))
		o, ok := m.owners[cookie]
		if !ok && len(m.owners) >= mirrorMaxSockets {
			m.reset()
		}
		o.e = e
		m.owners[cookie] = o
	case tupleEventSize:
		val := ne.Uint64(ev[:tupleValueSize])
		k := tupleKey(ev[tupleValueSize:])
		if cur, ok := m.tuples[k]; ok && cur != val {
			if cur == tupleAmbiguous {
				// Ambiguity is final in the map too; events of racing writers may arrive in either order.
				return
			}
			if _, open := m.owners[cur]; open {
				// Another open socket has this key: what the program does when it sees that, and it may not
				// have (the LRU map evicted the other entry). Or the other socket's release event is still
				// on its way: then the key is needlessly left to sock_diag.
				val = tupleAmbiguous
			}
		}
		if len(m.tuples) >= len(m.owners)+mirrorTupleSlack {
			m.prune()
		}
		m.tuples[k] = val
		if o, ok := m.owners[val]; ok && !o.hasTuple {
			o.tuple, o.hasTuple = k, true
			m.owners[val] = o
		}
	case releaseEventSize:
		cookie := ne.Uint64(ev)
		o, ok := m.owners[cookie]
		if !ok {
			return
		}
		delete(m.owners, cookie)
		if o.hasTuple && m.tuples[o.tuple] == cookie {
			delete(m.tuples, o.tuple)
		}
	default:
		m.reset()
	}
}

// prune drops tuples whose socket is closed (a UDP socket's further peers, which release does not remove),
// and everything when that is not enough.
func (m *socketMirror) prune() {
	for k, c := range m.tuples {
		if _, open := m.owners[c]; !open && c != tupleAmbiguous {
			delete(m.tuples, k)
		}
	}
	if len(m.tuples) >= len(m.owners)+mirrorTupleSlack/2 {
		m.reset()
	}
}

// reset forgets everything; lookups then go to the BPF maps for what the mirror does not learn afresh.
func (m *socketMirror) reset() {
	clear(m.owners)
	clear(m.tuples)
	m.complete = false
	m.resets++
}

// mirrorAnswer is what the mirror knows of a tuple.
type mirrorAnswer int

const (
	mirrorUnknown mirrorAnswer = iota // ask the maps
	mirrorNone                        // no open socket, or a shared key: the maps would say the same
	mirrorFound
)

// lookup resolves a tuple to its socket's owner entry.
func (m *socketMirror) lookup(k *tupleKey) (ownerEntry, mirrorAnswer) {
	c, ok := m.tuples[*k]
	if !ok {
		if m.complete {
			return ownerEntry{}, mirrorNone
		}
		return ownerEntry{}, mirrorUnknown
	}
	if c == tupleAmbiguous {
		return ownerEntry{}, mirrorNone
	}
	o, ok := m.owners[c]
	if !ok {
		if m.complete {
			return ownerEntry{}, mirrorNone // closed
		}
		return ownerEntry{}, mirrorUnknown
	}
	return o.e, mirrorFound
}
