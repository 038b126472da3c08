package sandbox

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"

	mdns "github.com/miekg/dns"
)

// DNSRecord is one resource record of a test zone, or of an answer.
type DNSRecord struct {
	// Name is the owner name ("a.example.net"; a trailing dot is optional).
	Name string `json:"name"`
	// Type is A, AAAA or CNAME.
	Type string `json:"type"`
	// Value is the address (A, AAAA) or the target name (CNAME).
	Value string `json:"value"`
	TTL   uint32 `json:"ttl"`
}

// dnsZone is one DNS server an agent runs (dns-serve): an authoritative-looking answerer for a fixed set of
// records that counts every question it is asked.
type dnsZone struct {
	records map[string][]mdns.RR // by lower-case FQDN

	mu      sync.Mutex // guards queries
	queries map[string]int
}

// serveDNS starts a DNS server named req.Name answering from req.Records, over UDP on req.UDP ports and TCP
// on req.TCP ports of every address in req.Addrs. A name not in the zone gets NXDOMAIN (without an SOA, so
// it is not cached negatively); a CNAME is followed within the zone, as a recursive resolver would.
func (a *agent) serveDNS(req *Request) ([]string, error) {
	if req.Name == "" {
		return nil, errors.New("dns-serve: a name is required (dns-count asks by it)")
	}
	z := &dnsZone{records: map[string][]mdns.RR{}, queries: map[string]int{}}
	for _, r := range req.Records {
		rr, err := r.rr()
		if err != nil {
			return nil, fmt.Errorf("dns-serve: %w", err)
		}
		n := rr.Header().Name
		z.records[n] = append(z.records[n], rr)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.dns[req.Name] != nil {
		return nil, fmt.Errorf("dns-serve: a server named %q already runs", req.Name)
	}
	var listening []string
	for _, s := range req.Addrs {
		ip, err := netip.ParseAddr(s)
		if err != nil {
			return listening, fmt.Errorf("dns-serve: %w", err)
		}
		for _, port := range req.UDP {
			pc, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(ip, port)))
			if err != nil {
				return listening, fmt.Errorf("dns-serve: %w", err)
			}
			a.closers = append(a.closers, pc)
			listening = append(listening, "udp "+pc.LocalAddr().String())
			srv := &mdns.Server{PacketConn: pc, Handler: mdns.HandlerFunc(z.serve)}
			go func() { _ = srv.ActivateAndServe() }() // ends when the agent closes pc
		}
		for _, port := range req.TCP {
			ln, err := net.ListenTCP("tcp", net.TCPAddrFromAddrPort(netip.AddrPortFrom(ip, port)))
			if err != nil {
				return listening, fmt.Errorf("dns-serve: %w", err)
			}
			a.closers = append(a.closers, ln)
			listening = append(listening, "tcp "+ln.Addr().String())
			srv := &mdns.Server{Listener: ln, Handler: mdns.HandlerFunc(z.serve)}
			go func() { _ = srv.ActivateAndServe() }()
		}
	}
	a.dns[req.Name] = z
	return listening, nil
}

// countDNS reports the questions the server named req.Name has been asked so far.
func (a *agent) countDNS(req *Request) Response {
	var resp Response
	a.mu.Lock()
	z := a.dns[req.Name]
	a.mu.Unlock()
	if z == nil {
		resp.Err = fmt.Sprintf("dns-count: no DNS server named %q", req.Name)
		return resp
	}
	z.mu.Lock()
	defer z.mu.Unlock()
	resp.DNSQueries = make(map[string]int, len(z.queries))
	for k, n := range z.queries {
		resp.DNSQueries[k] = n
	}
	return resp
}

// DNSQueryKey is the key under which dns-count reports questions: "udp a.example.net A".
func DNSQueryKey(network, name, qtype string) string {
	return network + " " + strings.TrimSuffix(strings.ToLower(name), ".") + " " + strings.ToUpper(qtype)
}

