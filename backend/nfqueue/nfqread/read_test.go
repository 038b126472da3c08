package nfqread

import (
	"bytes"
	"encoding/binary"
	"errors"
	"reflect"
	"testing"

	"github.com/warden-fw/warden/backend/nfqueue/nlwire"
)

// attr is one netlink attribute of a test message.
type attr struct {
	typ uint16
	val []byte
}

// message builds a netlink message of type typ with an nfgenmsg for queue and the attributes, each padded to
// 4 bytes as the kernel lays them out.
func message(typ uint16, queue uint16, attrs ...attr) []byte {
	ne := binary.NativeEndian
	b := make([]byte, nlwire.HdrLen, 256)
	ne.PutUint16(b[4:], typ)
	b = append(b, 0, 0, 0, 0)
	binary.BigEndian.PutUint16(b[nlwire.HdrLen+2:], queue)
	for _, a := range attrs {
		var h [4]byte
		ne.PutUint16(h[0:], uint16(4+len(a.val)))
		ne.PutUint16(h[2:], a.typ)
		b = append(append(b, h[:]...), a.val...)
		for len(b)%4 != 0 {
			b = append(b, 0)
		}
	}
	ne.PutUint32(b, uint32(len(b)))
	return b
}

func be32b(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }

const pktType = nfnlSubsysQ<<8 | nfqnlMsgPkt

// packetMsg is a queued packet as the kernel sends it with the UID/GID flag: header, mark, devices, uid, gid
// and a 5-byte payload (so the payload attribute is padded).
func packetMsg(id uint32, hook uint8, payload []byte) []byte {
	hdr := append(be32b(id), 0x08, 0x00, hook)
	// Attribute numbers as linux/netfilter/nfnetlink_queue.h has them (enum nfqnl_attr_type), written out
	// rather than taken from the package's constants so that a wrong constant fails here.
	return message(pktType, 7,
		attr{1, hdr},                         // NFQA_PACKET_HDR
		attr{3, be32b(1710)},                 // NFQA_MARK
		attr{5, be32b(3)},                    // NFQA_IFINDEX_INDEV
		attr{6, be32b(4)},                    // NFQA_IFINDEX_OUTDEV
		attr{14, be32b(1)},                   // NFQA_SKB_INFO, not read
		attr{16, be32b(1000)},                // NFQA_UID
		attr{17, be32b(100)},                 // NFQA_GID
		attr{11 | 1<<15, []byte{4, 0, 1, 0}}, // NFQA_CT with NLA_F_NESTED, not read
		attr{10, payload},                    // NFQA_PAYLOAD
	)
}

func TestParse(t *testing.T) {
	payload := []byte{0x45, 1, 2, 3, 4}
	var p Packet
	if err := Parse(packetMsg(0xdeadbeef, 3, payload), &p); err != nil {
		t.Fatal(err)
	}
	want := Packet{ID: 0xdeadbeef, HWProto: 0x0800, Hook: 3, Queue: 7, Mark: 1710, InDev: 3, OutDev: 4, UID: 1000,
		GID: 100, HasMark: true, HasInDev: true, HasOutDev: true, HasUID: true, HasGID: true}
	got := p
	got.Payload = nil
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("parsed %+v\nwant   %+v", got, want)
	}
	if !bytes.Equal(p.Payload, payload) {
		t.Fatalf("payload %x, want %x (padding must not leak into it)", p.Payload, payload)
	}
}

func TestParseOptionalAttributesAbsent(t *testing.T) {
	var p Packet
	if err := Parse(message(pktType, 1, attr{attrPacketHdr, append(be32b(9), 0x86, 0xdd, 1)}), &p); err != nil {
		t.Fatal(err)
	}
	if p.ID != 9 || p.HWProto != 0x86dd || p.Hook != 1 || p.HasMark || p.HasInDev || p.HasOutDev || p.HasUID ||
		p.Payload != nil {
		t.Fatalf("parsed %+v", p)
	}
}

func TestParseRejects(t *testing.T) {
	good := packetMsg(1, 3, []byte{0x45})
	truncatedAttr := bytes.Clone(good)
	binary.NativeEndian.PutUint16(truncatedAttr[nlwire.HdrLen+nlwire.NfgenHdrLen:], 200) // header attribute runs past the end
	shortHdr := message(pktType, 1, attr{attrPacketHdr, []byte{0, 0, 0, 1, 8, 0}})
	lenPastEnd := bytes.Clone(good)
	binary.NativeEndian.PutUint32(lenPastEnd, uint32(len(good)+4))
	tinyAttr := append(message(pktType, 1), 2, 0, 1, 0)
	binary.NativeEndian.PutUint32(tinyAttr, uint32(len(tinyAttr)))
	for _, tc := range []struct {
		name string
		msg  []byte
		want error
	}{
		{"empty", nil, ErrShort},
		{"header only", good[:nlwire.HdrLen], ErrShort},
		{"length past the end", lenPastEnd, ErrShort},
		{"verdict message", message(nfnlSubsysQ<<8|1, 1, attr{2, make([]byte, 8)}), ErrNotPacket},
		{"no packet header", message(pktType, 1, attr{attrMark, be32b(1)}), ErrNoPacket},
		{"packet header too short", shortHdr, ErrBadAttr},
		{"attribute past the end", truncatedAttr, ErrBadAttr},
		{"attribute length below its header", tinyAttr, ErrBadAttr},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var p Packet
			if err := Parse(tc.msg, &p); !errors.Is(err, tc.want) {
				t.Fatalf("Parse = %v, want %v", err, tc.want)
			}
		})
	}
}

