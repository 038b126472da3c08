package splittun

import (
	"errors"
	"fmt"
	"time"
)

// The values of Config.OnInterfaceDown.
const (
	// DownBlock refuses new split connections while the split interface is down (fail closed).
	DownBlock = "block"
	// DownDirect dials split connections unbound (the system's routing decides) while the interface is down.
	// They are still marked as Warden's own traffic.
	DownDirect = "direct"
)

// The values of Config.Mode.
const (
	// ModeAuto routes in the kernel where the platform can (Linux), and relays through the proxy elsewhere.
	ModeAuto = "auto"
	// ModeRoute carries split connections by kernel routing; the relay only takes what routing cannot.
	ModeRoute = "route"
	// ModeProxy relays every split connection through the proxy.
	ModeProxy = "proxy"
)

// Defaults for the zero values of Config.
const (
	DefaultPort            = 719
	DefaultMaxTCPSessions  = 4096
	DefaultMaxUDPSessions  = 4096
	DefaultIdleTimeout     = time.Hour
	DefaultUDPIdleTimeout  = time.Minute
	DefaultDialTimeout     = 10 * time.Second
	DefaultShutdownTimeout = 2 * time.Second
	DefaultInterfacePoll   = 5 * time.Second
)

// Config configures the split-tunnel proxy. The zero value of each field means its default.
type Config struct {
	// Port is the proxy's port on the platform's listen addresses (Linux: 127.0.0.17 and ::1). Default 719.
	Port uint16 `json:"port"`
	// Interface is the default interface split traffic leaves through: a name, an IP address, a MAC address or
	// "auto" (the default). A table entry may name another one.
	Interface string `json:"interface"`
	// Mode is ModeAuto (the default), ModeRoute or ModeProxy.
	Mode string `json:"mode"`
	// OnInterfaceDown is DownBlock (the default) or DownDirect.
	OnInterfaceDown string `json:"on_interface_down"`
	// MaxTCPSessions bounds concurrent TCP relays; connections beyond it are reset and counted.
	MaxTCPSessions int `json:"max_tcp_sessions"`
	// MaxUDPSessions bounds concurrent UDP sessions; packets of new flows beyond it are dropped and counted.
	MaxUDPSessions int `json:"max_udp_sessions"`
	// IdleTimeout closes a TCP relay after this long without a byte in either direction.
	IdleTimeout time.Duration `json:"idle_timeout"`
	// UDPIdleTimeout ends a UDP session after this long without a packet in either direction.
	UDPIdleTimeout time.Duration `json:"udp_idle_timeout"`
	// DialTimeout bounds connecting upstream.
	DialTimeout time.Duration `json:"dial_timeout"`
	// ShutdownTimeout is how long Close waits for TCP relays to finish before cutting them.
	ShutdownTimeout time.Duration `json:"shutdown_timeout"`
	// InterfacePoll is how often interfaces are re-resolved even without a change notification.
	InterfacePoll time.Duration `json:"interface_poll"`
}

// WithDefaults returns c with every zero field set to its default.
func (c Config) WithDefaults() Config {
	if c.Port == 0 {
		c.Port = DefaultPort
	}
	if c.Interface == "" {
		c.Interface = "auto"
	}
	if c.OnInterfaceDown == "" {
		c.OnInterfaceDown = DownBlock
	}
	if c.Mode == "" {
		c.Mode = ModeAuto
	}
	if c.MaxTCPSessions == 0 {
		c.MaxTCPSessions = DefaultMaxTCPSessions
	}
	if c.MaxUDPSessions == 0 {
		c.MaxUDPSessions = DefaultMaxUDPSessions
	}
	if c.IdleTimeout == 0 {
		c.IdleTimeout = DefaultIdleTimeout
	}
	if c.UDPIdleTimeout == 0 {
		c.UDPIdleTimeout = DefaultUDPIdleTimeout
	}
	if c.DialTimeout == 0 {
		c.DialTimeout = DefaultDialTimeout
	}
	if c.ShutdownTimeout == 0 {
		c.ShutdownTimeout = DefaultShutdownTimeout
	}
	if c.InterfacePoll == 0 {
		c.InterfacePoll = DefaultInterfacePoll
	}
	return c
}

// Validate reports every invalid field of c (after defaults are applied).
func (c Config) Validate() error {
	c = c.WithDefaults()
	var errs []error
	if c.OnInterfaceDown != DownBlock && c.OnInterfaceDown != DownDirect {
		errs = append(errs, fmt.Errorf("on_interface_down: %q is not %q or %q", c.OnInterfaceDown, DownBlock, DownDirect))
	}
	if c.Mode != ModeAuto && c.Mode != ModeRoute && c.Mode != ModeProxy {
		errs = append(errs, fmt.Errorf("mode: %q is not %q, %q or %q", c.Mode, ModeAuto, ModeRoute, ModeProxy))
	}
	for _, f := range []struct {
		name string
		v    int
	}{{"max_tcp_sessions", c.MaxTCPSessions}, {"max_udp_sessions", c.MaxUDPSessions}} {
		if f.v < 0 {
			errs = append(errs, fmt.Errorf("%s: %d is negative", f.name, f.v))
		}
	}
	for _, f := range []struct {
		name string
		v    time.Duration
	}{{"idle_timeout", c.IdleTimeout}, {"udp_idle_timeout", c.UDPIdleTimeout}, {"dial_timeout", c.DialTimeout},
		{"shutdown_timeout", c.ShutdownTimeout}, {"interface_poll", c.InterfacePoll}} {
		if f.v < 0 {
			errs = append(errs, fmt.Errorf("%s: %s is negative", f.name, f.v))
		}
	}
	return errors.Join(errs...)
}
