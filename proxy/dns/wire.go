package dns

import (
	"encoding/binary"
	"errors"
	"strings"
)

// The cache keeps answers packed, so a cache hit copies bytes and patches a few fields in place instead of
// unpacking and packing records (which is where the DNS library allocates). These helpers read and patch the
// wire format (RFC 1035 section 4) directly.

const (
	headerLen = 12
	typeOPT   = 41
	// maxLabels bounds a name walk: a valid name has at most 127 labels.
	maxLabels = 128
)

var errMalformed = errors.New("malformed dns message")

// skipName returns the offset just after the (possibly compressed) name at off.
func skipName(msg []byte, off int) (int, error) {
	for range maxLabels {
		if off >= len(msg) {
			return 0, errMalformed
		}
		c := int(msg[off])
		switch c & 0xC0 {
		case 0x00:
			if c == 0 {
				return off + 1, nil
			}
			off += 1 + c
		case 0xC0:
			// A pointer ends the name as far as this message position is concerned.
			if off+2 > len(msg) {
				return 0, errMalformed
			}
			return off + 2, nil
		default:
			return 0, errMalformed // 0x40 and 0x80 label types are obsolete
		}
	}
	return 0, errMalformed
}

// ttlOffsets appends to dst the offset of the TTL field of every resource record in msg except OPT (whose
// TTL field holds EDNS flags). It fails unless the records end exactly where msg ends.
func ttlOffsets(msg []byte, dst []uint16) ([]uint16, error) {
	if len(msg) < headerLen || len(msg) > 0xFFFF {
		return dst, errMalformed
	}
	qd := int(binary.BigEndian.Uint16(msg[4:]))
	rrs := int(binary.BigEndian.Uint16(msg[6:])) + int(binary.BigEndian.Uint16(msg[8:])) +
		int(binary.BigEndian.Uint16(msg[10:]))
	off := headerLen
	var err error
	for range qd {
		if off, err = skipName(msg, off); err != nil {
			return dst, err
		}
		off += 4
		if off > len(msg) {
			return dst, errMalformed
		}
	}
	for range rrs {
		if off, err = skipName(msg, off); err != nil {
			return dst, err
		}
		if off+10 > len(msg) {
			return dst, errMalformed
		}
		if binary.BigEndian.Uint16(msg[off:]) != typeOPT {
			dst = append(dst, uint16(off+4))
		}
		off += 10 + int(binary.BigEndian.Uint16(msg[off+8:]))
		if off > len(msg) {
			return dst, errMalformed
		}
	}
	if off != len(msg) {
		return dst, errMalformed
	}
	return dst, nil
}

// patchQuestionCase rewrites the letters of the first question's name in msg to the case of name (the
// presentation form the client sent), so a client that randomises case (DNS 0x20) sees its own spelling.
// It reports whether it patched; a name with escapes or a mismatch leaves msg unchanged.
func patchQuestionCase(msg []byte, name string) bool {
	if strings.IndexByte(name, '\\') >= 0 || len(msg) < headerLen+1 {
		return false
	}
	name = strings.TrimSuffix(name, ".")
	// First pass: check that the labels line up, so a mismatch never leaves a half-patched name.
	off, rest := headerLen, name
	for rest != "" {
		label, r, _ := strings.Cut(rest, ".")
		if off >= len(msg) || int(msg[off]) != len(label) || len(label) == 0 || off+1+len(label) > len(msg) {
			return false
		}
		off += 1 + len(label)
		rest = r
	}
	if off >= len(msg) || msg[off] != 0 {
		return false
	}
	off, rest = headerLen, name
	for rest != "" {
		label, r, _ := strings.Cut(rest, ".")
		copy(msg[off+1:], label)
		off += 1 + len(label)
		rest = r
	}
	return true
}

// appendOPT appends an EDNS0 OPT record advertising ednsSize (with the DO bit when do is set) and counts it
// in the header.
func appendOPT(msg []byte, do bool) []byte {
	var flags byte
	if do {
		flags = 0x80
	}
	msg = append(msg, 0, 0, typeOPT, byte(ednsSize>>8), byte(ednsSize&0xFF), 0, 0, flags, 0, 0, 0)
	ar := binary.BigEndian.Uint16(msg[10:])
	binary.BigEndian.PutUint16(msg[10:], ar+1)
	return msg
}

// Header flag bits in the second 16-bit word.
const (
	flagQR = 1 << 15
	flagAA = 1 << 10
	flagTC = 1 << 9
	flagRD = 1 << 8
	flagRA = 1 << 7
	flagAD = 1 << 5
	flagCD = 1 << 4
)
