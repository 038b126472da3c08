package sockdiag

import (
	"encoding/binary"
	"net/netip"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestAppendRequest(t *testing.T) {
	ne := binary.NativeEndian
	// header builds the expected netlink header and the start of the request.
	header := func(flags uint16, family, proto, ext uint8) []byte {
		b := ne.AppendUint32(nil, 72)
		b = ne.AppendUint16(b, 20)
		b = ne.AppendUint16(b, flags)
		b = ne.AppendUint32(b, 7)
		b = ne.AppendUint32(b, 0)
		b = append(b, family, proto, ext, 0)
		return ne.AppendUint32(b, 0xffffffff)
	}
	trailer := func(ifindex uint32) []byte {
		b := ne.AppendUint32(nil, ifindex)
		return append(b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff)
	}
	withCookie := func(ifindex uint32, cookie uint64) []byte {
		b := ne.AppendUint32(nil, ifindex)
		b = ne.AppendUint32(b, uint32(cookie))
		return ne.AppendUint32(b, uint32(cookie>>32))
	}
	cat := func(parts ...[]byte) []byte {
		var b []byte
		for _, p := range parts {
			b = append(b, p...)
		}
		return b
	}
	zero12 := make([]byte, 12)
	tests := []struct {
		name string
		req  Request
		want []byte
	}{
		{
			"tcp4 exact",
			Request{Family: 2, Protocol: 6, States: AllStates, Src: netip.MustParseAddrPort("10.0.0.1:443"), Dst: netip.MustParseAddrPort("192.168.1.2:50000"), Ifindex: 3},
			cat(header(1, 2, 6, 0), []byte{0x01, 0xbb, 0xc3, 0x50}, []byte{10, 0, 0, 1}, zero12, []byte{192, 168, 1, 2}, zero12, trailer(3)),
		},
		{
			"udp6 dump by port",
			Request{Dump: true, Family: 10, Protocol: 17, States: AllStates, Src: netip.AddrPortFrom(netip.Addr{}, 53)},
			cat(header(0x301, 10, 17, 0), []byte{0, 53, 0, 0}, make([]byte, 32), trailer(0)),
		},
		{
			"tcp6 exact",
			Request{Family: 10, Protocol: 6, States: AllStates, Src: netip.MustParseAddrPort("[2001:db8::1]:1"), Dst: netip.MustParseAddrPort("[::1]:2")},
			cat(header(1, 10, 6, 0), []byte{0, 1, 0, 2}, netip.MustParseAddr("2001:db8::1").AsSlice(), netip.IPv6Loopback().AsSlice(), trailer(0)),
		},
		{
			"tcp4 one socket by cookie, with memory info",
			Request{Family: 2, Protocol: 6, Ext: 1 << 6, States: AllStates, Src: netip.MustParseAddrPort("10.0.0.1:40000"), Dst: netip.MustParseAddrPort("192.0.2.10:80"), Cookie: 0x1122334455667788},
			cat(header(1, 2, 6, 1<<6), []byte{0x9c, 0x40, 0, 80}, []byte{10, 0, 0, 1}, zero12, []byte{192, 0, 2, 10}, zero12, withCookie(0, 0x1122334455667788)),
		},
	}
	for _, tt := range tests {
		got := AppendRequest(nil, 7, &tt.req)
		if diff := cmp.Diff(tt.want, got); diff != "" {
			t.Errorf("%s: -want +got\n%s", tt.name, diff)
		}
	}
}
