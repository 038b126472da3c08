package dns

import (
	"context"
	"encoding/binary"
	"errors"
	"testing"

	mdns "github.com/miekg/dns"
)

// fuzzUpstream answers with fuzzer-chosen bytes. With fix set it makes the reply match the query (ID,
// question, QR), so the fuzzer reaches the caching and serving code instead of stopping at checkReply.
type fuzzUpstream struct {
	reply []byte
	fix   bool
}

func (f *fuzzUpstream) String() string { return "fuzz" }

func (f *fuzzUpstream) exchange(_ context.Context, q *mdns.Msg, _ bool) (*mdns.Msg, error) {
	r := new(mdns.Msg)
	if err := r.Unpack(f.reply); err != nil {
		return nil, err
	}
	if f.fix {
		r.Id, r.Response, r.Question = q.Id, true, q.Question
	}
	if r.Id != q.Id {
		return nil, errors.New("id mismatch") // what the library's client does
	}
	return r, nil
}

func query(t testing.TB, name string, qtype uint16, edns bool) []byte {
	m := new(mdns.Msg)
	m.SetQuestion(name, qtype)
	if edns {
		m.SetEdns0(1232, true)
	}
	b, err := m.Pack()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func reply(t testing.TB, name string, qtype uint16, answer ...string) []byte {
	m := new(mdns.Msg)
	m.SetQuestion(name, qtype)
	m.Response = true
	m.Answer = rrs(t, answer...)
	b, err := m.Pack()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// FuzzServe feeds malformed requests and malformed upstream answers through the whole handling path (as the
// library hands them over: whatever its parser accepts). Invariants: no panic; a request gets exactly one
// reply unless it is itself a response; the reply parses, carries the request's ID, is a response, and fits
// the client's UDP size. Serving twice exercises the cache-hit path on the same input.
func FuzzServe(f *testing.F) {
	f.Add(query(f, "example.com.", mdns.TypeA, false), reply(f, "example.com.", mdns.TypeA, "example.com. 300 IN A 192.0.2.1"), true, false)
	f.Add(query(f, "Www.Example.com.", mdns.TypeA, true), reply(f, "www.example.com.", mdns.TypeA,
		"www.example.com. 600 IN CNAME cdn.example.net.", "cdn.example.net. 60 IN A 192.0.2.10"), false, false)
	f.Add(query(f, "ads.doubleclick.net.", mdns.TypeAAAA, true), []byte{}, true, true)
	f.Add(query(f, "x.", mdns.TypeTXT, false), reply(f, "x.", mdns.TypeTXT, "x. 1 IN TXT \"a\""), true, true)
	f.Add([]byte{0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1}, []byte{0xff}, true, false)
	f.Add(query(f, ".", mdns.TypeNS, true), reply(f, ".", mdns.TypeNS, ". 10 IN NS a.root-servers.net."), true, false)

	up := &fuzzUpstream{}
	s, err := New(Config{Listen: []string{"127.0.0.1:0"}, Upstreams: []string{"192.0.2.53"}}, blockAds, nil)
	if err != nil {
		f.Fatal(err)
	}
	s.ups = []exchanger{up}
	sZero, err := New(Config{Listen: []string{"127.0.0.1:0"}, Upstreams: []string{"192.0.2.53"}, BlockResponse: BlockZero}, blockAds, nil)
	if err != nil {
		f.Fatal(err)
	}
	sZero.ups = []exchanger{up}

	f.Fuzz(func(t *testing.T, reqb, upb []byte, fix, tcp bool) {
		req := new(mdns.Msg)
		if err := req.Unpack(reqb); err != nil {
			return // the library never hands this to the handler
		}
		up.reply, up.fix = upb, fix
		for _, srv := range []*Server{s, sZero} {
			for round := range 2 {
				w := &nopWriter{tcp: tcp}
				srv.serve(w, req)
				if req.Response {
					if w.writes != 0 {
						t.Fatalf("answered a response")
					}
					continue
				}
				if w.writes != 1 {
					t.Fatalf("round %d: %d writes, want 1", round, w.writes)
				}
				r := new(mdns.Msg)
				if err := r.Unpack(w.last); err != nil {
					t.Fatalf("round %d: reply does not parse: %v", round, err)
				}
				if r.Id != req.Id || !r.Response {
					t.Fatalf("round %d: reply id %d response %v, request id %d", round, r.Id, r.Response, req.Id)
				}
				limit := mdns.MinMsgSize
				if opt := req.IsEdns0(); opt != nil {
					limit = max(limit, int(opt.UDPSize()))
				}
				if !tcp && len(w.last) > limit {
					t.Fatalf("round %d: %d-byte UDP reply for a %d-byte client", round, len(w.last), limit)
				}
			}
		}
		// Keep the caches from growing across the whole fuzzing run.
		s.cache, sZero.cache = newCache(64), newCache(64)
	})
}

// FuzzTTLOffsets checks the wire walker against the library's parser: on any input it neither panics nor
// points outside the message, and when both accept a message they agree on every TTL.
func FuzzTTLOffsets(f *testing.F) {
	f.Add(packFor(f, "www.example.com. 600 IN CNAME cdn.example.net.", "cdn.example.net. 60 IN A 192.0.2.10"))
	f.Add(reply(f, "x.", mdns.TypeTXT, "x. 1 IN TXT \"a\""))
	f.Add([]byte{0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0xc0, 0x0c})
	f.Fuzz(func(t *testing.T, b []byte) {
		offs, err := ttlOffsets(b, nil)
		if err != nil {
			return
		}
		for _, o := range offs {
			if int(o)+4 > len(b) {
				t.Fatalf("offset %d outside a %d-byte message", o, len(b))
			}
		}
		m := new(mdns.Msg)
		if m.Unpack(b) != nil {
			return
		}
		var want []uint32
		for _, sec := range [][]mdns.RR{m.Answer, m.Ns, m.Extra} {
			for _, rr := range sec {
				if rr.Header().Rrtype != mdns.TypeOPT {
					want = append(want, rr.Header().Ttl)
				}
			}
		}
		if len(want) != len(offs) {
			// The library drops records it cannot fully parse in some sections; only compare when it kept all.
			return
		}
		for i, o := range offs {
			if got := binary.BigEndian.Uint32(b[o:]); got != want[i] {
				t.Fatalf("record %d: TTL %d at offset %d, library says %d", i, got, o, want[i])
			}
		}
	})
}
