package process

import (
	"encoding/binary"
	"net/netip"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestOwnerValueEncoding(t *testing.T) {
	ne := binary.NativeEndian
	raw := func(tgid uint32, pad uint32, ns uint64, comm string) [ownerValueSize]byte {
		var v [ownerValueSize]byte
		ne.PutUint32(v[0:], tgid)
		ne.PutUint32(v[4:], pad)
		ne.PutUint64(v[8:], ns)
		copy(v[16:], comm)
		return v
	}
	comm := func(s string) (c [commSize]byte) {
		copy(c[:], s)
		return c
	}
	tests := []struct {
		name     string
		raw      [ownerValueSize]byte
		want     ownerEntry
		wantComm string
	}{
		{"zero", raw(0, 0, 0, ""), ownerEntry{}, ""},
		{"typical", raw(4242, 0, 8_227_910_600_495, "curl"), ownerEntry{tgid: 4242, seenNs: 8_227_910_600_495, comm: comm("curl")}, "curl"},
		{"largest pid", raw(1<<22, 0, 1, "a"), ownerEntry{tgid: 1 << 22, seenNs: 1, comm: comm("a")}, "a"},
		{"longest name", raw(9, 0, 2, "systemd-resolve"), ownerEntry{tgid: 9, seenNs: 2, comm: comm("systemd-resolve")}, "systemd-resolve"},
		// The kernel always ends the name with a NUL; a value without one still decodes to all 16 bytes.
		{"name without NUL", raw(9, 0, 2, "0123456789abcdef"), ownerEntry{tgid: 9, seenNs: 2, comm: comm("0123456789abcdef")}, "0123456789abcdef"},
		{"name with spaces and parens", raw(9, 0, 2, "a (b) c"), ownerEntry{tgid: 9, seenNs: 2, comm: comm("a (b) c")}, "a (b) c"},
		{"padding ignored", raw(7, 0xffffffff, ^uint64(0), "x"), ownerEntry{tgid: 7, seenNs: ^uint64(0), comm: comm("x")}, "x"},
	}
	for _, tt := range tests {
		got := decodeOwnerValue(&tt.raw)
		if diff := cmp.Diff(tt.want, got, cmp.AllowUnexported(ownerEntry{})); diff != "" {
			t.Errorf("%s: decode -want +got\n%s", tt.name, diff)
		}
		if c := string(got.commBytes()); c != tt.wantComm {
			t.Errorf("%s: comm %q, want %q", tt.name, c, tt.wantComm)
		}
		if tt.name == "padding ignored" {
			continue
		}
		if enc := encodeOwnerValue(got); enc != tt.raw {
			t.Errorf("%s: encode = %x, want %x", tt.name, enc, tt.raw)
		}
	}
}

func TestBootTicks(t *testing.T) {
	tests := []struct {
		ns   uint64
		want uint64
	}{
		{0, 0},
		{9_999_999, 0},
		{10_000_000, 1},
		{8_227_910_600_495, 822_791},
		{^uint64(0), ^uint64(0) / 10_000_000},
	}
	for _, tt := range tests {
		if got := bootTicks(tt.ns); got != tt.want {
			t.Errorf("bootTicks(%d) = %d, want %d", tt.ns, got, tt.want)
		}
	}
}

func TestTupleKeyEncoding(t *testing.T) {
	key := func(proto byte, lport, rport uint16, remote, local string) *[tupleKeySize]byte {
		var k [tupleKeySize]byte
		k[0] = proto
		binary.BigEndian.PutUint16(k[2:], lport)
		binary.BigEndian.PutUint16(k[4:], rport)
		r := netip.MustParseAddr(remote).As16()
		copy(k[8:], r[:])
		if local != "" {
			l := netip.MustParseAddr(local).As16()
			copy(k[24:], l[:])
		}
		return &k
	}
	ap := netip.MustParseAddrPort
	tests := []struct {
		name          string
		proto         uint8
		local, remote netip.AddrPort
		withLocal     bool
		want          *[tupleKeySize]byte // nil: not encodable
	}{
		{"tcp ipv4", ipprotoTCP, ap("10.0.0.2:40000"), ap("93.184.216.34:443"), true, key(6, 40000, 443, "::ffff:93.184.216.34", "::ffff:10.0.0.2")},
		{"tcp ipv6", ipprotoTCP, ap("[2001:db8::2]:51000"), ap("[2001:db8::1]:22"), true, key(6, 51000, 22, "2001:db8::1", "2001:db8::2")},
		{"tcp ipv4-mapped is ipv4", ipprotoTCP, ap("[::ffff:10.0.0.2]:1"), ap("[::ffff:10.0.0.1]:2"), true, key(6, 1, 2, "::ffff:10.0.0.1", "::ffff:10.0.0.2")},
		{"udp with its local address", ipprotoUDP, ap("10.0.0.2:5353"), ap("224.0.0.251:5353"), true, key(17, 5353, 5353, "::ffff:224.0.0.251", "::ffff:10.0.0.2")},
		{"udp without", ipprotoUDP, ap("10.0.0.2:5353"), ap("224.0.0.251:5353"), false, key(17, 5353, 5353, "::ffff:224.0.0.251", "")},
		{"udp ipv6 without", ipprotoUDP, ap("[fe80::1]:546"), ap("[ff02::1:2]:547"), false, key(17, 546, 547, "ff02::1:2", "")},
		{"udp ipv6 with", ipprotoUDP, ap("[fe80::1]:546"), ap("[ff02::1:2]:547"), true, key(17, 546, 547, "ff02::1:2", "fe80::1")},
		{"udp without, no local address", ipprotoUDP, netip.AddrPortFrom(netip.Addr{}, 9), ap("127.0.0.1:53"), false, key(17, 9, 53, "::ffff:127.0.0.1", "")},
		{"highest ports", ipprotoUDP, ap("127.0.0.1:65535"), ap("127.0.0.1:65535"), false, key(17, 65535, 65535, "::ffff:127.0.0.1", "")},
		{"udp with, no local address", ipprotoUDP, netip.AddrPortFrom(netip.Addr{}, 9), ap("127.0.0.1:53"), true, nil},
		{"tcp without its local address", ipprotoTCP, ap("127.0.0.1:9"), ap("127.0.0.1:53"), false, nil},
		{"no remote address", ipprotoUDP, ap("127.0.0.1:9"), netip.AddrPort{}, false, nil},
		{"icmp", 1, ap("127.0.0.1:0"), ap("127.0.0.1:0"), true, nil},
	}
	for _, tt := range tests {
		got, ok := encodeTupleKey(tt.proto, tt.local, tt.remote, tt.withLocal)
		if tt.want == nil {
			if ok {
				t.Errorf("%s: encoded %x, want no key", tt.name, got)
			}
			continue
		}
		if !ok {
			t.Errorf("%s: no key", tt.name)
			continue
		}
		if diff := cmp.Diff(*tt.want, got); diff != "" {
			t.Errorf("%s: -want +got\n%s", tt.name, diff)
		}
	}
}
