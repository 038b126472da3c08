package sandbox

import (
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestAgentDNS(t *testing.T) {
	a := pipeAgent(t)
	zone := []DNSRecord{
		{Name: "a.example.net", Type: "A", Value: "192.0.2.10", TTL: 60},
		{Name: "a.example.net", Type: "AAAA", Value: "2001:db8:5::10", TTL: 30},
		{Name: "Alias.Example.COM.", Type: "CNAME", Value: "a.example.net", TTL: 5},
		{Name: "outside.example.com", Type: "CNAME", Value: "elsewhere.example", TTL: 5},
	}
	r, err := a.Call(Request{Op: "dns-serve", Name: "real", Addrs: []string{"127.0.0.1"}, UDP: []uint16{0}, TCP: []uint16{0}, Records: zone})
	if err != nil {
		t.Fatal(err)
	}
	if len(r.Listening) != 2 {
		t.Fatalf("dns-serve: listening %v", r.Listening)
	}
	udpAddr, tcpAddr := strings.TrimPrefix(r.Listening[0], "udp "), strings.TrimPrefix(r.Listening[1], "tcp ")

	type result struct {
		Outcome, Rcode string
		Answers        []DNSRecord
	}
	for _, c := range []struct {
		name string
		req  Request
		want result
	}{
		{"udp A", Request{Op: "dns", Dst: udpAddr, QName: "a.example.net"}, result{Connected, "NOERROR",
			[]DNSRecord{{"a.example.net", "A", "192.0.2.10", 60}}}},
		{"tcp AAAA", Request{Op: "dns", Dst: tcpAddr, Net: "tcp", QName: "A.example.net.", QType: "aaaa"}, result{Connected, "NOERROR",
			[]DNSRecord{{"a.example.net", "AAAA", "2001:db8:5::10", 30}}}},
		{"cname followed", Request{Op: "dns", Dst: udpAddr, QName: "alias.example.com"}, result{Connected, "NOERROR",
			[]DNSRecord{{"alias.example.com", "CNAME", "a.example.net", 5}, {"a.example.net", "A", "192.0.2.10", 60}}}},
		{"cname out of zone", Request{Op: "dns", Dst: udpAddr, QName: "outside.example.com"}, result{Connected, "NOERROR",
			[]DNSRecord{{"outside.example.com", "CNAME", "elsewhere.example", 5}}}},
		{"nodata", Request{Op: "dns", Dst: udpAddr, QName: "a.example.net", QType: "TXT"}, result{Connected, "NOERROR", nil}},
		{"nxdomain", Request{Op: "dns", Dst: udpAddr, QName: "nope.example.net"}, result{Connected, "NXDOMAIN", nil}},
		{"closed port", Request{Op: "dns", Dst: freePort(t, "udp"), QName: "a.example.net", TimeoutMS: 1000}, result{Refused, "", nil}},
	} {
		r, err := a.Call(c.req)
		if err != nil {
			t.Errorf("%s: %v", c.name, err)
			continue
		}
		if diff := cmp.Diff(c.want, result{r.Outcome, r.Rcode, r.Answers}); diff != "" {
			t.Errorf("%s (-want +got):\n%s\ndetail: %s", c.name, diff, r.Detail)
		}
	}

	r, err = a.Call(Request{Op: "dns-count", Name: "real"})
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]int{
		DNSQueryKey("udp", "a.example.net", "A"):       1,
		DNSQueryKey("udp", "a.example.net", "TXT"):     1,
		DNSQueryKey("tcp", "a.example.net.", "aaaa"):   1,
		DNSQueryKey("udp", "alias.example.com", "A"):   1,
		DNSQueryKey("udp", "outside.example.com", "A"): 1,
		DNSQueryKey("udp", "nope.example.net", "A"):    1,
	}
	if diff := cmp.Diff(want, r.DNSQueries); diff != "" {
		t.Errorf("dns-count (-want +got):\n%s", diff)
	}
	if got := (&Response{Answers: []DNSRecord{{Type: "CNAME", Value: "x"}, {Type: "A", Value: "192.0.2.1"}, {Type: "AAAA", Value: "::1"}}}).Addrs(); len(got) != 2 || got[0].String() != "192.0.2.1" || got[1].String() != "::1" {
		t.Errorf("Addrs: %v", got)
	}

	for _, bad := range []Request{
		{Op: "dns-serve", Name: "real", Addrs: []string{"127.0.0.1"}, UDP: []uint16{0}},
		{Op: "dns-serve", Addrs: []string{"127.0.0.1"}, UDP: []uint16{0}},
		{Op: "dns-serve", Name: "x", Records: []DNSRecord{{Name: "a", Type: "A", Value: "::1"}}},
		{Op: "dns-serve", Name: "y", Records: []DNSRecord{{Name: "a", Type: "MX", Value: "b"}}},
		{Op: "dns-count", Name: "nobody"},
		{Op: "dns", Dst: udpAddr, QName: "a", QType: "BOGUS"},
		{Op: "dns", Dst: udpAddr, QName: "a", Net: "sctp"},
		{Op: "dns", Dst: "not-an-address", QName: "a"},
	} {
		if _, err := a.Call(bad); err == nil {
			t.Errorf("%+v: no error", bad)
		}
	}
}
