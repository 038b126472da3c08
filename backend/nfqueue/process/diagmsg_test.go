package process

import (
	"encoding/binary"
	"net/netip"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/warden-fw/warden/backend/nfqueue/nlwire"
	"github.com/warden-fw/warden/backend/nfqueue/sockdiag"
)

// diagMsgBytes encodes an inet_diag_msg the way the kernel does, plus attributes.
func diagMsgBytes(s sockInfo, attrs ...[]byte) []byte {
	ne := binary.NativeEndian
	b := []byte{s.family, s.state, 0, 0}
	b = binary.BigEndian.AppendUint16(b, s.local.Port())
	b = binary.BigEndian.AppendUint16(b, s.remote.Port())
	b = sockdiag.AppendAddr(b, s.local.Addr())
	b = sockdiag.AppendAddr(b, s.remote.Addr())
	b = ne.AppendUint32(b, s.ifindex)
	b = ne.AppendUint32(b, uint32(s.cookie))     // idiag_cookie[0]: low half
	b = ne.AppendUint32(b, uint32(s.cookie>>32)) // idiag_cookie[1]: high half
	b = ne.AppendUint32(b, 0)                    // expires
	b = ne.AppendUint32(b, 0)                    // rqueue
	b = ne.AppendUint32(b, 0)                    // wqueue
	b = ne.AppendUint32(b, s.uid)
	b = ne.AppendUint32(b, s.inode)
	for _, a := range attrs {
		b = append(b, a...)
	}
	return b
}

func attr(typ uint16, data ...byte) []byte { return nlwire.AppendAttr(nil, typ, data) }

func TestParseDiagMsg(t *testing.T) {
	v4 := sockInfo{family: afInet, state: 1, local: netip.MustParseAddrPort("127.0.0.1:5000"), remote: netip.MustParseAddrPort("10.1.2.3:443"), ifindex: 2, uid: 1000, inode: 424242, cookie: 0x0000000100000002, v6only: -1}
	v6 := sockInfo{family: afInet6, state: tcpListen, local: netip.MustParseAddrPort("[::]:22"), remote: netip.MustParseAddrPort("[::]:0"), uid: 0, inode: 7, cookie: 0xfedcba9876543210, v6only: 0}
	v6only := v6
	v6only.v6only = 1
	tests := []struct {
		name    string
		in      []byte
		want    sockInfo
		wantErr bool
	}{
		{"ipv4 no attributes", diagMsgBytes(v4), v4, false},
		{"ipv4 ignores v6only", diagMsgBytes(v4, attr(inetDiagSKV6Only, 1)), v4, false},
		{"ipv6 dual-stack", diagMsgBytes(v6, attr(1, 9, 9, 9, 9, 9), attr(inetDiagSKV6Only, 0)), v6, false},
		{"ipv6 only", diagMsgBytes(v6, attr(inetDiagSKV6Only, 1)), v6only, false},
		{"short", diagMsgBytes(v4)[:sizeofDiagMsg-1], sockInfo{}, true},
		{"bad family", append([]byte{3}, diagMsgBytes(v4)[1:]...), sockInfo{}, true},
		{"attribute too long", diagMsgBytes(v4, []byte{200, 0, 1, 0}), sockInfo{}, true},
		{"attribute too short", diagMsgBytes(v4, []byte{2, 0, 1, 0}), sockInfo{}, true},
	}
	for _, tt := range tests {
		got, err := parseDiagMsg(tt.in)
		if (err != nil) != tt.wantErr {
			t.Errorf("%s: err = %v, want error %v", tt.name, err, tt.wantErr)
		}
		if diff := cmp.Diff(tt.want, got, cmp.AllowUnexported(sockInfo{}), cmp.Comparer(func(a, b netip.AddrPort) bool { return a == b })); diff != "" {
			t.Errorf("%s: -want +got\n%s", tt.name, diff)
		}
	}
}

func nlMsgBytes(typ, flags uint16, seq uint32, payload []byte) []byte {
	return nlwire.AppendMsg(nil, typ, flags, seq, payload)
}

// FuzzDiagAnswer feeds arbitrary bytes through the decoding a netlink answer goes through.
func FuzzDiagAnswer(f *testing.F) {
	v4 := sockInfo{family: afInet, local: netip.MustParseAddrPort("127.0.0.1:5000"), remote: netip.MustParseAddrPort("10.1.2.3:443"), inode: 1}
	f.Add(nlMsgBytes(sockDiagByFamily, 0, 1, diagMsgBytes(v4)))
	f.Add(nlMsgBytes(sockDiagByFamily, 0, 1, diagMsgBytes(sockInfo{family: afInet6}, attr(inetDiagSKV6Only, 1))))
	f.Add(nlMsgBytes(nlwire.TypeDone, 0, 1, nil))
	f.Fuzz(func(t *testing.T, b []byte) {
		// Each message takes at least a header's worth of the input; bounded by its first length, not by what is
		// left (the fuzzer found that comparing with the shrinking rest failed on a plain two-message input).
		for steps, limit := 0, len(b); len(b) > 0; steps++ {
			if steps > limit {
				t.Fatal("no progress")
			}
			m, rest, err := nlwire.Next(b)
			if err != nil {
				if rest != nil || m.Payload != nil {
					t.Fatal("error with a value")
				}
				return
			}
			if len(rest) >= len(b) || len(m.Payload) > len(b)-nlwire.HdrLen {
				t.Fatalf("consumed nothing or more than the input: %d of %d", len(b)-len(rest), len(b))
			}
			s, err := parseDiagMsg(m.Payload)
			if err != nil && s != (sockInfo{}) {
				t.Fatal("error with a value")
			}
			if err == nil && s.family != afInet && s.family != afInet6 {
				t.Fatalf("accepted family %d", s.family)
			}
			_, _ = nlwire.Errno(m.Payload)
			b = rest
		}
	})
}

// TestParseDiagCookie pins the order of idiag_cookie's halves: sock_diag_save_cookie stores the low 32 bits in
// the first u32 and the high 32 bits in the second, each in host order.
func TestParseDiagCookie(t *testing.T) {
	b := diagMsgBytes(sockInfo{family: afInet, local: netip.MustParseAddrPort("127.0.0.1:1"), remote: netip.MustParseAddrPort("127.0.0.1:2")})
	const off = 4 + 40 // the family/state/timer/retrans header, then sport..ifindex of the socket ID
	binary.NativeEndian.PutUint32(b[off:], 0x11223344)
	binary.NativeEndian.PutUint32(b[off+4:], 0x55667788)
	s, err := parseDiagMsg(b)
	if err != nil {
		t.Fatal(err)
	}
	if want := uint64(0x5566778811223344); s.cookie != want {
		t.Errorf("cookie %#x, want %#x", s.cookie, want)
	}
}
