package config

import (
	"fmt"
	"net"
	"net/netip"
	"os/user"
	"runtime"
	"strconv"
	"strings"

	"github.com/warden-fw/warden/config/glob"
	"github.com/warden-fw/warden/proxy/dns"
)

func (c *Config) validate(el *errorList) {
	switch c.Backend {
	case "auto", "nfqueue", "windowskext":
	default:
		el.add("backend", "%q is not a backend (auto | nfqueue | windowskext)", c.Backend)
	}
	switch c.FailMode {
	case "open":
	case "closed":
		c.FailClosed = true
	default:
		el.add("fail_mode", "%q is not a fail mode (open | closed)", c.FailMode)
	}
	c.Default = parseDefault(el, "default_action", c.DefaultAction)
	c.InboundDefaultA = parseDefault(el, "inbound_default", c.InboundDefault)
	if c.VerdictTimeout < 100e6 || c.VerdictTimeout > 60e9 {
		el.add("verdict_timeout", "%s is out of range (100ms-60s)", c.VerdictTimeout)
	}
	if c.MaxConnections < 1024 || c.MaxConnections > 16<<20 {
		el.add("max_connections", "%d is out of range (1024-16777216)", c.MaxConnections)
	}

	names := make(map[string]int, len(c.Rules))
	for i := range c.Rules {
		r := &c.Rules[i]
		p := fmt.Sprintf("rules[%d]", i)
		r.validate(el, p)
		if r.Name != "" {
			if prev, dup := names[r.Name]; dup {
				el.add(p+".name", "%q is already the name of rules[%d]", r.Name, prev)
			} else {
				names[r.Name] = i
			}
		}
	}

	st := &c.SplitTunnel
	validateInterfaceSpec(el, "split_tunnel.interface", st.Interface, true)
	if st.Port < 1 || st.Port > 65535 {
		el.add("split_tunnel.port", "%q is not a port (1-65535)", strconv.Itoa(st.Port))
	}
	switch st.Mode {
	case "auto", "route", "proxy":
	default:
		el.add("split_tunnel.mode", "%q is not an option (auto | route | proxy)", st.Mode)
	}
	switch st.OnInterfaceDown {
	case "block", "direct":
	default:
		el.add("split_tunnel.on_interface_down", "%q is not an option (block | direct)", st.OnInterfaceDown)
	}
	if st.MaxSessions < 1 || st.MaxSessions > 1<<20 {
		el.add("split_tunnel.max_sessions", "%d is out of range (1-1048576)", st.MaxSessions)
	}
	if st.IdleTimeout < 1e9 {
		el.add("split_tunnel.idle_timeout", "%s is too short (at least 1s)", st.IdleTimeout)
	}
	if st.UDPIdleTimeout < 1e9 {
		el.add("split_tunnel.udp_idle_timeout", "%s is too short (at least 1s)", st.UDPIdleTimeout)
	}
	if st.KernelHandoff && st.Mode != "proxy" {
		// In route mode the kernel carries the bytes already; auto could be either.
		el.add("split_tunnel.kernel_handoff", "needs split_tunnel.mode: proxy (the mode is %q)", st.Mode)
	}

	if c.Control.Socket == "" {
		c.Control.Socket = DefaultSocketPath()
	} else if !strings.HasPrefix(c.Control.Socket, "/") && !strings.HasPrefix(c.Control.Socket, `\\.\pipe\`) {
		el.add("control.socket", "%q is not an absolute path (or a \\\\.\\pipe\\ name on Windows)", c.Control.Socket)
	}
	if c.Metrics.Listen != "" {
		host, port, err := net.SplitHostPort(c.Metrics.Listen)
		if err != nil {
			el.add("metrics.listen", "%q is not host:port", c.Metrics.Listen)
		} else if _, err := strconv.ParseUint(port, 10, 16); err != nil {
			el.add("metrics.listen", "%q has no valid port", c.Metrics.Listen)
		} else if host != "" && host != "localhost" {
			if _, err := netip.ParseAddr(host); err != nil {
				el.add("metrics.listen", "%q: host must be an IP address or localhost", c.Metrics.Listen)
			}
		}
	}
	switch c.Log.Level {
	case "debug", "info", "warn", "error":
	default:
		el.add("log.level", "%q is not a level (debug | info | warn | error)", c.Log.Level)
	}
	switch c.Log.Format {
	case "text", "json":
	default:
		el.add("log.format", "%q is not a format (text | json)", c.Log.Format)
	}
	if c.Log.Connections != "" && !strings.HasPrefix(c.Log.Connections, "/") && !isWindowsPath(c.Log.Connections) {
		el.add("log.connections", "%q is not an absolute path", c.Log.Connections)
	}
	c.Nameserver.validate(el)
	if c.NFQueue.QueueBase < 0 || c.NFQueue.QueueBase > 65535 {
		el.add("nfqueue.queue_base", "%d is not a queue number (0-65535)", c.NFQueue.QueueBase)
	}
	if c.NFQueue.Queues < 1 || c.NFQueue.Queues > 64 {
		el.add("nfqueue.queues", "%d is out of range (1-64)", c.NFQueue.Queues)
	} else if c.NFQueue.QueueBase >= 0 && c.NFQueue.QueueBase+2*c.NFQueue.Queues > 65536 {
		el.add("nfqueue.queues", "%d queues from %d run past queue 65535", c.NFQueue.Queues, c.NFQueue.QueueBase)
	}
}

func parseDefault(el *errorList, path, s string) Action {
	switch s {
	case "allow":
		return Allow
	case "block":
		return BlockAction
	case "drop":
		return DropAction
	}
	el.add(path, "%q is not an action (allow | block | drop)", s)
	return Allow
}

func isWindowsPath(s string) bool {
	return len(s) >= 3 && s[1] == ':' && (s[2] == '\\' || s[2] == '/')
}

func (r *Rule) validate(el *errorList, p string) {
	if strings.TrimSpace(r.Name) == "" {
		el.add(p+".name", "missing: every rule needs a unique name")
	}
	switch r.ActionName {
	case "allow":
		r.Action = Allow
	case "block":
		r.Action = BlockAction
	case "drop":
		r.Action = DropAction
	case "split":
		r.Action = Split
	case "":
		el.add(p+".action", "missing (allow | block | drop | split)")
	default:
		el.add(p+".action", "%q is not an action (allow | block | drop | split)", r.ActionName)
	}
	switch r.DirName {
	case "outbound":
		r.Direction = Outbound
	case "inbound":
		r.Direction = Inbound
	case "any":
		r.Direction = AnyDirection
	default:
		el.add(p+".direction", "%q is not a direction (outbound | inbound | any)", r.DirName)
	}
	switch r.ProtoName {
	case "any":
		r.Protocol = AnyProtocol
	case "tcp":
		r.Protocol = TCP
	case "udp":
		r.Protocol = UDP
	case "icmp":
		r.Protocol = ICMP
	default:
		el.add(p+".protocol", "%q is not a protocol (tcp | udp | icmp | any)", r.ProtoName)
	}
	if r.App != "" {
		if _, err := glob.Compile(r.App); err != nil {
			el.add(p+".app", "%q: %v", r.App, err)
		}
	}
	r.UID = -1
	if r.User != "" {
		if uid, err := strconv.ParseUint(r.User, 10, 31); err == nil {
			r.UID = int32(uid)
		} else if u, err := user.Lookup(r.User); err != nil {
			el.add(p+".user", "%q is not a known user or numeric uid", r.User)
		} else if uid, err := strconv.ParseUint(u.Uid, 10, 31); err == nil {
			r.UID = int32(uid)
		} else {
			// Windows SIDs are not numeric; such rules match on the user name the backend reports.
			el.add(p+".user", "%q has no numeric uid on this system (use the numeric id)", r.User)
		}
	}
	for i, s := range r.RemoteRaw {
		ip := fmt.Sprintf("%s.remote[%d]", p, i)
		if pfx, ok := parsePrefix(s); ok {
			r.Prefixes = append(r.Prefixes, pfx)
			continue
		}
		if strings.ContainsAny(s, "/:") || looksNumeric(s) {
			el.add(ip, "%q is not an IP address or CIDR", s)
			continue
		}
		d, err := normalizeDomain(s)
		if err != nil {
			el.add(ip, "%q is not an IP, CIDR or domain: %v", s, err)
			continue
		}
		r.Domains = append(r.Domains, d)
	}
	for i, s := range r.PortsRaw {
		pr, err := parsePortRange(s)
		if err != nil {
			el.add(fmt.Sprintf("%s.ports[%d]", p, i), "%q %v", s, err)
			continue
		}
		r.Ports = append(r.Ports, pr)
	}
	if len(r.PortsRaw) > 0 && r.Protocol == ICMP {
		el.add(p+".ports", "ICMP has no ports; drop ports or set protocol tcp/udp")
	}
	if r.Interface != "" {
		validateInterfaceSpec(el, p+".interface", r.Interface, false)
	}
	if r.Action == Split {
		if r.Direction != Outbound {
			el.add(p+".direction", "%q: only outbound connections can be split", r.DirName)
		}
		if r.Protocol == ICMP {
			el.add(p+".protocol", "\"icmp\": only TCP and UDP can be split")
		}
		if r.Via != "" {
			validateInterfaceSpec(el, p+".via", r.Via, false)
		}
	} else if r.Via != "" {
		el.add(p+".via", "%q: via is only valid with action split", r.Via)
	}
}

func looksNumeric(s string) bool {
	return strings.Trim(s, "0123456789.") == ""
}

// parsePrefix accepts an IP address or a CIDR and returns it as a masked prefix.
func parsePrefix(s string) (netip.Prefix, bool) {
	if strings.Contains(s, "/") {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return netip.Prefix{}, false
		}
		p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-unmapBits(p.Addr()))
		return p.Masked(), true
	}
	a, err := netip.ParseAddr(s)
	if err != nil || a.Zone() != "" {
		return netip.Prefix{}, false
	}
	a = a.Unmap()
	return netip.PrefixFrom(a, a.BitLen()), true
}

func unmapBits(a netip.Addr) int {
	if a.Is4In6() {
		return 96
	}
	return 0
}

// NormalizeDomain checks a domain name (no "*." pattern) and returns it lower-case without a trailing dot.
func NormalizeDomain(s string) (string, error) {
	d, err := normalizeDomain(s)
	if err == nil && strings.HasPrefix(d, "*.") {
		return "", fmt.Errorf("a pattern, not a name")
	}
	return d, err
}

// normalizeDomain checks a domain or "*.suffix" pattern and returns it lower-case without a trailing dot.
func normalizeDomain(s string) (string, error) {
	d := strings.TrimSuffix(strings.ToLower(strings.TrimSpace(s)), ".")
	body := strings.TrimPrefix(d, "*.")
	if body == "" {
		return "", fmt.Errorf("empty domain")
	}
	if len(body) > 253 {
		return "", fmt.Errorf("longer than 253 characters")
	}
	for _, label := range strings.Split(body, ".") {
		if label == "" || len(label) > 63 {
			return "", fmt.Errorf("label %q must be 1-63 characters", label)
		}
		for j := 0; j < len(label); j++ {
			ch := label[j]
			ok := ch >= 'a' && ch <= 'z' || ch >= '0' && ch <= '9' || ch == '-' || ch == '_'
			if !ok {
				return "", fmt.Errorf("character %q not allowed", ch)
			}
		}
		if label[0] == '-' || label[len(label)-1] == '-' {
			return "", fmt.Errorf("label %q starts or ends with '-'", label)
		}
	}
	return d, nil
}

func parsePortRange(s string) (PortRange, error) {
	lo, hi, isRange := strings.Cut(strings.TrimSpace(s), "-")
	a, err := parsePort(lo)
	if err != nil {
		return PortRange{}, err
	}
	if !isRange {
		return PortRange{a, a}, nil
	}
	b, err := parsePort(hi)
	if err != nil {
		return PortRange{}, err
	}
	if b < a {
		return PortRange{}, fmt.Errorf("is an empty range (the end is below the start)")
	}
	return PortRange{a, b}, nil
}

func parsePort(s string) (uint16, error) {
	n, err := strconv.ParseUint(strings.TrimSpace(s), 10, 32)
	if err != nil || n < 1 || n > 65535 {
		return 0, fmt.Errorf("is not a port (1-65535)")
	}
	return uint16(n), nil
}

// validateInterfaceSpec checks an interface given by name, IP or MAC (allowAuto: also "auto").
func validateInterfaceSpec(el *errorList, path, s string, allowAuto bool) {
	if s == "auto" && allowAuto {
		return
	}
	if _, err := netip.ParseAddr(s); err == nil {
		return
	}
	if _, err := net.ParseMAC(s); err == nil {
		return
	}
	if s == "" || len(s) > 256 || strings.ContainsAny(s, " /\t\n") && !isWindowsFriendly(s) {
		el.add(path, "%q is not an interface name, IP or MAC", s)
	}
}

// isWindowsFriendly allows Windows adapter names such as "Ethernet 2" (spaces are legal there).
func isWindowsFriendly(s string) bool {
	return !strings.ContainsAny(s, "/\t\n")
}

// DefaultNameserverListen returns where the redirect sends DNS on this OS: the Linux rules DNAT to
// 127.0.0.17, the Windows driver rewrites the destination to 127.0.0.1.
func DefaultNameserverListen() []string {
	if runtime.GOOS == "windows" {
		return []string{"127.0.0.1:53", "[::1]:53"}
	}
	return []string{"127.0.0.17:53", "[::1]:53"}
}

func (n *Nameserver) validate(el *errorList) {
	if len(n.Listen) == 0 {
		n.Listen = DefaultNameserverListen()
	}
	for i, l := range n.Listen {
		if _, err := netip.ParseAddrPort(l); err != nil {
			el.add(fmt.Sprintf("nameserver.listen[%d]", i), "%q is not ip:port", l)
		}
	}
	for i, u := range n.Upstreams {
		if _, err := dns.ParseUpstream(u); err != nil {
			el.add(fmt.Sprintf("nameserver.upstreams[%d]", i), "%q: %v", u, err)
		}
	}
	switch n.BlockResponse {
	case dns.BlockNXDomain, dns.BlockZero:
	default:
		el.add("nameserver.block_response", "%q is not a block response (nxdomain | zero)", n.BlockResponse)
	}
	if n.CacheSize < 0 || n.CacheSize > 1<<22 {
		el.add("nameserver.cache_size", "%d is out of range (0-4194304)", n.CacheSize)
	}
	if n.Timeout < 100e6 || n.Timeout > 30e9 {
		el.add("nameserver.timeout", "%s is out of range (100ms-30s)", n.Timeout)
	}
}
