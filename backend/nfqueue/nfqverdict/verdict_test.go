package nfqverdict

import (
	"encoding/binary"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// TestEncode checks the messages byte for byte against the kernel's structures, written out by hand.
func TestEncode(t *testing.T) {
	ne := func(v uint32, size int) []byte {
		b := make([]byte, size)
		if size == 2 {
			binary.NativeEndian.PutUint16(b, uint16(v))
		} else {
			binary.NativeEndian.PutUint32(b, v)
		}
		return b
	}
	cat := func(parts ...[]byte) []byte {
		var out []byte
		for _, p := range parts {
			out = append(out, p...)
		}
		return out
	}
	accept := cat(
		ne(40, 4), ne(0x0301, 2), ne(1, 2), ne(0, 4), ne(0, 4), // nlmsghdr: NFNL_SUBSYS_QUEUE<<8 | NFQNL_MSG_VERDICT, NLM_F_REQUEST
		[]byte{0, 0, 0x06, 0xa4},                                                // nfgenmsg: AF_UNSPEC, NFNETLINK_V0, queue 1700 big-endian
		ne(12, 2), ne(2, 2), []byte{0, 0, 0, 1}, []byte{0x12, 0x34, 0x56, 0x78}, // NFQA_VERDICT_HDR: NF_ACCEPT, id
		ne(8, 2), ne(3, 2), []byte{0, 0, 0x06, 0xae}, // NFQA_MARK 1710
	)
	var b [MsgSize]byte
	n := Encode(&b, 0, 1700, 0x12345678, 1710, false)
	if diff := cmp.Diff(accept, b[:n]); diff != "" {
		t.Errorf("accept: -want +got\n%s", diff)
	}
	repeat := cat(
		ne(32, 4), ne(0x0301, 2), ne(1, 2), ne(0, 4), ne(0, 4),
		[]byte{2, 0, 0x06, 0xa5},                                    // AF_INET, queue 1701
		ne(12, 2), ne(2, 2), []byte{0, 0, 0, 4}, []byte{0, 0, 0, 9}, // NF_REPEAT, id 9
	)
	b = [MsgSize]byte{}
	n = Encode(&b, 2, 1701, 9, 1710, true)
	if diff := cmp.Diff(repeat, b[:n]); diff != "" {
		t.Errorf("repeat: -want +got\n%s", diff)
	}
}

func BenchmarkEncode(b *testing.B) {
	var buf [MsgSize]byte
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		Encode(&buf, 0, 1700, uint32(i), 1710, false)
	}
}
