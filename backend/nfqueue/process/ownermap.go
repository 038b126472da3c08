package process

import (
	"bytes"
	"encoding/binary"
	"net/netip"
)

// The socket owner map the kernel programs fill (see ebpf_linux.go) and user space reads. Its layout is kept
// OS-neutral so the encoding can be tested anywhere.
//
//	key:   u64 socket cookie (the kernel's sock_gen_cookie, the same number sock_diag reports)
//	value: offset  0  u32 tgid of the process recorded as the socket's user
//	       offset  4  u32 zero
//	       offset  8  u64 CLOCK_BOOTTIME nanoseconds when that tgid was recorded
//	       offset 16  [16]byte comm of the recording thread then (bpf_get_current_comm: NUL-padded, at most 15
//	                  bytes of name)
const (
	ownerKeySize   = 8
	ownerValueSize = 32
	ownerCommOff   = 16
	// commSize is TASK_COMM_LEN, the size of the kernel's task name buffer including its NUL.
	commSize = 16
)

// ownerEntry is one decoded value of the owner map.
type ownerEntry struct {
	tgid int32
	// seenNs is the CLOCK_BOOTTIME time the kernel recorded tgid as the socket's user.
	seenNs uint64
	// comm is the recording thread's name at seenNs, NUL-padded. It is the name of the thread that made the
	// call, which is the process's name (what /proc/<pid>/stat shows) unless that thread was renamed.
	comm [commSize]byte
}

// commBytes returns the name in comm, without its NUL padding (aliasing e).
func (e *ownerEntry) commBytes() []byte {
	if i := bytes.IndexByte(e.comm[:], 0); i >= 0 {
		return e.comm[:i]
	}
	return e.comm[:]
}

// decodeOwnerValue decodes a map value in the kernel's (native) byte order.
func decodeOwnerValue(v *[ownerValueSize]byte) ownerEntry {
	ne := binary.NativeEndian
	e := ownerEntry{tgid: int32(ne.Uint32(v[0:4])), seenNs: ne.Uint64(v[8:16])}
	copy(e.comm[:], v[ownerCommOff:])
	return e
}

// encodeOwnerValue is decodeOwnerValue's inverse (tests use it to check the layout both ways).
func encodeOwnerValue(e ownerEntry) [ownerValueSize]byte {
	var v [ownerValueSize]byte
	ne := binary.NativeEndian
	ne.PutUint32(v[0:4], uint32(e.tgid))
	ne.PutUint64(v[8:16], e.seenNs)
	copy(v[ownerCommOff:], e.comm[:])
	return v
}

// userHZ is the unit of /proc/<pid>/stat's start time. The kernel reports it in USER_HZ ticks, which are
// 100 per second on every architecture Linux ABI-fixes it for (x86, arm, arm64, riscv, ppc, s390).
const userHZ = 100

// bootTicks converts a CLOCK_BOOTTIME time to /proc/<pid>/stat's start time unit. Both clocks count from boot
// and the kernel rounds a start time down to a tick, so a process alive at ns has a start time of at most
// bootTicks(ns), and one with a later start time (the PID was reused after the map entry was written) started
// after ns.
func bootTicks(ns uint64) uint64 {
	return ns / (1e9 / userHZ)
}

// The connection tuple map the kernel programs fill for outbound connections (see ebpf_linux.go): it names the
// socket (by cookie) behind a connection's tuple, so the resolver can skip the sock_diag round trip.
//
//	key:   offset  0  u8  IP protocol (6 TCP, 17 UDP)
//	       offset  1  u8  zero
//	       offset  2  be16 local port
//	       offset  4  be16 remote port
//	       offset  6  u16 zero
//	       offset  8  [16]byte remote address (IPv6, or IPv4 as ::ffff:a.b.c.d, so a dual-stack socket's IPv4
//	                  peer and an IPv4 socket's give the same key)
//	       offset 24  [16]byte local address, in the same form: always for TCP (known when the connect callback
//	                  runs); for UDP the source the send asked for or the socket is bound to, and zero for a
//	                  socket bound to the wildcard address that lets routing choose the source
//	value: u64 socket cookie, or tupleAmbiguous
//
// A UDP key without a local address stands for every source address; the programs record one only for a
// socket that holds its port alone (see reuseCheckInsns), and the resolver does not use it (see
// Resolver.ownerFromTuple): such a socket may later connect and hold the port on one address only.
const (
	tupleKeySize   = 40
	tupleValueSize = 8
)

const (
	tupleProtoOff  = 0
	tupleLPortOff  = 2
	tupleRPortOff  = 4
	tupleRemoteOff = 8
	tupleLocalOff  = 24
)

// encodeTupleKey returns the tuple map key of an outbound connection, with its local address or (withLocal
// false, UDP only) without, and false for a protocol or address the programs never record (not TCP or UDP, an
// invalid address, TCP without its local address).
func encodeTupleKey(proto uint8, local, remote netip.AddrPort, withLocal bool) (k [tupleKeySize]byte, ok bool) {
	switch {
	case proto != ipprotoTCP && proto != ipprotoUDP, !remote.Addr().IsValid(),
		withLocal && !local.Addr().IsValid(), proto == ipprotoTCP && !withLocal:
		return k, false
	}
	k[tupleProtoOff] = proto
	binary.BigEndian.PutUint16(k[tupleLPortOff:], local.Port())
	binary.BigEndian.PutUint16(k[tupleRPortOff:], remote.Port())
	// As16 maps an IPv4 address to ::ffff:a.b.c.d, as the programs store it.
	ra := remote.Addr().As16()
	copy(k[tupleRemoteOff:], ra[:])
	if withLocal {
		la := local.Addr().As16()
		copy(k[tupleLocalOff:], la[:])
	}
	return k, true
}
