package dns

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net"
	"sync/atomic"
	"testing"
	"time"

	mdns "github.com/miekg/dns"
)

// countingListener counts accepted connections, to see whether DNS-over-TLS connections are reused.
type countingListener struct {
	net.Listener
	n atomic.Int64
}

func (l *countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.n.Add(1)
	}
	return c, err
}

// startTLSUpstream serves the default zone over DNS over TLS with a fresh self-signed certificate for
// "dns.test" and 127.0.0.1, and returns its address and a pool trusting the certificate.
func startTLSUpstream(t *testing.T) (string, *x509.CertPool, *countingListener, *testUpstream) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "dns.test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		DNSNames: []string{"dns.test"}, IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(cert)

	up := &testUpstream{t: t, records: defaultZone(t), nxTTL: 60, truncUDP: map[string]bool{}}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cl := &countingListener{Listener: ln}
	tl := tls.NewListener(cl, &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}})
	startMDNS(t, &mdns.Server{Listener: tl, Net: "tcp-tls", Handler: mdns.HandlerFunc(up.serve)})
	return ln.Addr().String(), pool, cl, up
}

func TestDNSOverTLS(t *testing.T) {
	addr, pool, cl, up := startTLSUpstream(t)
	tests := []struct {
		name     string
		upstream string
		ok       bool
	}{
		{"server name", "tls://" + addr + "#dns.test", true},
		{"ip in certificate", "tls://" + addr, true},
		{"wrong server name", "tls://" + addr + "#other.test", false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			before := cl.n.Load()
			s, err := newServer(Config{Listen: []string{"127.0.0.1:0"}, Upstreams: []string{tc.upstream},
				Timeout: time.Second}, nil, nil, pool)
			if err != nil {
				t.Fatal(err)
			}
			if err := s.Start(context.Background()); err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			srv := s.Addrs()[0].String()
			r := ask(t, srv, "udp", "example.com.", mdns.TypeA, false)
			if !tc.ok {
				if r.Rcode != mdns.RcodeServerFailure {
					t.Errorf("rcode %s, want SERVFAIL: the certificate must be checked", mdns.RcodeToString[r.Rcode])
				}
				return
			}
			if len(r.Answer) != 1 {
				t.Fatalf("answer %v", r)
			}
			ask(t, srv, "tcp", "example.com.", mdns.TypeAAAA, false)
			ask(t, srv, "udp", "www.example.com.", mdns.TypeA, false)
			if n := cl.n.Load() - before; n != 1 {
				t.Errorf("%d TLS connections for 3 sequential queries, want 1 (reuse)", n)
			}
		})
	}
	if up.udpQueries.Load() != 0 {
		t.Error("a DNS-over-TLS upstream was asked over plain UDP")
	}
}
