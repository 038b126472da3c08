package dns

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	mdns "github.com/miekg/dns"
)

func TestParseUpstream(t *testing.T) {
	tests := []struct {
		in   string
		want Upstream
		err  bool
	}{
		{in: "192.0.2.53", want: Upstream{TransportUDP, netip.MustParseAddrPort("192.0.2.53:53"), ""}},
		{in: "192.0.2.53:5353", want: Upstream{TransportUDP, netip.MustParseAddrPort("192.0.2.53:5353"), ""}},
		{in: "udp://192.0.2.53", want: Upstream{TransportUDP, netip.MustParseAddrPort("192.0.2.53:53"), ""}},
		{in: "2001:db8::53", want: Upstream{TransportUDP, netip.MustParseAddrPort("[2001:db8::53]:53"), ""}},
		{in: "[2001:db8::53]", want: Upstream{TransportUDP, netip.MustParseAddrPort("[2001:db8::53]:53"), ""}},
		{in: "[2001:db8::53]:54", want: Upstream{TransportUDP, netip.MustParseAddrPort("[2001:db8::53]:54"), ""}},
		{in: "tcp://192.0.2.53", want: Upstream{TransportTCP, netip.MustParseAddrPort("192.0.2.53:53"), ""}},
		{in: "tls://1.1.1.1#cloudflare-dns.com", want: Upstream{TransportTLS, netip.MustParseAddrPort("1.1.1.1:853"), "cloudflare-dns.com"}},
		{in: "TLS://1.1.1.1:8853", want: Upstream{TransportTLS, netip.MustParseAddrPort("1.1.1.1:8853"), ""}},
		{in: "tls://[2606:4700::1111]:853#one.one.one.one", want: Upstream{TransportTLS, netip.MustParseAddrPort("[2606:4700::1111]:853"), "one.one.one.one"}},
		{in: "::ffff:192.0.2.1", want: Upstream{TransportUDP, netip.MustParseAddrPort("192.0.2.1:53"), ""}},
		{in: "dns.google", err: true},
		{in: "https://1.1.1.1", err: true},
		{in: "1.1.1.1#name", err: true},
		{in: "tls://1.1.1.1#", err: true},
		{in: "192.0.2.1:0", err: true},
		{in: "0.0.0.0", err: true},
		{in: "fe80::1%eth0", err: true},
		{in: "", err: true},
		{in: "[192.0.2.1", err: true},
	}
	for _, tc := range tests {
		got, err := ParseUpstream(tc.in)
		if (err != nil) != tc.err {
			t.Errorf("ParseUpstream(%q) error %v, want error %v", tc.in, err, tc.err)
			continue
		}
		if diff := cmp.Diff(tc.want, got, cmp.Comparer(func(a, b netip.AddrPort) bool { return a == b })); diff != "" {
			t.Errorf("ParseUpstream(%q) (-want +got):\n%s", tc.in, diff)
		}
		if err == nil {
			// String round-trips.
			again, err := ParseUpstream(got.String())
			if err != nil || again != got {
				t.Errorf("round trip of %q via %q: %v, %v", tc.in, got.String(), again, err)
			}
		}
	}
}

func TestConfigValidate(t *testing.T) {
	tests := []struct {
		name string
		cfg  Config
		want []string // substrings of the error, one per problem
	}{
		{"zero value is valid", Config{}, nil},
		{"full", Config{Listen: []string{"127.0.0.1:53"}, Upstreams: []string{"tls://1.1.1.1#x"},
			BlockResponse: "zero", CacheSize: 10, Timeout: time.Second}, nil},
		{"everything wrong", Config{Listen: []string{"localhost:53", "127.0.0.1"}, Upstreams: []string{"x"},
			BlockResponse: "refused", CacheSize: -1, MapSize: -1, Timeout: -1, MapGrace: -1},
			[]string{"listen[0]", "listen[1]", "upstreams[0]", "block_response", "cache_size", "map_size",
				"timeout", "map_grace"}},
	}
	for _, tc := range tests {
		err := tc.cfg.Validate()
		if len(tc.want) == 0 {
			if err != nil {
				t.Errorf("%s: %v", tc.name, err)
			}
			continue
		}
		if err == nil {
			t.Errorf("%s: valid", tc.name)
			continue
		}
		lines := strings.Split(err.Error(), "\n")
		if len(lines) != len(tc.want) {
			t.Errorf("%s: %d errors, want %d:\n%v", tc.name, len(lines), len(tc.want), err)
		}
		for _, w := range tc.want {
			if !strings.Contains(err.Error(), w+":") {
				t.Errorf("%s: no error for %s in\n%v", tc.name, w, err)
			}
		}
	}
	d := Config{}.WithDefaults()
	if diff := cmp.Diff([]string{"127.0.0.17:53", "[::1]:53"}, d.Listen); diff != "" || d.BlockResponse != BlockNXDomain ||
		d.Timeout != DefaultTimeout || d.CacheSize != DefaultCacheSize {
		t.Errorf("defaults: %+v", d)
	}
}

