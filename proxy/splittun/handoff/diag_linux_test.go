package handoff

import (
	"encoding/binary"
	"errors"
	"net/netip"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/warden-fw/warden/backend/nfqueue/nlwire"
	"github.com/warden-fw/warden/backend/nfqueue/sockdiag"
)

// answer builds a SOCK_DIAG_BY_FAMILY answer: an inet_diag_msg and, when meminfo is set, an
// INET_DIAG_SKMEMINFO attribute opening with rmem.
func answer(meminfo bool, rmem uint32) []byte {
	payload := make([]byte, sockdiag.MsgLen)
	if meminfo {
		ne := binary.NativeEndian
		payload = nlwire.AppendAttr(payload, inetDiagSKMemInfo, ne.AppendUint32(ne.AppendUint32(nil, rmem), 131072)) // rcvbuf
	}
	return nlwire.AppendMsg(nil, sockdiag.ByFamily, 0, 0, payload)
}

func errAnswer(errno unix.Errno) []byte {
	return nlwire.AppendMsg(nil, nlwire.TypeError, 0, 0, binary.NativeEndian.AppendUint32(nil, uint32(-int32(errno))))
}

func TestParseQueued(t *testing.T) {
	if q, err := parseQueued(answer(true, 12345)); err != nil || q != 12345 {
		t.Errorf("memory info answer: %d, %v; want 12345", q, err)
	}
	if _, err := parseQueued(answer(false, 0)); err == nil {
		t.Error("an answer without memory info parsed")
	}
	if _, err := parseQueued(errAnswer(unix.ENOENT)); !errors.Is(err, unix.ENOENT) {
		t.Errorf("ENOENT answer: %v", err)
	}
	if _, err := parseQueued(answer(true, 1)[:20]); err == nil {
		t.Error("a truncated answer parsed")
	}
}

func TestDiagRequest(t *testing.T) {
	for _, tt := range []struct {
		client, original string
		family           uint8
	}{
		{"10.0.0.1:40000", "192.0.2.10:80", unix.AF_INET},
		{"[fd00::1]:40000", "[2001:db8::10]:80", unix.AF_INET6},
	} {
		r := queuedRequest(netip.MustParseAddrPort(tt.client), netip.MustParseAddrPort(tt.original), 0x1122334455667788)
		b := sockdiag.AppendRequest(nil, 0, &r)
		if len(b) != nlwire.HdrLen+sockdiag.RequestLen {
			t.Fatalf("%s: request of %d bytes", tt.client, len(b))
		}
		req := b[nlwire.HdrLen:]
		if req[0] != tt.family || req[1] != unix.IPPROTO_TCP || req[2] != 1<<(inetDiagSKMemInfo-1) {
			t.Errorf("%s: family %d proto %d ext %#x", tt.client, req[0], req[1], req[2])
		}
		if sport, dport := binary.BigEndian.Uint16(req[8:]), binary.BigEndian.Uint16(req[10:]); sport != 40000 || dport != 80 {
			t.Errorf("%s: ports %d %d", tt.client, sport, dport)
		}
		if c := uint64(binary.NativeEndian.Uint32(req[48:])) | uint64(binary.NativeEndian.Uint32(req[52:]))<<32; c != 0x1122334455667788 {
			t.Errorf("%s: cookie %#x", tt.client, c)
		}
	}
}

// FuzzParseQueued: no answer, however malformed, panics the proxy's relay, and only a socket answer long
// enough to hold an inet_diag_msg and a memory info attribute yields a value.
func FuzzParseQueued(f *testing.F) {
	f.Add(answer(true, 7))
	f.Add(errAnswer(unix.ENOENT))
	f.Add(answer(false, 0))
	f.Fuzz(func(t *testing.T, b []byte) {
		if _, err := parseQueued(b); err == nil {
			if len(b) < nlwire.HdrLen+sockdiag.MsgLen+nlwire.AttrHdrLen+4 || binary.NativeEndian.Uint16(b[4:6]) != sockdiag.ByFamily {
				t.Fatalf("a value from %d bytes of type %d", len(b), binary.NativeEndian.Uint16(b[4:6]))
			}
		}
	})
}
