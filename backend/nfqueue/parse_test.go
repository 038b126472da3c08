package nfqueue

import (
	"encoding/binary"
	"net/netip"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/warden-fw/warden/backend"
)

// ipv4Packet builds an IPv4 header (with ihl 32-bit words) followed by l4.
func ipv4Packet(proto byte, src, dst string, ihl int, fragOff uint16, l4 []byte) []byte {
	b := make([]byte, ihl*4, ihl*4+len(l4))
	b[0] = 0x40 | byte(ihl)
	binary.BigEndian.PutUint16(b[2:4], uint16(len(b)+len(l4)))
	binary.BigEndian.PutUint16(b[6:8], fragOff)
	b[8] = 64
	b[9] = proto
	s, d := netip.MustParseAddr(src).As4(), netip.MustParseAddr(dst).As4()
	copy(b[12:16], s[:])
	copy(b[16:20], d[:])
	return append(b, l4...)
}

// ipv6Packet builds an IPv6 header with next header nh followed by rest (extension headers and l4).
func ipv6Packet(nh byte, src, dst string, rest []byte) []byte {
	b := make([]byte, 40, 40+len(rest))
	b[0] = 0x60
	binary.BigEndian.PutUint16(b[4:6], uint16(len(rest)))
	b[6] = nh
	b[7] = 64
	s, d := netip.MustParseAddr(src).As16(), netip.MustParseAddr(dst).As16()
	copy(b[8:24], s[:])
	copy(b[24:40], d[:])
	return append(b, rest...)
}

func ports(sp, dp uint16) []byte {
	b := make([]byte, 20)
	binary.BigEndian.PutUint16(b[0:2], sp)
	binary.BigEndian.PutUint16(b[2:4], dp)
	return b
}

