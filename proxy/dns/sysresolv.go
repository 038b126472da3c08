package dns

import (
	"bufio"
	"errors"
	"io"
	"log/slog"
	"net/netip"
	"strings"
)

// SystemUpstreams returns the system's resolvers as upstreams, leaving out our own listen addresses (self).
//
// Loopback resolvers are stubs (systemd-resolved's 127.0.0.53, dnsmasq on 127.0.0.1) whose own upstream
// queries are applications' port-53 traffic: the pipeline reroutes those to us, so forwarding to the stub
// would loop. They are therefore skipped in favour of the servers behind the stub (on Linux,
// /run/systemd/resolve/resolv.conf lists systemd-resolved's). Only when nothing else is known is a loopback
// stub used, with a warning: then the stub's own traffic must be exempt from rerouting. Our own queries never
// loop on their own, since our upstream sockets carry mark 1709 (Linux) or our PID (Windows).
func SystemUpstreams(self []netip.AddrPort, log *slog.Logger) ([]string, error) {
	primary, fallback, err := systemResolvers()
	if err != nil && len(primary) == 0 && len(fallback) == 0 {
		return nil, err
	}
	ups, stubOnly := chooseUpstreams(primary, fallback, self)
	if len(ups) == 0 {
		return nil, errors.New("the system lists no usable resolver")
	}
	if stubOnly && log != nil {
		log.Warn("nameserver: only a loopback resolver is known; its own upstream traffic must not be rerouted to "+
			"Warden or queries will loop (set nameserver.upstreams)", "upstreams", ups)
	}
	return ups, nil
}

// chooseUpstreams picks upstreams from the primary list (e.g. /etc/resolv.conf) and the list behind a local
// stub (fallback), as SystemUpstreams describes. stubOnly reports that only loopback stubs were found.
func chooseUpstreams(primary, fallback []netip.Addr, self []netip.AddrPort) (ups []string, stubOnly bool) {
	isSelf := func(a netip.Addr) bool {
		for _, s := range self {
			if s.Addr() == a && (s.Port() == 53 || s.Port() == 0) {
				return true
			}
		}
		return a == netip.AddrFrom4([4]byte{127, 0, 0, 17}) // where the redirect rules point
	}
	pick := func(list []netip.Addr, loopback bool) []string {
		var out []string
		seen := map[netip.Addr]bool{}
		for _, a := range list {
			a = a.Unmap()
			if seen[a] || isSelf(a) || a.IsUnspecified() || a.IsLoopback() != loopback {
				continue
			}
			seen[a] = true
			out = append(out, netip.AddrPortFrom(a, 53).String())
		}
		return out
	}
	if ups = pick(primary, false); len(ups) > 0 {
		return ups, false
	}
	if ups = pick(fallback, false); len(ups) > 0 {
		return ups, false
	}
	return pick(primary, true), true
}

// parseResolvConf returns the nameserver addresses of a resolv.conf. Link-local IPv6 servers need a zone,
// which netip keeps; they are dropped later by the upstream parser (zones are not supported).
func parseResolvConf(r io.Reader) []netip.Addr {
	var out []netip.Addr
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		line := sc.Text()
		if i := strings.IndexAny(line, "#;"); i >= 0 {
			line = line[:i]
		}
		f := strings.Fields(line)
		if len(f) < 2 || f[0] != "nameserver" {
			continue
		}
		if a, err := netip.ParseAddr(f[1]); err == nil && a.Zone() == "" {
			out = append(out, a)
		}
	}
	return out
}