func (z *dnsZone) serve(w mdns.ResponseWriter, req *mdns.Msg) {
	m := new(mdns.Msg)
	if len(req.Question) != 1 {
		m.SetRcode(req, mdns.RcodeFormatError)
		_ = w.WriteMsg(m)
		return
	}
	q := req.Question[0]
	network := "udp"
	if _, ok := w.LocalAddr().(*net.TCPAddr); ok {
		network = "tcp"
	}
	z.mu.Lock()
	z.queries[DNSQueryKey(network, q.Name, mdns.TypeToString[q.Qtype])]++
	z.mu.Unlock()

	m.SetReply(req)
	m.Authoritative = true
	m.RecursionAvailable = true
	name := strings.ToLower(q.Name)
	if _, ok := z.records[name]; !ok {
		m.Rcode = mdns.RcodeNameError
	}
	for range 8 {
		rrs := z.records[name]
		next := ""
		for _, rr := range rrs {
			if c, ok := rr.(*mdns.CNAME); ok && q.Qtype != mdns.TypeCNAME {
				m.Answer = append(m.Answer, mdns.Copy(rr))
				next = c.Target
				break
			}
		}
		if next == "" {
			for _, rr := range rrs {
				if rr.Header().Rrtype == q.Qtype {
					m.Answer = append(m.Answer, mdns.Copy(rr))
				}
			}
			break
		}
		name = next
	}
	for _, rr := range m.Answer {
		rr.Header().Name = strings.ToLower(rr.Header().Name)
	}
	if req.IsEdns0() != nil {
		m.SetEdns0(1232, false)
	}
	_ = w.WriteMsg(m)
}

func (r DNSRecord) rr() (mdns.RR, error) {
	hdr := mdns.RR_Header{Name: mdns.Fqdn(strings.ToLower(r.Name)), Class: mdns.ClassINET, Ttl: r.TTL}
	switch strings.ToUpper(r.Type) {
	case "A":
		ip, err := netip.ParseAddr(r.Value)
		if err != nil || !ip.Is4() {
			return nil, fmt.Errorf("record %s A %q: not an IPv4 address", r.Name, r.Value)
		}
		hdr.Rrtype = mdns.TypeA
		return &mdns.A{Hdr: hdr, A: ip.AsSlice()}, nil
	case "AAAA":
		ip, err := netip.ParseAddr(r.Value)
		if err != nil || !ip.Is6() || ip.Is4In6() {
			return nil, fmt.Errorf("record %s AAAA %q: not an IPv6 address", r.Name, r.Value)
		}
		hdr.Rrtype = mdns.TypeAAAA
		return &mdns.AAAA{Hdr: hdr, AAAA: ip.AsSlice()}, nil
	case "CNAME":
		hdr.Rrtype = mdns.TypeCNAME
		return &mdns.CNAME{Hdr: hdr, Target: mdns.Fqdn(strings.ToLower(r.Value))}, nil
	}
	return nil, fmt.Errorf("record %s: type %q is not A, AAAA or CNAME", r.Name, r.Type)
}

// queryDNS asks the server at req.Dst one question (req.QName, req.QType) over req.Net and reports the
// reply's rcode and its A, AAAA and CNAME records. A reply of any rcode is Connected; no reply is an
// outcome like any other probe's (timeout, refused).
func queryDNS(req *Request) Response {
	var resp Response
	network := req.Net
	if network == "" {
		network = "udp"
	}
	if network != "udp" && network != "tcp" {
		resp.Err = fmt.Sprintf("dns: net %q is not udp or tcp", req.Net)
		return resp
	}
	qtype := mdns.TypeA
	if req.QType != "" {
		t, ok := mdns.StringToType[strings.ToUpper(req.QType)]
		if !ok {
			resp.Err = fmt.Sprintf("dns: unknown query type %q", req.QType)
			return resp
		}
		qtype = t
	}
	if _, err := netip.ParseAddrPort(req.Dst); err != nil {
		resp.Err = fmt.Sprintf("dns: server %q: %v", req.Dst, err)
		return resp
	}
	m := new(mdns.Msg)
	m.SetQuestion(mdns.Fqdn(req.QName), qtype)
	c := &mdns.Client{Net: network, Timeout: req.timeout()}
	r, _, err := c.Exchange(m, req.Dst)
	if err != nil {
		resp.Outcome, resp.Detail = Classify(err), err.Error()
		return resp
	}
	resp.Outcome, resp.Peer, resp.Rcode = Connected, req.Dst, mdns.RcodeToString[r.Rcode]
	for _, rr := range r.Answer {
		d := DNSRecord{Name: strings.TrimSuffix(rr.Header().Name, "."), TTL: rr.Header().Ttl}
		switch v := rr.(type) {
		case *mdns.A:
			d.Type, d.Value = "A", v.A.String()
		case *mdns.AAAA:
			d.Type, d.Value = "AAAA", v.AAAA.String()
		case *mdns.CNAME:
			d.Type, d.Value = "CNAME", strings.TrimSuffix(v.Target, ".")
		default:
			continue
		}
		resp.Answers = append(resp.Answers, d)
	}
	return resp
}

// Addrs returns the addresses among a DNS reply's answers, in order.
func (r *Response) Addrs() []netip.Addr {
	var out []netip.Addr
	for _, d := range r.Answers {
		if d.Type == "A" || d.Type == "AAAA" {
			if ip, err := netip.ParseAddr(d.Value); err == nil {
				out = append(out, ip)
			}
		}
	}
	return out
}