func TestParseHeaders(t *testing.T) {
	v4 := func(s string) netip.Addr { return netip.MustParseAddr(s) }
	tests := []struct {
		name    string
		pkt     []byte
		want    headers
		wantErr error
	}{
		{
			name: "ipv4 tcp",
			pkt:  ipv4Packet(6, "10.0.0.1", "1.2.3.4", 5, 0, ports(40000, 443)),
			want: headers{Proto: backend.TCP, Src: v4("10.0.0.1"), Dst: v4("1.2.3.4"), SrcPort: 40000, DstPort: 443},
		},
		{
			name: "ipv4 udp with options",
			pkt:  ipv4Packet(17, "10.0.0.1", "1.2.3.4", 7, 0, ports(5353, 53)),
			want: headers{Proto: backend.UDP, Src: v4("10.0.0.1"), Dst: v4("1.2.3.4"), SrcPort: 5353, DstPort: 53},
		},
		{
			name: "ipv4 icmp echo",
			pkt:  ipv4Packet(1, "10.0.0.1", "1.2.3.4", 5, 0, []byte{8, 0, 0, 0, 0, 1, 0, 1}),
			want: headers{Proto: backend.ICMP, Src: v4("10.0.0.1"), Dst: v4("1.2.3.4"), ICMPType: 8},
		},
		{
			name: "ipv4 non-first fragment has no ports",
			pkt:  ipv4Packet(17, "10.0.0.1", "1.2.3.4", 5, 100, ports(1, 2)),
			want: headers{Proto: backend.UDP, Src: v4("10.0.0.1"), Dst: v4("1.2.3.4"), Fragment: true},
		},
		{
			name: "ipv4 transport cut by copy range",
			pkt:  ipv4Packet(6, "10.0.0.1", "1.2.3.4", 5, 0, []byte{0x9c}),
			want: headers{Proto: backend.TCP, Src: v4("10.0.0.1"), Dst: v4("1.2.3.4")},
		},
		{
			name: "ipv4 options cut by copy range",
			pkt:  ipv4Packet(6, "10.0.0.1", "1.2.3.4", 15, 0, nil)[:30],
			want: headers{Proto: backend.TCP, Src: v4("10.0.0.1"), Dst: v4("1.2.3.4")},
		},
		{name: "ipv4 truncated", pkt: ipv4Packet(6, "10.0.0.1", "1.2.3.4", 5, 0, nil)[:19], wantErr: errTruncated},
		{name: "ipv4 ihl too small", pkt: append([]byte{0x44}, make([]byte, 30)...), wantErr: errBadHeader},
		{name: "empty", pkt: nil, wantErr: errTruncated},
		{name: "version 5", pkt: append([]byte{0x50}, make([]byte, 60)...), wantErr: errBadVersion},
		{
			name: "ipv6 tcp",
			pkt:  ipv6Packet(6, "fd00::1", "2001:db8::2", ports(40000, 443)),
			want: headers{Proto: backend.TCP, Src: v4("fd00::1"), Dst: v4("2001:db8::2"), SrcPort: 40000, DstPort: 443},
		},
		{
			name: "ipv6 hop-by-hop then dstopts then udp",
			pkt: ipv6Packet(0, "fd00::1", "fd00::2", append(append(
				[]byte{60, 0, 1, 4, 0, 0, 0, 0},                             // hop-by-hop, 8 bytes, next dstopts
				[]byte{17, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}...), // dstopts, 16 bytes, next udp
				ports(1000, 53)...)),
			want: headers{Proto: backend.UDP, Src: v4("fd00::1"), Dst: v4("fd00::2"), SrcPort: 1000, DstPort: 53},
		},
		{
			name: "ipv6 first fragment keeps ports",
			pkt:  ipv6Packet(44, "fd00::1", "fd00::2", append([]byte{6, 0, 0, 1, 0, 0, 0, 7}, ports(1, 2)...)),
			want: headers{Proto: backend.TCP, Src: v4("fd00::1"), Dst: v4("fd00::2"), SrcPort: 1, DstPort: 2},
		},
		{
			name: "ipv6 later fragment",
			pkt:  ipv6Packet(44, "fd00::1", "fd00::2", append([]byte{6, 0, 0, 0x10, 0, 0, 0, 7}, ports(1, 2)...)),
			want: headers{Proto: backend.TCP, Src: v4("fd00::1"), Dst: v4("fd00::2"), Fragment: true},
		},
		{
			name: "ipv6 AH then tcp",
			pkt:  ipv6Packet(51, "fd00::1", "fd00::2", append([]byte{6, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}, ports(7, 8)...)),
			want: headers{Proto: backend.TCP, Src: v4("fd00::1"), Dst: v4("fd00::2"), SrcPort: 7, DstPort: 8},
		},
		{
			name: "ipv6 icmpv6 echo",
			pkt:  ipv6Packet(58, "fd00::1", "fd00::2", []byte{128, 0, 0, 0}),
			want: headers{Proto: backend.ICMPv6, Src: v4("fd00::1"), Dst: v4("fd00::2"), ICMPType: 128},
		},
		{
			name: "ipv6 extension header cut by copy range",
			pkt:  ipv6Packet(0, "fd00::1", "fd00::2", []byte{6, 3, 0, 0}),
			want: headers{Proto: backend.TCP, Src: v4("fd00::1"), Dst: v4("fd00::2")},
		},
		{
			name: "ipv6 esp",
			pkt:  ipv6Packet(50, "fd00::1", "fd00::2", []byte{1, 2, 3, 4, 5, 6, 7, 8}),
			want: headers{Proto: 50, Src: v4("fd00::1"), Dst: v4("fd00::2")},
		},
		{name: "ipv6 truncated", pkt: ipv6Packet(6, "fd00::1", "fd00::2", nil)[:39], wantErr: errTruncated},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var h headers
			err := parseHeaders(tt.pkt, &h)
			if err != tt.wantErr {
				t.Fatalf("error %v, want %v", err, tt.wantErr)
			}
			if err != nil {
				return
			}
			if diff := cmp.Diff(tt.want, h, cmp.Comparer(func(a, b netip.Addr) bool { return a == b })); diff != "" {
				t.Errorf("headers (-want +got):\n%s", diff)
			}
		})
	}
}