func TestChooseUpstreams(t *testing.T) {
	a := netip.MustParseAddr
	self := []netip.AddrPort{netip.MustParseAddrPort("127.0.0.17:53"), netip.MustParseAddrPort("[::1]:53")}
	tests := []struct {
		name              string
		primary, fallback []netip.Addr
		want              []string
		stubOnly          bool
	}{
		{"plain", []netip.Addr{a("192.0.2.1"), a("2001:db8::1"), a("192.0.2.1")}, nil,
			[]string{"192.0.2.1:53", "[2001:db8::1]:53"}, false},
		{"systemd stub: use the servers behind it", []netip.Addr{a("127.0.0.53")}, []netip.Addr{a("192.0.2.9")},
			[]string{"192.0.2.9:53"}, false},
		{"stub and a real server", []netip.Addr{a("127.0.0.53"), a("192.0.2.1")}, []netip.Addr{a("192.0.2.9")},
			[]string{"192.0.2.1:53"}, false},
		{"only a stub", []netip.Addr{a("127.0.0.1"), a("127.0.0.17"), a("::1")}, nil, []string{"127.0.0.1:53"}, true},
		{"nothing", nil, nil, nil, true},
	}
	for _, tc := range tests {
		got, stub := chooseUpstreams(tc.primary, tc.fallback, self)
		if diff := cmp.Diff(tc.want, got); diff != "" || stub != tc.stubOnly {
			t.Errorf("%s: stubOnly %v (-want +got):\n%s", tc.name, stub, diff)
		}
	}
}

func TestParseResolvConf(t *testing.T) {
	in := `# generated
nameserver 192.0.2.1
nameserver   2001:db8::53 ; comment
nameserver fe80::1%eth0
nameserver not-an-ip
search example.com
options edns0
 nameserver 192.0.2.2#x
`
	got := parseResolvConf(strings.NewReader(in))
	want := []netip.Addr{netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("2001:db8::53"), netip.MustParseAddr("192.0.2.2")}
	if diff := cmp.Diff(want, got, cmp.Comparer(func(a, b netip.Addr) bool { return a == b })); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
}

