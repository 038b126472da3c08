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
	// ForeignPending is a connmark only: the first packet of a connection that carries another program's
	// mark (a VPN's routing mark) is queued with that mark intact and this connmark. See backend/nfqueue.
	ForeignPending uint32 = 1708
)

// Split connections carried by kernel routing instead of the proxy get one mark per split interface (a
// "route"): SplitRouteBase+n-1 for route n in 1..SplitRoutes. Policy routing sends each mark to its own table,
// whose default route leaves through that interface. The range is aligned so one mask matches all of it.
const (
	SplitRouteBase uint32 = 1728 // 0x6c0
	SplitRoutes           = 16
	SplitRouteMask uint32 = ^uint32(SplitRoutes - 1)
)

// SplitRoute returns route n's mark (n in 1..SplitRoutes). It is also the route's table number and ip rule
// priority.
func SplitRoute(n uint8) uint32 { return SplitRouteBase + uint32(n) - 1 }