func TestFillInfo(t *testing.T) {
	h := headers{Proto: backend.TCP, Src: netip.MustParseAddr("10.0.0.1"), Dst: netip.MustParseAddr("1.2.3.4"),
		SrcPort: 40000, DstPort: 443}
	local, remote := netip.MustParseAddrPort("10.0.0.1:40000"), netip.MustParseAddrPort("1.2.3.4:443")
	var out backend.Info
	fillInfo(&h, true, backend.Outbound, &out)
	if out.Local != local || out.Remote != remote || out.Direction != backend.Outbound {
		t.Errorf("outgoing packet: %v", out.String())
	}
	// The reply, arriving, of the same connection has the same key.
	r := headers{Proto: backend.TCP, Src: h.Dst, Dst: h.Src, SrcPort: h.DstPort, DstPort: h.SrcPort}
	var in backend.Info
	fillInfo(&r, false, backend.Outbound, &in)
	if in.Key() != out.Key() {
		t.Errorf("reply key %v, want %v", in.Key(), out.Key())
	}
}

func TestParseNoAllocs(t *testing.T) {
	pkts := [][]byte{
		ipv4Packet(6, "10.0.0.1", "1.2.3.4", 5, 0, ports(40000, 443)),
		ipv6Packet(0, "fd00::1", "fd00::2", append([]byte{17, 0, 1, 4, 0, 0, 0, 0}, ports(1000, 53)...)),
	}
	var h headers
	var info backend.Info
	if n := testing.AllocsPerRun(1000, func() {
		for _, p := range pkts {
			if err := parseHeaders(p, &h); err != nil {
				t.Fatal(err)
			}
			fillInfo(&h, true, backend.Outbound, &info)
		}
	}); n != 0 {
		t.Errorf("parsing allocates %v times per run, want 0", n)
	}
}

func FuzzParseHeaders(f *testing.F) {
	f.Add(ipv4Packet(6, "10.0.0.1", "1.2.3.4", 5, 0, ports(40000, 443)))
	f.Add(ipv4Packet(1, "10.0.0.1", "1.2.3.4", 6, 0, []byte{8, 0}))
	f.Add(ipv6Packet(44, "fd00::1", "fd00::2", append([]byte{6, 0, 0, 1, 0, 0, 0, 7}, ports(1, 2)...)))
	f.Add(ipv6Packet(0, "fd00::1", "fd00::2", []byte{43, 255, 0, 0}))
	f.Add([]byte{0x45})
	f.Fuzz(func(t *testing.T, b []byte) {
		var h headers
		err := parseHeaders(b, &h)
		if err != nil {
			if h != (headers{}) {
				t.Fatalf("error %v with a non-zero result %+v", err, h)
			}
			return
		}
		// A result always has addresses of the packet's family, taken from the packet.
		switch b[0] >> 4 {
		case 4:
			if !h.Src.Is4() || !h.Dst.Is4() || h.Src.As4() != [4]byte(b[12:16]) || h.Dst.As4() != [4]byte(b[16:20]) {
				t.Fatalf("ipv4 addresses %v %v do not match the header", h.Src, h.Dst)
			}
		case 6:
			if !h.Src.Is6() || !h.Dst.Is6() || h.Src.As16() != [16]byte(b[8:24]) {
				t.Fatalf("ipv6 addresses %v %v do not match the header", h.Src, h.Dst)
			}
		default:
			t.Fatalf("accepted version %d", b[0]>>4)
		}
		if !h.Proto.HasPorts() && (h.SrcPort != 0 || h.DstPort != 0) {
			t.Fatalf("ports on %v", h.Proto)
		}
		if h.Fragment && (h.SrcPort != 0 || h.DstPort != 0) {
			t.Fatal("ports on a non-first fragment")
		}
	})
}

func BenchmarkParse(b *testing.B) {
	pkt := ipv6Packet(6, "fd00::1", "2001:db8::2", ports(40000, 443))
	var h headers
	var info backend.Info
	b.ReportAllocs()
	for b.Loop() {
		_ = parseHeaders(pkt, &h)
		fillInfo(&h, true, backend.Outbound, &info)
	}
}
