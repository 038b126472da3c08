package main

import "net/netip"

const (
	clientAddrCount = 8
	nsPrefix        = "wb-"
)

var (
	serverAddr  = netip.MustParseAddr("10.201.0.100")
	serviceAddr = netip.MustParseAddr("192.0.2.10")
)

// clientAddrs are C's addresses on ua; connections spread over them so that every 5-tuple of a run is new.
func clientAddrs() []netip.Addr {
	out := make([]netip.Addr, clientAddrCount)
	for i := range out {
		out[i] = netip.AddrFrom4([4]byte{10, 201, 0, byte(1 + i)})
	}
	return out
}

// childEnv marks a re-executed test binary as a child (the test's TestMain dispatches on it).
const childEnv = "WARDENBENCH_CHILD"

// Ports the server listens on.
const (
	portBulk     = 5003
	portTCPFirst = 5010 // 5010-5013: request/response
	portUDPFirst = 5020 // 5020-5023: echo
	portSpread   = 4
	reqSize      = 64
)

// tuple maps a run-wide connection index to a distinct (source address, source port, destination port), so
// that no 5-tuple repeats within a run (up to 8 x 64000 x 4 connections): a repeated tuple would meet leftover
// conntrack state or Warden's cached decision and be cheaper than a new connection. The source port varies
// fastest after the address, so connections open at the same time never bind the same address and port.
func tuple(i uint64, dportBase int) (src [4]byte, sport, dport int) {
	a := clientAddrs()[i%clientAddrCount]
	i /= clientAddrCount
	sport = 1024 + int(i%64000)
	i /= 64000
	return a.As4(), sport, dportBase + int(i%portSpread)
}
