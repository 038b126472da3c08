// Package marks holds the Linux packet-mark and connmark values Warden's iptables rules act on, and the socket
// option that marks Warden's own sockets. It is tiny on purpose: the proxy and the nameserver import it
// without pulling in the NFQUEUE backend.
package marks

// The marks, one per verdict (see design.md). Permanent variants are saved to the connmark, so later packets
// of the connection restore them and never reach user space.
const (
	Accept         uint32 = 1700
	Block          uint32 = 1701
	Drop           uint32 = 1702
	AcceptFinal    uint32 = 1709 // Warden's own traffic; ACCEPTed, never queued
	AcceptAlways   uint32 = 1710
	BlockAlways    uint32 = 1711
	DropAlways     uint32 = 1712
	RerouteTunnel  uint32 = 1717
	RerouteSplit   uint32 = 1719
	RerouteNS      uint32 = 1799
	OwnTrafficMark        = AcceptFinal
)
