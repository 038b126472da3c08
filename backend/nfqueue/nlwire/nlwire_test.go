package nlwire

import (
	"encoding/binary"
	"errors"
	"testing"
)

func msgBytes(typ, flags uint16, seq uint32, payload []byte) []byte {
	return AppendMsg(nil, typ, flags, seq, payload)
}

func attrBytes(typ uint16, val []byte) []byte { return AppendAttr(nil, typ, val) }

func TestNext(t *testing.T) {
	errPayload := binary.NativeEndian.AppendUint32(nil, uint32(0xfffffffe)) // -ENOENT
	buf := append(msgBytes(20, 2, 5, []byte{1, 2, 3}), msgBytes(TypeError, 0, 6, errPayload)...)
	m1, rest, err := Next(buf)
	if err != nil || m1.Type != 20 || m1.Flags != 2 || m1.Seq != 5 || string(m1.Payload) != "\x01\x02\x03" {
		t.Fatalf("first message: %+v, %v", m1, err)
	}
	m2, rest, err := Next(rest)
	if err != nil || m2.Type != TypeError || m2.Seq != 6 || rest != nil {
		t.Fatalf("second message: %+v, rest %d bytes, %v", m2, len(rest), err)
	}
	if errno, err := Errno(m2.Payload); errno != 2 || err != nil {
		t.Fatalf("Errno = %d, %v; want 2 (ENOENT)", errno, err)
	}
	if _, err := Errno([]byte{1, 2}); !errors.Is(err, ErrTruncated) {
		t.Errorf("Errno of 2 bytes: %v, want ErrTruncated", err)
	}
	for _, bad := range [][]byte{buf[:10], buf[:HdrLen+1], {8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}} {
		if _, _, err := Next(bad); !errors.Is(err, ErrTruncated) {
			t.Errorf("Next(%x) = %v, want ErrTruncated", bad, err)
		}
	}
}

func TestNextAttr(t *testing.T) {
	// A nested attribute (flag set) of 3 bytes, padded, then one of 1 byte whose padding is missing.
	b := append(attrBytes(7|attrFNested, []byte{1, 2, 3}), attrBytes(9, []byte{4})[:AttrHdrLen+1]...)
	typ, val, rest, ok := NextAttr(b)
	if !ok || typ != 7 || string(val) != "\x01\x02\x03" || len(rest) != AttrHdrLen+1 {
		t.Fatalf("first attribute: %d %x, rest %d bytes, ok %v", typ, val, len(rest), ok)
	}
	typ, val, rest, ok = NextAttr(rest)
	if !ok || typ != 9 || string(val) != "\x04" || rest != nil {
		t.Fatalf("last attribute without padding: %d %x, rest %x, ok %v", typ, val, rest, ok)
	}
	for _, bad := range [][]byte{nil, {5, 0, 1}, {3, 0, 1, 0}, {9, 0, 1, 0, 0}} {
		if _, _, _, ok := NextAttr(bad); ok {
			t.Errorf("NextAttr(%x) accepted", bad)
		}
	}
}

// FuzzWalk: no input panics, and each step consumes input, so a walk ends.
func FuzzWalk(f *testing.F) {
	f.Add(msgBytes(20, 2, 5, attrBytes(1, []byte{1, 2, 3})))
	f.Fuzz(func(t *testing.T, b []byte) {
		for rest := b; len(rest) > 0; {
			m, next, err := Next(rest)
			if err != nil {
				break
			}
			if len(next) >= len(rest) {
				t.Fatalf("Next consumed nothing of %d bytes", len(rest))
			}
			for attrs := m.Payload; len(attrs) > 0; {
				_, _, r, ok := NextAttr(attrs)
				if !ok {
					break
				}
				if len(r) >= len(attrs) {
					t.Fatalf("NextAttr consumed nothing of %d bytes", len(attrs))
				}
				attrs = r
			}
			rest = next
		}
	})
}
