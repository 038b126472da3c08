package dns

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"syscall"
	"time"
)

// The values of Config.BlockResponse.
const (
	// BlockNXDomain answers a blocked name with NXDOMAIN: the name does not exist.
	BlockNXDomain = "nxdomain"
	// BlockZero answers A queries with 0.0.0.0, AAAA queries with :: and every other type with an empty
	// answer (NODATA). Some applications retry less against an address than against NXDOMAIN.
	BlockZero = "zero"
)

// Defaults for the zero values of Config.
const (
	DefaultCacheSize = 8192
	DefaultTimeout   = 2 * time.Second
	DefaultMapSize   = 65536
	DefaultMapGrace  = 5 * time.Minute
	// DefaultPort is the port of the default listen addresses, where the redirect rules point.
	DefaultPort = 53
)

// Limits that are not worth a configuration key.
const (
	// maxCacheTTL caps how long any answer is cached, whatever its records say.
	maxCacheTTL = 24 * 60 * 60
	// maxNegativeTTL caps how long NXDOMAIN and NODATA answers are cached (RFC 2308 leaves the cap to us).
	maxNegativeTTL = 15 * 60
	// blockTTL is the TTL of synthesised block answers: short, so an unblocked name works again soon.
	blockTTL = 10
	// ednsSize is the UDP payload size we advertise to clients and upstreams (the DNS flag day 2020 value,
	// which avoids IP fragmentation).
	ednsSize = 1232
)

// DefaultListen returns the default listen addresses: those the redirect rules point at (Linux DNAT, the
// Windows driver's redirect).
func DefaultListen() []string { return []string{"127.0.0.17:53", "[::1]:53"} }

// Config configures the nameserver. The zero value of each field means its default.
type Config struct {
	// Listen lists "ip:port" addresses the server answers on, over UDP and TCP alike. Port 0 picks a free
	// port (the same one for UDP and TCP); tests use it. Default: DefaultListen().
	Listen []string `json:"listen"`
	// Upstreams lists the nameservers queries are forwarded to, tried in order (the last one that answered
	// first). Forms: "ip" or "ip:port" (UDP, retried over TCP when truncated; TCP when the client used TCP),
	// "udp://ip[:port]" (the same), "tcp://ip[:port]" (TCP only) and "tls://ip[:port][#servername]"
	// (DNS over TLS, port 853 by default; the certificate is checked against servername, or the IP when it is
	// left out). Names are not accepted: the nameserver cannot resolve its own upstreams. Default: the
	// system's resolvers (see SystemUpstreams).
	Upstreams []string `json:"upstreams"`
	// BlockResponse is BlockNXDomain (the default) or BlockZero.
	BlockResponse string `json:"block_response"`
	// CacheSize bounds the number of cached answers. Default DefaultCacheSize.
	CacheSize int `json:"cache_size"`
	// Timeout bounds one attempt at one upstream. Default DefaultTimeout.
	Timeout time.Duration `json:"timeout"`
	// MapSize bounds the number of addresses the IP → domain map remembers. Default DefaultMapSize.
	MapSize int `json:"map_size"`
	// MapGrace is how long an address stays in the IP → domain map after its record's TTL ran out:
	// applications often connect after the TTL. Default DefaultMapGrace.
	MapGrace time.Duration `json:"map_grace"`
	// Control, when set, is the Control function of every upstream socket. On Linux the daemon passes
	// marks.ControlOwnSocket, so the upstream traffic carries mark 1709 and is never rerouted back to us.
	Control func(network, address string, c syscall.RawConn) error `json:"-"`
}

// WithDefaults returns c with every zero field set to its default. Upstreams stay empty: New fills them from
// the system only when it needs them.
func (c Config) WithDefaults() Config {
	if len(c.Listen) == 0 {
		c.Listen = DefaultListen()
	}
	if c.BlockResponse == "" {
		c.BlockResponse = BlockNXDomain
	}
	if c.CacheSize == 0 {
		c.CacheSize = DefaultCacheSize
	}
	if c.Timeout == 0 {
		c.Timeout = DefaultTimeout
	}
	if c.MapSize == 0 {
		c.MapSize = DefaultMapSize
	}
	if c.MapGrace == 0 {
		c.MapGrace = DefaultMapGrace
	}
	return c
}