// packFor packs a reply the way the cache stores it.
func packFor(t testing.TB, lines ...string) []byte {
	t.Helper()
	m := new(mdns.Msg)
	m.SetQuestion("www.example.com.", mdns.TypeA)
	m.Response = true
	m.Answer = rrs(t, lines...)
	m.Ns = rrs(t, "example.com. 77 IN NS ns.example.com.")
	m.Extra = rrs(t, "ns.example.com. 88 IN A 192.0.2.53")
	m.SetEdns0(1232, true)
	m.Compress = true
	b, err := m.Pack()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestTTLOffsets(t *testing.T) {
	b := packFor(t, "www.example.com. 600 IN CNAME cdn.example.net.", "cdn.example.net. 60 IN A 192.0.2.10")
	offs, err := ttlOffsets(b, nil)
	if err != nil {
		t.Fatal(err)
	}
	var ttls []uint32
	for _, o := range offs {
		ttls = append(ttls, binary.BigEndian.Uint32(b[o:]))
	}
	// The OPT record's TTL field (EDNS flags, DO set) is not a TTL and is left out.
	if diff := cmp.Diff([]uint32{600, 60, 77, 88}, ttls); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
	for _, cut := range []int{0, 5, 12, 20, len(b) - 1} {
		if _, err := ttlOffsets(b[:cut], nil); err == nil {
			t.Errorf("truncated at %d: no error", cut)
		}
	}
	if _, err := ttlOffsets(append(b[:len(b):len(b)], 0), nil); err == nil {
		t.Error("trailing byte: no error")
	}
}

func TestPatchQuestionCase(t *testing.T) {
	b := packFor(t, "www.example.com. 60 IN A 192.0.2.10")
	tests := []struct {
		name  string
		ok    bool
		after string
	}{
		{"WwW.ExAmple.COM.", true, "WwW.ExAmple.COM."},
		{"www.example.com", true, "www.example.com."},
		{"ww.example.com.", false, "www.example.com."},
		{"www.example.co.", false, "www.example.com."},
		{"www.example.com.x.", false, "www.example.com."},
		{"w\\119w.example.com.", false, "www.example.com."},
		{".", false, "www.example.com."},
	}
	for _, tc := range tests {
		c := append([]byte(nil), b...)
		if ok := patchQuestionCase(c, tc.name); ok != tc.ok {
			t.Errorf("%q: patched %v, want %v", tc.name, ok, tc.ok)
		}
		m := new(mdns.Msg)
		if err := m.Unpack(c); err != nil {
			t.Fatalf("%q: %v", tc.name, err)
		}
		if m.Question[0].Name != tc.after {
			t.Errorf("%q: question now %q, want %q", tc.name, m.Question[0].Name, tc.after)
		}
	}
}

func TestCacheIsBoundedLRU(t *testing.T) {
	c := newCache(cacheShards * 2) // two per shard
	mk := func(k string) *entry { return &entry{key: k, expires: 100} }
	var keys []string
	for i := range 200 {
		k := fmt.Sprintf("k%d", i)
		keys = append(keys, k)
		c.put(mk(k))
		if i == 0 {
			continue
		}
		// Keep k0 hot: it must survive while its shard churns.
		if c.get([]byte("k0"), 0) == nil {
			t.Fatalf("hot entry evicted after %d inserts", i)
		}
	}
	if n := c.len(); n > cacheShards*2 {
		t.Errorf("%d entries, bound %d", n, cacheShards*2)
	}
	if c.get([]byte(keys[199]), 0) == nil {
		t.Error("newest entry missing")
	}
	if c.get([]byte("k0"), 100) != nil || c.get([]byte("k0"), 0) != nil {
		t.Error("expired entry served or kept")
	}
	c.put(mk("k199")) // replacing keeps one entry per key
	if n := c.len(); n > cacheShards*2 {
		t.Errorf("%d entries after replace", n)
	}
}

func TestIPMapIsBounded(t *testing.T) {
	m := newIPMap(ipShards * 8)
	names := []string{"a.example"}
	for i := range 5000 {
		ip := netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)})
		m.record(ip, names, 1000)
		if got := m.lookup(ip, 0); len(got) == 0 {
			t.Fatalf("just recorded %s is missing", ip)
		}
	}
	if n := m.len(0); n > ipShards*8 {
		t.Errorf("%d entries, bound %d", n, ipShards*8)
	}
	if n := m.len(1000); n != 0 {
		t.Errorf("%d entries alive after expiry", n)
	}
}

func TestCacheHitDoesNotAllocate(t *testing.T) {
	up := startUpstream(t, defaultZone(t))
	s, _, _ := newTestServer(t, blockAds, []string{up.addr})
	for _, tc := range []struct {
		name string
		tcp  bool
		edns bool
	}{{"udp", false, false}, {"udp edns", false, true}, {"tcp", true, false}} {
		req := new(mdns.Msg)
		req.SetQuestion("www.example.com.", mdns.TypeA)
		if tc.edns {
			req.SetEdns0(1232, false)
		}
		w := &nopWriter{tcp: tc.tcp}
		s.serve(w, req) // miss: fills the cache
		w.last = make([]byte, 0, 1024)
		allocs := testing.AllocsPerRun(200, func() { s.serve(w, req) })
		if allocs != 0 {
			t.Errorf("%s: cache hit allocates %.1f times", tc.name, allocs)
		}
		r := new(mdns.Msg)
		if err := r.Unpack(w.last); err != nil || len(r.Answer) != 3 || r.Id != req.Id {
			t.Errorf("%s: reply %v, %v", tc.name, r, err)
		}
	}
	ip := netip.MustParseAddr("192.0.2.10")
	if allocs := testing.AllocsPerRun(1000, func() { s.DomainOf(ip) }); allocs != 0 {
		t.Errorf("DomainOf allocates %.1f times", allocs)
	}
	if d, ok := s.DomainOf(ip); !ok || d != "www.example.com" {
		t.Errorf("DomainOf = %q, %v", d, ok)
	}
}
