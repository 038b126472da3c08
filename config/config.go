// Package config loads, validates and watches Warden's configuration. Loading goes through viper (YAML, TOML
// or JSON by file extension, plus WARDEN_* environment overrides); validation is strict and reports every
// problem at once with its key path. The result is an immutable *Config: nothing in it changes after Load
// returns, so the firewall may share it freely.
package config

import (
	"net/netip"
	"time"
)

// DefaultPath is where the daemon looks for its config when -c is not given (see DefaultConfigPath for the
// per-OS value).
const envPrefix = "WARDEN"

// Config is a validated configuration. Fields tagged `key` come from the file (the tag is the key path
// element); the others are derived during validation.
type Config struct {
	Backend        string `key:"backend" default:"auto" doc:"interception backend: auto | nfqueue | windowskext"`
	FailMode       string `key:"fail_mode" default:"open" doc:"open: traffic passes while the daemon is down; closed: it is blocked"`
	DefaultAction  string `key:"default_action" default:"allow" doc:"allow | block | drop, for outbound connections no rule matches"`
	InboundDefault string `key:"inbound_default" default:"allow" doc:"allow | block | drop, for inbound connections no rule matches"`
	// VerdictTimeout bounds how long a packet may wait for a decision.
	VerdictTimeout time.Duration `key:"verdict_timeout" default:"3s" doc:"a packet not decided within this time gets the fail-mode verdict"`
	// MaxConnections bounds the connection table.
	MaxConnections int `key:"max_connections" default:"262144" doc:"upper bound on tracked connections"`

	Rules       []Rule      `key:"rules" doc:"ordered rules; the first rule that matches decides"`
	SplitTunnel SplitTunnel `key:"split_tunnel"`
	Control     Control     `key:"control"`
	Metrics     Metrics     `key:"metrics"`
	Log         Log         `key:"log"`
	Nameserver  Nameserver  `key:"nameserver"`
	NFQueue     NFQueue     `key:"nfqueue"`
	WindowsKext WindowsKext `key:"windowskext"`

	// Derived.
	FailClosed      bool
	Default         Action
	InboundDefaultA Action
	// File is the file the config was read from ("" when built from bytes); LoadedAt when it was read.
	File     string
	LoadedAt time.Time
}

// Rule is one policy rule. A rule matches when every field it sets matches; fields left out match anything.
type Rule struct {
	Name       string   `key:"name" doc:"required, unique"`
	ActionName string   `key:"action" doc:"allow | block | drop | split (required)"`
	DirName    string   `key:"direction" default:"outbound" doc:"outbound (default) | inbound | any"`
	ProtoName  string   `key:"protocol" default:"any" doc:"tcp | udp | icmp | any (default)"`
	App        string   `key:"app" doc:"executable path glob: * within a path segment, ** across segments"`
	User       string   `key:"user" doc:"user name or numeric uid"`
	RemoteRaw  []string `key:"remote" doc:"the other end: IPs, CIDRs, domains (example.com) and domain suffixes (*.example.org)"`
	PortsRaw   []string `key:"ports" doc:"service ports and ranges (\"8000-8100\"): remote port if outbound, local port if inbound"`
	Interface  string   `key:"interface" doc:"the interface the packet uses"`
	Via        string   `key:"via" doc:"split only: the interface for this rule (default split_tunnel.interface)"`

	// Derived.
	Action    Action
	Direction Direction
	Protocol  Protocol
	// UID is the user's numeric id, or -1 when the rule does not restrict the user.
	UID int32
	// Prefixes are the IP/CIDR entries of remote, masked.
	Prefixes []netip.Prefix
	// Domains are the domain entries of remote, lower-case, without a trailing dot; suffix patterns keep their
	// "*." prefix.
	Domains []string
	Ports   []PortRange
}