// Validate reports every invalid field of c (after defaults are applied), each error naming its key.
func (c Config) Validate() error {
	c = c.WithDefaults()
	var errs []error
	for i, l := range c.Listen {
		if _, err := parseListen(l); err != nil {
			errs = append(errs, fmt.Errorf("listen[%d]: %w", i, err))
		}
	}
	for i, u := range c.Upstreams {
		if _, err := ParseUpstream(u); err != nil {
			errs = append(errs, fmt.Errorf("upstreams[%d]: %w", i, err))
		}
	}
	if c.BlockResponse != BlockNXDomain && c.BlockResponse != BlockZero {
		errs = append(errs, fmt.Errorf("block_response: %q is not %q or %q", c.BlockResponse, BlockNXDomain, BlockZero))
	}
	if c.CacheSize < 0 {
		errs = append(errs, fmt.Errorf("cache_size: %d is negative", c.CacheSize))
	}
	if c.MapSize < 0 {
		errs = append(errs, fmt.Errorf("map_size: %d is negative", c.MapSize))
	}
	if c.Timeout < 0 {
		errs = append(errs, fmt.Errorf("timeout: %s is negative", c.Timeout))
	}
	if c.MapGrace < 0 {
		errs = append(errs, fmt.Errorf("map_grace: %s is negative", c.MapGrace))
	}
	return errors.Join(errs...)
}

func parseListen(s string) (netip.AddrPort, error) {
	ap, err := netip.ParseAddrPort(s)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("%q is not ip:port (e.g. 127.0.0.17:53 or [::1]:53)", s)
	}
	if ap.Addr().Zone() != "" {
		return netip.AddrPort{}, fmt.Errorf("%q: zones are not supported", s)
	}
	return ap, nil
}

// Transport is how an upstream is reached.
type Transport string

// The transports of an Upstream.
const (
	// TransportUDP queries over UDP, retries over TCP when the answer is truncated, and uses TCP for
	// clients that asked over TCP.
	TransportUDP Transport = "udp"
	// TransportTCP always uses TCP.
	TransportTCP Transport = "tcp"
	// TransportTLS uses DNS over TLS (RFC 7858).
	TransportTLS Transport = "tls"
)

// Upstream is one parsed upstream nameserver.
type Upstream struct {
	Transport Transport
	Addr      netip.AddrPort
	// ServerName is the name a DNS-over-TLS certificate must carry (the IP when empty).
	ServerName string
}

// String returns the upstream in the form ParseUpstream accepts.
func (u Upstream) String() string {
	switch u.Transport {
	case TransportTLS:
		s := "tls://" + u.Addr.String()
		if u.ServerName != "" {
			s += "#" + u.ServerName
		}
		return s
	case TransportTCP:
		return "tcp://" + u.Addr.String()
	}
	return u.Addr.String()
}

// ParseUpstream parses one entry of Config.Upstreams.
func ParseUpstream(s string) (Upstream, error) {
	u := Upstream{Transport: TransportUDP}
	rest := s
	port := uint16(53)
	if scheme, r, ok := strings.Cut(s, "://"); ok {
		switch strings.ToLower(scheme) {
		case "udp":
		case "tcp":
			u.Transport = TransportTCP
		case "tls":
			u.Transport = TransportTLS
			port = 853
		default:
			return Upstream{}, fmt.Errorf("%q: unknown scheme %q (udp, tcp or tls)", s, scheme)
		}
		rest = r
	}
	if host, name, ok := strings.Cut(rest, "#"); ok {
		if u.Transport != TransportTLS {
			return Upstream{}, fmt.Errorf("%q: a #servername is only meaningful for tls://", s)
		}
		if name == "" {
			return Upstream{}, fmt.Errorf("%q: empty server name after #", s)
		}
		u.ServerName, rest = name, host
	}
	bare := rest
	if strings.HasPrefix(rest, "[") && strings.HasSuffix(rest, "]") {
		bare = rest[1 : len(rest)-1]
	}
	if a, err := netip.ParseAddr(bare); err == nil {
		u.Addr = netip.AddrPortFrom(a, port)
	} else {
		ap, err := netip.ParseAddrPort(rest)
		if err != nil {
			return Upstream{}, fmt.Errorf("%q is not ip, ip:port or [ipv6]:port (names are not accepted)", s)
		}
		if ap.Port() == 0 {
			return Upstream{}, fmt.Errorf("%q: port 0", s)
		}
		u.Addr = ap
	}
	if u.Addr.Addr().Zone() != "" {
		return Upstream{}, fmt.Errorf("%q: zones are not supported", s)
	}
	if u.Addr.Addr().IsUnspecified() {
		return Upstream{}, fmt.Errorf("%q: unspecified address", s)
	}
	u.Addr = netip.AddrPortFrom(u.Addr.Addr().Unmap(), u.Addr.Port())
	return u, nil
}
