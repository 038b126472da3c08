package backend

import (
	"fmt"
	"net/netip"
)

// Protocol is an IP protocol number.
type Protocol uint8

// The protocols Warden knows by name.
const (
	ICMP   Protocol = 1
	TCP    Protocol = 6
	UDP    Protocol = 17
	ICMPv6 Protocol = 58
)

// String returns the protocol's usual lower-case name, or its number.
func (p Protocol) String() string {
	switch p {
	case ICMP:
		return "icmp"
	case TCP:
		return "tcp"
	case UDP:
		return "udp"
	case ICMPv6:
		return "icmpv6"
	}
	return fmt.Sprintf("ip-proto-%d", uint8(p))
}

// HasPorts reports whether the protocol carries ports (TCP or UDP).
func (p Protocol) HasPorts() bool { return p == TCP || p == UDP }

// Direction says which side opened a connection, seen from this host.
type Direction uint8

// The two directions.
const (
	Outbound Direction = 0
	Inbound  Direction = 1
)

// String returns "outbound" or "inbound".
func (d Direction) String() string {
	if d == Inbound {
		return "inbound"
	}
	return "outbound"
}

// Unknown is the value of PID and UID when the kernel did not tell them.
const Unknown = -1

// Info is what a backend parsed from a connection's packet. Local and Remote are from this host's point of
// view, whatever the direction: for an outbound connection Remote is the destination, for an inbound one the
// source. Ports are zero for protocols without ports.
type Info struct {
	Protocol  Protocol
	Direction Direction
	Local     netip.AddrPort
	Remote    netip.AddrPort
	// IfIndex is the index of the interface the packet uses, 0 when unknown.
	IfIndex int
	// Interface is the interface's name when the backend knows it, "" otherwise; the pipeline resolves
	// IfIndex to a name when it needs one.
	Interface string
	// PID is the owning process, Unknown when the kernel did not say.
	PID int32
	// UID is the owning user, Unknown when the kernel did not say.
	UID int32
	// Mark is the packet mark the kernel hook saw (Linux), 0 elsewhere.
	Mark uint32
}

// Key returns the connection's normalised 5-tuple.
func (i *Info) Key() ConnKey {
	return ConnKey{Protocol: i.Protocol, Local: i.Local, Remote: i.Remote}
}

// String renders the info for logs: "tcp outbound 10.0.0.1:5000 -> 1.2.3.4:443".
func (i *Info) String() string {
	arrow := "->"
	if i.Direction == Inbound {
		arrow = "<-"
	}
	return fmt.Sprintf("%s %s %s %s %s", i.Protocol, i.Direction, i.Local, arrow, i.Remote)
}

// ConnKey identifies a connection: protocol plus local and remote endpoints from this host's point of view.
// Both directions of a connection and every packet of it share one key.
type ConnKey struct {
	Protocol Protocol
	Local    netip.AddrPort
	Remote   netip.AddrPort
}

// String renders the key as "tcp 10.0.0.1:5000 1.2.3.4:443".
func (k ConnKey) String() string {
	return fmt.Sprintf("%s %s %s", k.Protocol, k.Local, k.Remote)
}