func TestDispatchWalksEveryMessage(t *testing.T) {
	// One datagram: a packet, an acknowledgement, a second packet, a malformed tail.
	ack := message(nlwire.TypeError, 0, attr{0, make([]byte, 16)})
	dgram := append(append(append(packetMsg(1, 3, []byte{0x45}), ack...), packetMsg(2, 1, []byte{0x60})...),
		8, 0, 0, 0, 0, 0, 0, 0) // a message claiming 8 bytes, shorter than a netlink header
	r := &Reader{}
	var ids []uint32
	var hooks []uint8
	r.dispatch(dgram, func(p *Packet) {
		ids = append(ids, p.ID)
		hooks = append(hooks, p.Hook)
	})
	if len(ids) != 2 || ids[0] != 1 || ids[1] != 2 || hooks[0] != 3 || hooks[1] != 1 {
		t.Fatalf("dispatched ids %v hooks %v, want [1 2] [3 1]", ids, hooks)
	}
	if r.Acks.Load() != 1 || r.Malformed.Load() != 1 {
		t.Fatalf("acks %d malformed %d, want 1 and 1", r.Acks.Load(), r.Malformed.Load())
	}
}

func TestConfigMessages(t *testing.T) {
	typ, bodies := ConfigMessages(Config{Queue: 0x0102, CopyRange: 128, MaxQueueLen: 4096, Flags: 0x0c})
	if typ != 0x0302 {
		t.Fatalf("type %#x, want NFNL_SUBSYS_QUEUE<<8 | NFQNL_MSG_CONFIG", typ)
	}
	want := [][]byte{
		// nfgenmsg (AF_UNSPEC, v0, queue 0x0102); NFQA_CFG_CMD {BIND, pad, pf 0}
		{0, 0, 1, 2, 8, 0, 1, 0, 1, 0, 0, 0},
		// NFQA_CFG_PARAMS {copy_range 128 (be32), NFQNL_COPY_PACKET}, length 9, padded to 12
		{0, 0, 1, 2, 9, 0, 2, 0, 0, 0, 0, 128, 2, 0, 0, 0},
		// NFQA_CFG_QUEUE_MAXLEN 4096, NFQA_CFG_MASK 0x0c, NFQA_CFG_FLAGS 0x0c
		{0, 0, 1, 2, 8, 0, 3, 0, 0, 0, 0x10, 0, 8, 0, 4, 0, 0, 0, 0, 0x0c, 8, 0, 5, 0, 0, 0, 0, 0x0c},
	}
	if binary.NativeEndian.Uint16([]byte{1, 0}) != 1 {
		t.Skip("the expected bytes are written for a little-endian host")
	}
	if len(bodies) != len(want) {
		t.Fatalf("%d messages, want %d", len(bodies), len(want))
	}
	for i := range want {
		if !bytes.Equal(bodies[i], want[i]) {
			t.Errorf("message %d:\n got %v\nwant %v", i+1, bodies[i], want[i])
		}
	}
}

func BenchmarkParse(b *testing.B) {
	msg := packetMsg(1, 3, make([]byte, 60))
	var p Packet
	b.ReportAllocs()
	for b.Loop() {
		if err := Parse(msg, &p); err != nil {
			b.Fatal(err)
		}
	}
}

// FuzzParse feeds arbitrary datagrams to the dispatcher: it must never panic or read outside its input, and
// whatever it delivers must be a packet whose payload lies within the datagram.
func FuzzParse(f *testing.F) {
	f.Add(packetMsg(1, 3, []byte{0x45, 0, 0, 20}))
	f.Add(append(packetMsg(1, 3, nil), packetMsg(2, 1, []byte{1})...))
	f.Add(message(nlwire.TypeError, 0, attr{0, make([]byte, 16)}))
	f.Fuzz(func(t *testing.T, dgram []byte) {
		r := &Reader{}
		r.dispatch(dgram, func(p *Packet) {
			if len(p.Payload) > len(dgram) {
				t.Fatalf("payload of %d bytes from a %d-byte datagram", len(p.Payload), len(dgram))
			}
		})
	})
}