// SplitTunnel configures the split-tunnel proxy.
type SplitTunnel struct {
	Interface       string        `key:"interface" default:"auto" doc:"name, IP or MAC of the interface split traffic leaves through; auto = the lowest-metric default route's interface that is not a tunnel"`
	Port            int           `key:"port" default:"719" doc:"the proxy's port on 127.0.0.17 and [::1]"`
	Mode            string        `key:"mode" default:"auto" doc:"auto | route | proxy: route carries split connections by kernel policy routing (Linux), proxy relays them through the split-tunnel proxy; auto = route where the platform can"`
	OnInterfaceDown string        `key:"on_interface_down" default:"block" doc:"block | direct, when the split interface is gone"`
	MaxSessions     int           `key:"max_sessions" default:"4096" doc:"upper bound on concurrent proxied TCP connections and UDP sessions (each)"`
	IdleTimeout     time.Duration `key:"idle_timeout" default:"5m" doc:"TCP relays idle this long are closed"`
	UDPIdleTimeout  time.Duration `key:"udp_idle_timeout" default:"1m" doc:"UDP sessions idle this long expire"`
	KernelHandoff   bool          `key:"kernel_handoff" default:"false" doc:"mode proxy, Linux: put relayed TCP downloads into the application's socket in the kernel (BPF sockmap) instead of over loopback; applications reading their sockets with splice(2) would see no data"`
}

// Control configures the local control API.
type Control struct {
	Socket string `key:"socket" doc:"control socket path (root-only, 0600); default /run/warden/warden.sock, Windows \\\\.\\pipe\\warden"`
}

// Metrics configures the Prometheus endpoint.
type Metrics struct {
	Listen string `key:"listen" default:"" doc:"address for Prometheus /metrics, e.g. 127.0.0.1:9717; empty = off"`
}

// Log configures logging.
type Log struct {
	Level       string `key:"level" default:"info" doc:"debug | info | warn | error"`
	Format      string `key:"format" default:"text" doc:"text | json"`
	Connections string `key:"connections" default:"" doc:"file for one JSON line per decided connection; empty = off"`
}

// Nameserver configures the local nameserver applications' DNS is rerouted to.
type Nameserver struct {
	Enabled       bool          `key:"enabled" default:"true" doc:"run the local nameserver and reroute applications' DNS to it (domain rules need it)"`
	Listen        []string      `key:"listen" doc:"ip:port addresses; default 127.0.0.17:53 and [::1]:53 (Windows: 127.0.0.1:53 and [::1]:53)"`
	Upstreams     []string      `key:"upstreams" doc:"nameservers to forward to: ip, ip:port, tcp://ip:port, tls://ip:port#name; default: the system's"`
	BlockResponse string        `key:"block_response" default:"nxdomain" doc:"answer for names a domain rule blocks: nxdomain | zero (0.0.0.0 / ::)"`
	CacheSize     int           `key:"cache_size" default:"8192" doc:"cached answers"`
	Timeout       time.Duration `key:"timeout" default:"2s" doc:"per upstream attempt"`
}

// NFQueue configures the Linux backend.
type NFQueue struct {
	QueueBase int `key:"queue_base" default:"1700" doc:"first NFQUEUE number Warden uses"`
	Queues    int `key:"queues" default:"2" doc:"queues per hook (balanced over cores)"`
}

// WindowsKext configures the Windows backend.
type WindowsKext struct {
	DriverPath string `key:"driver_path" default:"" doc:"path of portmaster-kext.sys; default next to warden.exe"`
}

// Action is what a rule (or a default) does with a connection.
type Action uint8

// The actions.
const (
	Allow Action = iota
	BlockAction
	DropAction
	Split
)

func (a Action) String() string {
	switch a {
	case BlockAction:
		return "block"
	case DropAction:
		return "drop"
	case Split:
		return "split"
	}
	return "allow"
}

// Direction restricts a rule to outbound or inbound connections.
type Direction uint8

// The directions a rule may name.
const (
	Outbound Direction = iota
	Inbound
	AnyDirection
)

func (d Direction) String() string {
	switch d {
	case Inbound:
		return "inbound"
	case AnyDirection:
		return "any"
	}
	return "outbound"
}

// Protocol restricts a rule to one protocol family.
type Protocol uint8

// The protocols a rule may name. ICMP covers ICMPv6 too.
const (
	AnyProtocol Protocol = iota
	TCP
	UDP
	ICMP
)

func (p Protocol) String() string {
	switch p {
	case TCP:
		return "tcp"
	case UDP:
		return "udp"
	case ICMP:
		return "icmp"
	}
	return "any"
}

// PortRange is an inclusive range of ports; a single port has Lo == Hi.
type PortRange struct{ Lo, Hi uint16 }

// Contains reports whether p lies in the range.
func (r PortRange) Contains(p uint16) bool { return p >= r.Lo && p <= r.Hi }
