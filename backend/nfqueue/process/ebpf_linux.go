package process

import (
	"errors"
	"fmt"
	"runtime"
	"slices"
	"strings"
	"sync"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/warden-fw/warden/backend/nfqueue/bpfkit"
)

// tupleAmbiguous is the tuple map's value for a key two open sockets may share; sock_gen_cookie never gives 0.
const tupleAmbiguous = 0

// The eBPF socket owner map: small cgroup programs record, for every TCP and UDP socket a process creates (and
// again whenever another process connects or sends with it), socket cookie -> tgid. sock_diag reports the same
// cookie with the socket, so a lookup costs one map read instead of a walk of /proc/<pid>/fd.
//
// The programs are attached to the cgroup v2 root, so they see every process of the cgroup namespace the daemon
// runs in. They never change what a socket call does: each returns "allow". They and their links are held only
// by file descriptors (never pinned), so they detach when the resolver closes them or the daemon dies.
//
// A second map, keyed by an outbound connection's tuple, names its socket's cookie: a sock_ops program fills it
// when a TCP connection is made, the sendmsg programs when a UDP socket sends to an address. The resolver then
// finds an outbound connection's socket without a sock_diag round trip (see tupleRecordInsns for how a tuple
// two sockets share is kept from naming either).
//
// bpf_get_current_pid_tgid reports the tgid in the initial pid namespace, which is what /proc shows the daemon
// only when it runs there too; elsewhere the map is not used (see initialPidNS).

// ownerMapEntries bounds the owner map. It is an LRU map, so a burst of sockets evicts the oldest entries and
// their lookups fall back to /proc.
const ownerMapEntries = 1 << 16

// errBPFUnavailable marks a loader failure caused by what the system lacks or forbids; it is bpfkit's, so the
// cgroup root's failures (bpfkit.InCgroupRoot) classify the same.
var errBPFUnavailable = bpfkit.ErrUnavailable

// bpfOwners is the loaded owner map with its programs and links.
type bpfOwners struct {
	mode   bpfMode      // fixed at creation
	mu     sync.RWMutex // held for reading by lookups, for writing by close, so no lookup uses a closed fd
	owners *ebpf.Map
	// storage is the per-socket storage that replaces both maps in modeStorage; lookups then read the mirror.
	storage *ebpf.Map
	fd      int // owners.FD() or storage.FD(); -1 once closed
	// tuples is the connection tuple map (tuple -> socket cookie) when its programs are loaded, else nil.
	tuples  *ebpf.Map
	tupleFD int // tuples.FD(); -1 when there is none or once closed
	hooks   []bpfHook
	progs   []*ebpf.Program
	links   []link.Link
	// The socket mirror (with the tuple map only): the event ring, its lost-event counter, and their reader.
	ringMap, lostMap *ebpf.Map
	mirror           *mirrorRing
}

// mirrorRingSize is the event ring's size: the events (bind, connect, tuple, release) of about 750 connections
// or flows between two reads. It is read at every lookup and between lookups at least every mirrorSyncMax,
// sooner while it fills (see nextSyncWait). Small on purpose: the programs write the ring front to back, so
// every event lands on the next cache line of the ring, and a ring larger than the CPU's cache made each one
// a miss to memory in the application's system call, and pushed its and the daemon's other data out. 128 KiB
// instead of 2 MiB: 0.94-0.96x the machine time per TCP connection and UDP flow in the benchmark (two A/Bs,
// docs/performance.md session 13). The programs wake the reader when a burst fills a quarter of it (see
// emitInsns); a ring that fills anyway resets the mirror (lookups then ask sock_diag), which costs speed, not
// answers.
var mirrorRingSize = 1 << 17

// Kernel constants the programs use (linux/in.h, linux/bpf.h).
const (
	bpfAny = 0 // BPF_ANY: create or replace

	bpfNoExist = 1 // BPF_NOEXIST: create only

	sockBoundDevOff = 0  // offsetof(struct bpf_sock, bound_dev_if)
	sockProtocolOff = 12 // offsetof(struct bpf_sock, protocol)
	sockSrcIP4Off   = 24 // offsetof(struct bpf_sock, src_ip4): the bound address
	sockSrcIP6Off   = 28 // offsetof(struct bpf_sock, src_ip6)
	sockSrcPortOff  = 44 // offsetof(struct bpf_sock, src_port): host byte order
	sockDstPortOff  = 48 // offsetof(struct bpf_sock, dst_port): network byte order, 16 bits
	sockDstIP4Off   = 52 // offsetof(struct bpf_sock, dst_ip4)
	sockDstIP6Off   = 56 // offsetof(struct bpf_sock, dst_ip6)

	sockAddrUserIP4Off  = 4  // offsetof(struct bpf_sock_addr, user_ip4)
	sockAddrUserIP6Off  = 8  // offsetof(struct bpf_sock_addr, user_ip6)
	sockAddrUserPortOff = 24 // offsetof(struct bpf_sock_addr, user_port): network byte order in the low 16 bits
	sockAddrProtocolOff = 36 // offsetof(struct bpf_sock_addr, protocol)
	sockAddrMsgSrc4Off  = 40 // offsetof(struct bpf_sock_addr, msg_src_ip4): the source a send asked for (sendmsg4)
	sockAddrMsgSrc6Off  = 44 // offsetof(struct bpf_sock_addr, msg_src_ip6) (sendmsg6)
	sockAddrSkOff       = 64 // offsetof(struct bpf_sock_addr, sk): the socket, bound by now for sendmsg

	// sockOpsTCPConnectCB is BPF_SOCK_OPS_TCP_CONNECT_CB: tcp_connect calls it, for every active open, right
	// before the SYN is built, with the 4-tuple chosen. Unlike the state and RTT callbacks it needs no
	// bpf_sock_ops_cb_flags.
	sockOpsTCPConnectCB = 3
)

// The frame layout shared by the programs: the key at fp-8, the value (ownerValueSize bytes) below it, then a
// tuple map key and value.
const (
	keyOff      = -8
	valueOff    = keyOff - ownerValueSize
	commOff     = valueOff + ownerCommOff // where the value's comm is built
	tupleKeyOff = valueOff - tupleKeySize
	tupleValOff = tupleKeyOff - tupleValueSize
	lostKeyOff  = tupleValOff - 8 // the lost-event counter's array index (0)
)

// The tuple value and key, the owner value and the key lie in that order, next to each other: one copy from
// tupleValOff is a tuple event followed by an owner event (connectEventSize bytes).
var _ = [1]struct{}{}[tupleValOff+connectEventSize-(keyOff+ownerKeySize)]

// progMaps is what the programs are built with: the maps' descriptors (-1 for one not loaded) and the network
// namespace whose connections go into the tuple map.
type progMaps struct {
	owners  int
	tuples  int
	storage int // the socket storage (modeStorage)
	netns   uint64
	// ring receives an event for every map write and socket release (see mirror_linux.go), and lost counts the
	// events a full ring refused; -1: no mirror.
	ring, lost int
}

// socketFilter lets TCP and UDP sockets of the resolver's network namespace through to "record" and sends
// everything else to "allow". The resolver only asks about TCP and UDP, and other sockets would only crowd the
// LRU. It only finds sockets of its own namespace (sock_diag answers for one namespace), so another
// namespace's sockets (a container's, a test's) are skipped before any map write or event: the programs see
// the whole cgroup tree. Without a namespace cookie (m.netns 0: a kernel without SO_NETNS_COOKIE) every
// namespace is recorded, as before the check existed.
func socketFilter(m progMaps, protoOff int16) asm.Instructions {
	insns := asm.Instructions{
		asm.LoadMem(asm.R2, asm.R6, protoOff, asm.Word),
		asm.JEq.Imm(asm.R2, ipprotoTCP, "netns"),
		asm.JEq.Imm(asm.R2, ipprotoUDP, "netns"),
		asm.Ja.Label("allow"),
	}
	if m.netns == 0 {
		return append(insns, asm.Ja.Label("record").WithSymbol("netns"))
	}
	check := inNetns(m, "allow")
	check[0] = check[0].WithSymbol("netns")
	return append(insns, append(check, asm.Ja.Label("record"))...)
}

// currentComm puts the calling thread's name at the frame's comm (NUL-padded, as the map value holds it).
func currentComm() asm.Instructions {
	return asm.Instructions{
		asm.Mov.Reg(asm.R1, asm.RFP),
		asm.Add.Imm(asm.R1, commOff),
		asm.Mov.Imm(asm.R2, commSize),
		asm.FnGetCurrentComm.Call(),
	}
}

// Ring buffer flags and query (linux/bpf.h). User space reads the ring when it resolves, so an event wakes
// nobody (a wake-up costs the writer an interrupt of work); only one written into a ring already a quarter full
// wakes the reader, so that a burst of sockets while no lookup reads the ring does not overflow it. The reads
// between lookups keep a steady stream below a quarter (see nextSyncWait), so only bursts wake anyone.
const (
	bpfRBNoWakeup    = 1 // BPF_RB_NO_WAKEUP
	bpfRBForceWakeup = 2 // BPF_RB_FORCE_WAKEUP
	bpfRBAvailData   = 0 // BPF_RB_AVAIL_DATA
)

// emitInsns puts size bytes of the frame at off into the ring as one event, and counts it lost when the ring
// is full. It clobbers R0-R5; done names its last instruction and must be unique in the program.
func emitInsns(m progMaps, off int16, size int32, done string) asm.Instructions {
	if m.ring < 0 {
		return nil
	}
	return asm.Instructions{
		asm.LoadMapPtr(asm.R1, m.ring),
		asm.Mov.Imm(asm.R2, bpfRBAvailData),
		asm.FnRingbufQuery.Call(),
		asm.Mov.Imm(asm.R4, bpfRBNoWakeup),
		asm.JLE.Imm(asm.R0, int32(mirrorRingSize/4), done+"_out"),
		asm.Mov.Imm(asm.R4, bpfRBForceWakeup),
		asm.LoadMapPtr(asm.R1, m.ring).WithSymbol(done + "_out"),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, int32(off)),
		asm.Mov.Imm(asm.R3, size),
		asm.FnRingbufOutput.Call(),
		asm.JEq.Imm(asm.R0, 0, done),
		asm.StoreImm(asm.RFP, lostKeyOff, 0, asm.Word),
		asm.LoadMapPtr(asm.R1, m.lost),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, lostKeyOff),
		asm.FnMapLookupElem.Call(),
		asm.JEq.Imm(asm.R0, 0, done),
		asm.Mov.Imm(asm.R1, 1),
		asm.AddAtomic.Mem(asm.R0, asm.R1, asm.DWord, 0),
		asm.Mov.Imm(asm.R0, 0).WithSymbol(done),
	}
}

// storeOwner writes the value (tgid from R7, the time, the thread's name), updates the map at the frame's
// key, and reports the write to the mirror.
func storeOwner(m progMaps) asm.Instructions {
	mapFD := m.owners
	insns := ownerValueInsns()
	insns = append(insns,
		asm.LoadMapPtr(asm.R1, mapFD),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, keyOff),
		asm.Mov.Reg(asm.R3, asm.RFP),
		asm.Add.Imm(asm.R3, valueOff),
		asm.Mov.Imm(asm.R4, bpfAny),
		asm.FnMapUpdateElem.Call(),
	)
	return append(insns, emitInsns(m, valueOff, ownerEventSize, "o_emitted")...)
}

// ownerValueInsns builds the owner value at the frame's value: the tgid from R7, the time, the thread's name.
func ownerValueInsns() asm.Instructions {
	insns := asm.Instructions{
		asm.StoreMem(asm.RFP, valueOff, asm.R7, asm.Word),
		asm.StoreImm(asm.RFP, valueOff+4, 0, asm.Word),
		asm.FnKtimeGetBootNs.Call(),
		asm.StoreMem(asm.RFP, valueOff+8, asm.R0, asm.DWord),
	}
	return append(insns, currentComm()...)
}

// ownerCurrentInsns jumps to "owned" when the owner value at R8 (an owner map value, or a socket's storage)
// names the calling process, whose tgid is in R7, and the calling thread's name; else to "update". It puts the
// thread's name at the frame's comm and clobbers R0-R5.
func ownerCurrentInsns() asm.Instructions {
	insns := asm.Instructions{
		asm.LoadMem(asm.R1, asm.R8, 0, asm.Word),
		asm.JNE.Reg(asm.R1, asm.R7, "update"),
	}
	insns = append(insns, currentComm()...)
	return append(insns,
		asm.LoadMem(asm.R1, asm.R8, ownerCommOff, asm.DWord),
		asm.LoadMem(asm.R2, asm.RFP, commOff, asm.DWord),
		asm.JNE.Reg(asm.R1, asm.R2, "update"),
		asm.LoadMem(asm.R1, asm.R8, ownerCommOff+8, asm.DWord),
		asm.LoadMem(asm.R2, asm.RFP, commOff+8, asm.DWord),
		asm.JEq.Reg(asm.R1, asm.R2, "owned"),
	)
}

// allow ends a program with 1: the socket call goes ahead unchanged.
func allow() asm.Instructions {
	return asm.Instructions{
		asm.Mov.Imm(asm.R0, 1).WithSymbol("allow"),
		asm.Return(),
	}
}

// cookieAndTgid puts the socket cookie at the frame's key and the calling process's tgid in R7. R6 holds the
// context.
func cookieAndTgid() asm.Instructions {
	return asm.Instructions{
		asm.Mov.Reg(asm.R1, asm.R6).WithSymbol("record"),
		asm.FnGetSocketCookie.Call(),
		asm.StoreMem(asm.RFP, keyOff, asm.R0, asm.DWord),
		asm.FnGetCurrentPidTgid.Call(),
		asm.RSh.Imm(asm.R0, 32),
		asm.Mov.Reg(asm.R7, asm.R0),
	}
}

// sockCreateInsns records the creating process of every new TCP or UDP socket (cgroup/sock_create).
func sockCreateInsns(m progMaps) asm.Instructions {
	var insns asm.Instructions
	insns = append(insns, asm.Mov.Reg(asm.R6, asm.R1))
	insns = append(insns, socketFilter(m, sockProtocolOff)...)
	insns = append(insns, cookieAndTgid()...)
	insns = append(insns, storeOwner(m)...)
	return append(insns, allow()...)
}

// sockAddrInsns records the process that connects or sends with a socket (cgroup/connect4, connect6, sendmsg4,
// sendmsg6) when it is not the one already recorded, or its thread has another name than the one recorded: a
// socket created by one process and used by another (a forked child) is then attributed to its user, and one
// whose process has exec'd another program since names the new program's name, which the resolver compares
// with what it knows of the process (an exec keeps the PID). The common case, the creator using its own
// socket, is a map read without a write. tail runs after the owner is recorded (or found current); it starts at
// the label "owned" and ends the program.
func sockAddrInsns(m progMaps, tail asm.Instructions) asm.Instructions {
	mapFD := m.owners
	var insns asm.Instructions
	insns = append(insns, asm.Mov.Reg(asm.R6, asm.R1))
	insns = append(insns, socketFilter(m, sockAddrProtocolOff)...)
	insns = append(insns, cookieAndTgid()...)
	insns = append(insns,
		asm.LoadMapPtr(asm.R1, mapFD),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, keyOff),
		asm.FnMapLookupElem.Call(),
		asm.Mov.Reg(asm.R8, asm.R0), // the value stays valid across helper calls (RCU), R0 does not
		asm.JEq.Imm(asm.R8, 0, "update"),
	)
	insns = append(insns, ownerCurrentInsns()...)
	store := storeOwner(m)
	store[0] = store[0].WithSymbol("update")
	insns = append(insns, store...)
	if len(tail) == 0 {
		tail = asm.Instructions{asm.Mov.Imm(asm.R0, 1), asm.Return()}
	}
	tail[0] = tail[0].WithSymbol("owned")
	insns = append(insns, tail...)
	return append(insns, allow()...)
}

// connectInsns is the connect4/connect6 program: the owner, and for a UDP socket already bound to a port, its
// tuple. Such a socket (bound first) sends to its peer without any hook seeing it, so its tuple is recorded
// here, as a send's would be: naming the socket when it holds its address and port alone (no SO_REUSEADDR,
// SO_REUSEPORT or bound device; see reuseCheckInsns), else marked ambiguous so that the key never names
// another socket sharing the port. A socket connected unbound gets its port after this hook, from autobind;
// its sends are never in the tuple map and are resolved by sock_diag. A wildcard-bound socket's key has no
// local address, which the resolver never uses.
func connectInsns(v6 bool) func(progMaps) asm.Instructions {
	return func(m progMaps) asm.Instructions {
		if m.tuples < 0 {
			return sockAddrInsns(m, nil)
		}
		return sockAddrInsns(m, udpTupleKey(m, v6, false, recordOrAmbiguousInsns(m)))
	}
}

// sendmsgInsns is the sendmsg4/sendmsg6 program (UDP sends that name a destination): the owner, then the tuple
// (local address and port, destination) -> cookie, or the tuple marked ambiguous for a socket that may share
// its port (see reuseCheckInsns). The hook runs after inet_autobind, so the socket's port is known even
// for its first send. A connected UDP socket sending without a destination passes no hook: its tuples are
// resolved by sock_diag.
func sendmsgInsns(v6 bool) func(progMaps) asm.Instructions {
	return func(m progMaps) asm.Instructions {
		if m.tuples < 0 {
			return sockAddrInsns(m, nil)
		}
		return sockAddrInsns(m, udpTupleKey(m, v6, true, recordOrAmbiguousInsns(m)))
	}
}

// recordOrAmbiguousInsns records the frame's tuple key for the context's socket, or marks it ambiguous for a
// socket that may share its port (see reuseCheckInsns).
func recordOrAmbiguousInsns(m progMaps) asm.Instructions {
	var then asm.Instructions
	then = append(then, reuseCheckInsns("t_shared")...)
	then = append(then, asm.LoadMem(asm.R7, asm.RFP, keyOff, asm.DWord))
	then = append(then, tupleRecordInsns(m)...)
	shared := markAmbiguousInsns(m)
	shared[0] = shared[0].WithSymbol("t_shared")
	return append(then, shared...)
}

// markAmbiguousInsns marks the frame's tuple key ambiguous, then jumps to "allow".
func markAmbiguousInsns(m progMaps) asm.Instructions {
	return asm.Instructions{
		asm.Mov.Imm(asm.R5, tupleAmbiguous),
		asm.StoreMem(asm.RFP, tupleValOff, asm.R5, asm.DWord),
		asm.LoadMapPtr(asm.R1, m.tuples),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, tupleKeyOff),
		asm.Mov.Reg(asm.R3, asm.RFP),
		asm.Add.Imm(asm.R3, tupleValOff),
		asm.Mov.Imm(asm.R4, bpfAny),
		asm.FnMapUpdateElem.Call(),
		asm.Ja.Label("t_amb_ev"),
	}
}

// reuseCheckInsns jumps to shared when the context's socket has SO_REUSEADDR or SO_REUSEPORT set (or either
// cannot be read), or is bound to a device. Only such a socket can share its local port with a socket bound to
// the same or the wildcard address, that one perhaps connected and sending without any hook seeing it (an
// autobound socket, whose port was free when it was connected, which this one joined later). Without any of
// them, a socket bound to the wildcard address holds its port alone (until it connects: then the kernel binds
// it to one address, which is why the resolver never uses the address-less keys such sockets write), and one
// bound to an address shares it only with sockets bound to other addresses, whose tuples have their own keys.
// R6 holds the context; bpf_getsockopt
// may be called from the sendmsg hooks, which run with the socket locked.
func reuseCheckInsns(shared string) asm.Instructions {
	insns := asm.Instructions{
		asm.LoadMem(asm.R1, asm.R6, sockAddrSkOff, asm.DWord),
		asm.LoadMem(asm.R2, asm.R1, sockBoundDevOff, asm.Word),
		asm.JNE.Imm(asm.R2, 0, shared),
	}
	for _, opt := range []int32{unix.SO_REUSEADDR, unix.SO_REUSEPORT} {
		insns = append(insns,
			asm.Mov.Reg(asm.R1, asm.R6),
			asm.Mov.Imm(asm.R2, unix.SOL_SOCKET),
			asm.Mov.Imm(asm.R3, opt),
			asm.Mov.Reg(asm.R4, asm.RFP),
			asm.Add.Imm(asm.R4, tupleValOff),
			asm.Mov.Imm(asm.R5, 4),
			asm.FnGetsockopt.Call(),
			asm.JNE.Imm(asm.R0, 0, shared),
			asm.LoadMem(asm.R2, asm.RFP, tupleValOff, asm.Word),
			asm.JNE.Imm(asm.R2, 0, shared),
		)
	}
	return insns
}

// inNetns jumps to skip unless the context's socket is in the network namespace m names: the programs see the
// whole cgroup tree, every namespace's sockets, and a tuple only means one connection within a namespace.
func inNetns(m progMaps, skip string) asm.Instructions {
	return asm.Instructions{
		asm.Mov.Reg(asm.R1, asm.R6),
		asm.FnGetNetnsCookie.Call(),
		asm.LoadImm(asm.R1, int64(m.netns), asm.DWord),
		asm.JNE.Reg(asm.R0, asm.R1, skip),
	}
}

// udpTupleKey builds the frame's tuple key of a UDP socket sending to (or connecting to) the context's address,
// then runs then; it jumps to "allow" for another protocol or a socket not yet bound to a port (the program
// has skipped other namespaces' sockets already). The local address is the source a send asked for (sendmsg:
// IP_PKTINFO, or the bound address), else the address the socket is bound to, else none (the wildcard). R6
// holds the bpf_sock_addr context.
func udpTupleKey(m progMaps, v6, sendmsg bool, then asm.Instructions) asm.Instructions {
	return udpTupleKeyOr(m, v6, sendmsg, "allow", then)
}

// udpTupleKeyOr is udpTupleKey jumping to skip instead of "allow" for another protocol or an unbound socket.
func udpTupleKeyOr(m progMaps, v6, sendmsg bool, skip string, then asm.Instructions) asm.Instructions {
	insns := asm.Instructions{
		asm.LoadMem(asm.R2, asm.R6, sockAddrProtocolOff, asm.Word),
		asm.JNE.Imm(asm.R2, ipprotoUDP, skip),
	}
	// The program's socketFilter has checked the namespace.
	insns = append(insns, bpfkit.ZeroFrame(tupleKeyOff, tupleKeySize)...)
	insns = append(insns,
		asm.StoreImm(asm.RFP, tupleKeyOff+tupleProtoOff, ipprotoUDP, asm.Byte),
		// R1 holds the socket from here on: no helper is called until then.
		asm.LoadMem(asm.R1, asm.R6, sockAddrSkOff, asm.DWord),
		asm.LoadMem(asm.R2, asm.R1, sockSrcPortOff, asm.Word),
		asm.JEq.Imm(asm.R2, 0, skip),
		asm.HostTo(asm.BE, asm.R2, asm.Half),
		asm.StoreMem(asm.RFP, tupleKeyOff+tupleLPortOff, asm.R2, asm.Half),
		// The low 16 bits hold the port as it is in memory, in network order: stored as they are.
		asm.LoadMem(asm.R2, asm.R6, sockAddrUserPortOff, asm.Word),
		asm.StoreMem(asm.RFP, tupleKeyOff+tupleRPortOff, asm.R2, asm.Half),
	)
	if !v6 {
		insns = append(insns, asm.LoadMem(asm.R2, asm.R6, sockAddrUserIP4Off, asm.Word))
		insns = append(insns, bpfkit.StoreMappedV4(tupleKeyOff+tupleRemoteOff, asm.R2)...)
		if sendmsg {
			insns = append(insns,
				asm.LoadMem(asm.R2, asm.R6, sockAddrMsgSrc4Off, asm.Word),
				asm.JNE.Imm(asm.R2, 0, "t_local"),
			)
		}
		insns = append(insns,
			asm.LoadMem(asm.R2, asm.R1, sockSrcIP4Off, asm.Word),
			asm.JEq.Imm(asm.R2, 0, "t_keyed"),
		)
		local := bpfkit.StoreMappedV4(tupleKeyOff+tupleLocalOff, asm.R2)
		local[0] = local[0].WithSymbol("t_local")
		insns = append(insns, local...)
	} else {
		insns = append(insns, bpfkit.CopyWords(asm.R6, asm.R2, sockAddrUserIP6Off, tupleKeyOff+tupleRemoteOff, 16)...)
		// copyLocal copies the 16 bytes at base+off to the key's local address if they are not all zero.
		copyLocal := func(base asm.Register, off int16, label, done string) asm.Instructions {
			insns := asm.Instructions{asm.LoadMem(asm.R3, base, off, asm.Word).WithSymbol(label)}
			for i := int16(4); i < 16; i += 4 {
				insns = append(insns, asm.LoadMem(asm.R2, base, off+i, asm.Word), asm.Or.Reg(asm.R3, asm.R2))
			}
			insns = append(insns, asm.JEq.Imm(asm.R3, 0, done))
			insns = append(insns, bpfkit.CopyWords(base, asm.R2, off, tupleKeyOff+tupleLocalOff, 16)...)
			return append(insns, asm.Ja.Label("t_keyed"))
		}
		if sendmsg {
			insns = append(insns, copyLocal(asm.R6, sockAddrMsgSrc6Off, "t_msgsrc", "t_bound")...)
		}
		bound := copyLocal(asm.R1, sockSrcIP6Off, "t_bound", "t_keyed")
		insns = append(insns, bound[:len(bound)-1]...) // falls through to then
	}
	then[0] = then[0].WithSymbol("t_keyed")
	return append(insns, then...)
}

// tupleRecordInsns points the frame's tuple key at the cookie in R7, then jumps to "allow". A key that names
// another socket still open (its owner entry exists: sock_release deletes it) is marked ambiguous instead, and
// stays so until the LRU evicts it: the rules that keep two sockets off one key (a full 4-tuple for TCP; see
// reuseCheckInsns for UDP) should make that impossible, and if they do not, the resolver must ask sock_diag.
// Concurrent writers of one key are ordered by creating it with BPF_NOEXIST and replacing a closed socket's
// cookie by compare-and-exchange; a writer that loses either race marks the key ambiguous.
func tupleRecordInsns(m progMaps) asm.Instructions {
	insns := asm.Instructions{
		asm.LoadMapPtr(asm.R1, m.tuples),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, tupleKeyOff),
		asm.FnMapLookupElem.Call(),
		asm.JEq.Imm(asm.R0, 0, "t_new"),
		asm.Mov.Reg(asm.R8, asm.R0),
		asm.LoadMem(asm.R1, asm.R8, 0, asm.DWord),
		asm.JEq.Reg(asm.R1, asm.R7, "allow"),
		asm.JEq.Imm(asm.R1, tupleAmbiguous, "allow"),
		asm.StoreMem(asm.RFP, tupleValOff, asm.R1, asm.DWord),
		asm.LoadMapPtr(asm.R1, m.owners),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, tupleValOff),
		asm.FnMapLookupElem.Call(),
		asm.JEq.Imm(asm.R0, 0, "t_take"),
		// Another open socket: ambiguous.
		asm.Mov.Imm(asm.R5, tupleAmbiguous), asm.StoreMem(asm.R8, 0, asm.R5, asm.DWord),
		asm.Ja.Label("t_amb_ev"),
		// The other socket is closed: take the key over, unless another writer changed it meanwhile.
		asm.LoadMem(asm.R0, asm.RFP, tupleValOff, asm.DWord).WithSymbol("t_take"),
		cmpXchg64(asm.R8, asm.R7),
		asm.LoadMem(asm.R1, asm.RFP, tupleValOff, asm.DWord),
		asm.JEq.Reg(asm.R0, asm.R1, "t_set_ev"),
		asm.JEq.Reg(asm.R0, asm.R7, "allow"),
		asm.Mov.Imm(asm.R5, tupleAmbiguous), asm.StoreMem(asm.R8, 0, asm.R5, asm.DWord),
		asm.Ja.Label("t_amb_ev"),
		// No entry: create one, unless another writer just did.
		asm.StoreMem(asm.RFP, tupleValOff, asm.R7, asm.DWord).WithSymbol("t_new"),
		asm.LoadMapPtr(asm.R1, m.tuples),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, tupleKeyOff),
		asm.Mov.Reg(asm.R3, asm.RFP),
		asm.Add.Imm(asm.R3, tupleValOff),
		asm.Mov.Imm(asm.R4, bpfNoExist),
		asm.FnMapUpdateElem.Call(),
		asm.JEq.Imm(asm.R0, 0, "t_set_ev"),
		asm.LoadMapPtr(asm.R1, m.tuples),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, tupleKeyOff),
		asm.FnMapLookupElem.Call(),
		asm.JEq.Imm(asm.R0, 0, "allow"),
		asm.LoadMem(asm.R1, asm.R0, 0, asm.DWord),
		asm.JEq.Reg(asm.R1, asm.R7, "allow"),
		asm.Mov.Imm(asm.R5, tupleAmbiguous), asm.StoreMem(asm.R0, 0, asm.R5, asm.DWord),
		// The key's new value, reported to the mirror: the cookie, or ambiguous.
		asm.Mov.Imm(asm.R5, tupleAmbiguous).WithSymbol("t_amb_ev"),
		asm.StoreMem(asm.RFP, tupleValOff, asm.R5, asm.DWord),
		asm.Ja.Label("t_emit"),
		asm.StoreMem(asm.RFP, tupleValOff, asm.R7, asm.DWord).WithSymbol("t_set_ev"),
	}
	emit := emitInsns(m, tupleValOff, tupleEventSize, "t_emitted")
	if len(emit) == 0 {
		emit = asm.Instructions{asm.Mov.Imm(asm.R0, 0)}
	}
	emit[0] = emit[0].WithSymbol("t_emit")
	insns = append(insns, emit...)
	return append(insns, asm.Ja.Label("allow"))
}

// bpfCmpXchg is BPF_CMPXCHG, the immediate of an atomic compare-and-exchange instruction (linux/bpf.h).
const bpfCmpXchg = 0xf0 | 0x01 // BPF_CMPXCHG is 0xf0 | BPF_FETCH

// cmpXchg64 is `R0 = cmpxchg((u64 *)dst, R0, src)`. The assembler (cilium/ebpf v0.19.0) reads an atomic
// instruction's immediate before deriving it from the opcode, so it would encode 0 (an atomic add): the
// immediate is set here, to the value the assembler would derive.
func cmpXchg64(dst, src asm.Register) asm.Instruction {
	ins := asm.CmpXchg.Mem(dst, src, asm.DWord, 0)
	ins.Constant = bpfCmpXchg
	return ins
}

// sockOpsInsns is the sock_ops program: at BPF_SOCK_OPS_TCP_CONNECT_CB it points the connection's full
// 4-tuple at the socket's cookie; every other callback returns at once.
//
// remote_port is the __be16 port loaded into a 32-bit field, shifted into the upper half on little-endian
// kernels and not on big-endian ones; or-ing both halves gives the port either way (the other half is zero).
// An IPv6 socket connecting to an IPv4-mapped address is an IPv4 connection (tcp_v4_connect): its IPv4 fields
// are used then. (Recent kernels also fill in its mapped IPv6 local address before this callback, older ones
// only after it.)
func sockOpsInsns(m progMaps) asm.Instructions { return sockOpsProgram(m, tupleRecordInsns) }

// sockOpsProgram builds the sock_ops program around record, which gets the frame's tuple key and the socket's
// cookie in R7 and ends by jumping to "allow".
func sockOpsProgram(m progMaps, record func(progMaps) asm.Instructions) asm.Instructions {
	insns := asm.Instructions{
		asm.Mov.Reg(asm.R6, asm.R1),
		asm.LoadMem(asm.R2, asm.R6, bpfkit.SockOpsOp, asm.Word),
		asm.JNE.Imm(asm.R2, sockOpsTCPConnectCB, "allow"),
	}
	insns = append(insns, inNetns(m, "allow")...)
	insns = append(insns, bpfkit.ZeroFrame(tupleKeyOff, tupleKeySize)...)
	insns = append(insns,
		asm.StoreImm(asm.RFP, tupleKeyOff+tupleProtoOff, ipprotoTCP, asm.Byte),
		asm.LoadMem(asm.R2, asm.R6, bpfkit.SockOpsLocalPort, asm.Word),
		asm.HostTo(asm.BE, asm.R2, asm.Half),
		asm.StoreMem(asm.RFP, tupleKeyOff+tupleLPortOff, asm.R2, asm.Half),
		asm.LoadMem(asm.R2, asm.R6, bpfkit.SockOpsRemotePort, asm.Word),
	)
	insns = append(insns, bpfkit.FoldPort(asm.R2, asm.R3)...)
	insns = append(insns,
		asm.StoreMem(asm.RFP, tupleKeyOff+tupleRPortOff, asm.R2, asm.Half),
		asm.LoadMem(asm.R2, asm.R6, bpfkit.SockOpsFamily, asm.Word),
		asm.JEq.Imm(asm.R2, afInet, "v4"),
		asm.JNE.Imm(asm.R2, afInet6, "allow"),
	)
	insns = append(insns, bpfkit.CopyWords(asm.R6, asm.R2, bpfkit.SockOpsRemoteIP6, tupleKeyOff+tupleRemoteOff, 16)...)
	insns = append(insns, bpfkit.CopyWords(asm.R6, asm.R2, bpfkit.SockOpsLocalIP6, tupleKeyOff+tupleLocalOff, 16)...)
	insns = append(insns,
		asm.LoadMem(asm.R2, asm.RFP, tupleKeyOff+tupleRemoteOff+8, asm.Word),
		asm.JNE.Imm32(asm.R2, bpfkit.V4MappedMarker, "keyed"),
		asm.LoadMem(asm.R2, asm.RFP, tupleKeyOff+tupleRemoteOff, asm.DWord),
		asm.JNE.Imm(asm.R2, 0, "keyed"),
	)
	v4 := asm.Instructions{asm.LoadMem(asm.R2, asm.R6, bpfkit.SockOpsRemoteIP4, asm.Word).WithSymbol("v4")}
	v4 = append(v4, bpfkit.StoreMappedV4(tupleKeyOff+tupleRemoteOff, asm.R2)...)
	v4 = append(v4, asm.LoadMem(asm.R2, asm.R6, bpfkit.SockOpsLocalIP4, asm.Word))
	v4 = append(v4, bpfkit.StoreMappedV4(tupleKeyOff+tupleLocalOff, asm.R2)...)
	insns = append(insns, v4...)
	insns = append(insns,
		asm.Mov.Reg(asm.R1, asm.R6).WithSymbol("keyed"),
		asm.FnGetSocketCookie.Call(),
		asm.Mov.Reg(asm.R7, asm.R0),
	)
	insns = append(insns, record(m)...)
	return append(insns, allow()...)
}

// sockReleaseInsns forgets a TCP or UDP socket when its last file reference is closed (cgroup/sock_release).
func sockReleaseInsns(m progMaps) asm.Instructions {
	mapFD := m.owners
	var insns asm.Instructions
	insns = append(insns, asm.Mov.Reg(asm.R6, asm.R1))
	insns = append(insns, socketFilter(m, sockProtocolOff)...)
	insns = append(insns,
		asm.Mov.Reg(asm.R1, asm.R6).WithSymbol("record"),
		asm.FnGetSocketCookie.Call(),
		asm.StoreMem(asm.RFP, keyOff, asm.R0, asm.DWord),
		asm.LoadMapPtr(asm.R1, mapFD),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, keyOff),
		asm.FnMapDeleteElem.Call(),
	)
	insns = append(insns, emitInsns(m, keyOff, releaseEventSize, "r_emitted")...)
	return append(insns, allow()...)
}

// bpfHook is one program and where it attaches.
type bpfHook struct {
	name   string
	typ    ebpf.ProgramType
	attach ebpf.AttachType
	insns  func(m progMaps) asm.Instructions
}

var bpfHooks = []bpfHook{
	{"warden_sk_create", ebpf.CGroupSock, ebpf.AttachCGroupInetSockCreate, sockCreateInsns},
	{"warden_sk_release", ebpf.CGroupSock, ebpf.AttachCgroupInetSockRelease, sockReleaseInsns},
	{"warden_connect4", ebpf.CGroupSockAddr, ebpf.AttachCGroupInet4Connect, connectInsns(false)},
	{"warden_connect6", ebpf.CGroupSockAddr, ebpf.AttachCGroupInet6Connect, connectInsns(true)},
	{"warden_sendmsg4", ebpf.CGroupSockAddr, ebpf.AttachCGroupUDP4Sendmsg, sendmsgInsns(false)},
	{"warden_sendmsg6", ebpf.CGroupSockAddr, ebpf.AttachCGroupUDP6Sendmsg, sendmsgInsns(true)},
}

// tupleHook is the program that only the tuple map needs.
var tupleHook = bpfHook{"warden_sock_ops", ebpf.SockOps, ebpf.AttachCGroupSockOps, sockOpsInsns}

// tupleMapEntries bounds the tuple map; an evicted tuple is resolved by sock_diag.
const tupleMapEntries = 1 << 16

// bpfMode is which programs and maps newBPFOwners loads.
type bpfMode int

const (
	// modeOwners: the owner map alone; outbound connections are resolved through sock_diag.
	modeOwners bpfMode = iota
	// modeTupleMaps: the owner and tuple maps, and the event ring that mirrors them.
	modeTupleMaps
	// modeStorage: per-socket storage and the event ring, no hash maps (see storage_linux.go). The mirror is
	// then the only record of owners and tuples.
	modeStorage
)

// newLRUHash creates one of the hash map programs' maps.
func newLRUHash(name string, keySize, valueSize, entries uint32) (*ebpf.Map, error) {
	return ebpf.NewMap(&ebpf.MapSpec{Name: name, Type: ebpf.LRUHash, KeySize: keySize, ValueSize: valueSize,
		MaxEntries: entries})
}

// newBPFOwners loads mode's maps and programs, for the connections of the network namespace with cookie netns,
// and attaches them to the cgroup v2 root. An error wrapping errBPFUnavailable means the system cannot run them;
// any other is a bug (a rejected program).
func newBPFOwners(mode bpfMode, netns uint64) (_ *bpfOwners, err error) {
	if !initialPidNS() {
		return nil, fmt.Errorf("%w: not in the initial pid namespace (the programs would record other PIDs than /proc shows)", errBPFUnavailable)
	}
	b := &bpfOwners{mode: mode, fd: -1, tupleFD: -1}
	defer func() {
		if err != nil {
			b.close()
		}
	}()
	pm := progMaps{owners: -1, tuples: -1, storage: -1, netns: netns, ring: -1, lost: -1}
	if mode == modeStorage {
		if b.storage, err = newSocketStorage(); err != nil {
			return nil, fmt.Errorf("creating the socket storage: %w", classify(err))
		}
		b.fd = b.storage.FD()
		pm.storage = b.fd
	} else {
		if b.owners, err = newLRUHash("warden_owners", ownerKeySize, ownerValueSize, ownerMapEntries); err != nil {
			return nil, fmt.Errorf("creating socket owner map: %w", classify(err))
		}
		b.fd = b.owners.FD()
		pm.owners = b.fd
	}
	b.hooks = bpfHooks
	if mode == modeTupleMaps {
		if b.tuples, err = newLRUHash("warden_tuples", tupleKeySize, tupleValueSize, tupleMapEntries); err != nil {
			return nil, fmt.Errorf("creating connection tuple map: %w", classify(err))
		}
		b.tupleFD = b.tuples.FD()
		pm.tuples = b.tupleFD
		b.hooks = append(slices.Clone(bpfHooks), tupleHook)
	}
	if mode == modeStorage {
		b.hooks = storageHooks
	}
	if mode != modeOwners {
		if b.ringMap, err = ebpf.NewMap(&ebpf.MapSpec{Name: "warden_events", Type: ebpf.RingBuf, MaxEntries: uint32(mirrorRingSize)}); err != nil {
			return nil, fmt.Errorf("creating the socket event ring: %w", classify(err))
		}
		if b.lostMap, err = ebpf.NewMap(&ebpf.MapSpec{
			Name: "warden_lost", Type: ebpf.Array, KeySize: 4, ValueSize: 8, MaxEntries: 1, Flags: unix.BPF_F_MMAPABLE,
		}); err != nil {
			return nil, fmt.Errorf("creating the lost-event counter: %w", classify(err))
		}
		if b.mirror, err = newMirrorRing(b.ringMap.FD(), mirrorRingSize, b.lostMap.FD()); err != nil {
			return nil, fmt.Errorf("%w: %w", errBPFUnavailable, err)
		}
		pm.ring, pm.lost = b.ringMap.FD(), b.lostMap.FD()
	}
	for _, h := range b.hooks {
		p, err := ebpf.NewProgram(&ebpf.ProgramSpec{
			Name:         h.name,
			Type:         h.typ,
			AttachType:   h.attach,
			Instructions: h.insns(pm),
			// No GPL-only helper is used, so the programs need no particular license.
			License: "",
		})
		if err != nil {
			return nil, fmt.Errorf("loading %s: %w", h.name, classify(err))
		}
		b.progs = append(b.progs, p)
	}
	if b.links, err = attachToCgroupRoot(b.hooks, b.progs); err != nil {
		return nil, err
	}
	return b, nil
}

// classify wraps err with errBPFUnavailable when it says the kernel lacks a feature or forbids the operation.
// A verifier rejection counts as missing only when the verifier does not know a helper (an old kernel).
func classify(err error) error {
	var ve *ebpf.VerifierError
	switch {
	case errors.As(err, &ve):
		if strings.Contains(strings.Join(ve.Log, "\n"), "unknown func") {
			return fmt.Errorf("%w: %w", errBPFUnavailable, err)
		}
		return err
	case errors.Is(err, ebpf.ErrNotSupported), errors.Is(err, unix.EPERM), errors.Is(err, unix.EACCES),
		errors.Is(err, unix.ENOSYS), errors.Is(err, unix.EINVAL), errors.Is(err, unix.ENOENT):
		return fmt.Errorf("%w: %w", errBPFUnavailable, err)
	}
	return err
}

// pidNSInitIno is PROC_PID_INIT_INO, the inode number of the initial pid namespace (linux/proc_ns.h).
const pidNSInitIno = 0xEFFFFFFC

// initialPidNS reports whether the daemon runs in the initial pid namespace, where bpf_get_current_pid_tgid's
// tgids are the PIDs /proc shows.
func initialPidNS() bool {
	var st unix.Stat_t
	return unix.Stat("/proc/self/ns/pid", &st) == nil && st.Ino == pidNSInitIno
}

// attachToCgroupRoot attaches progs to the root of the cgroup v2 hierarchy.
func attachToCgroupRoot(hooks []bpfHook, progs []*ebpf.Program) (links []link.Link, err error) {
	err = bpfkit.InCgroupRoot(func(dir string) error {
		links, err = attachAll(dir, hooks, progs)
		return err
	})
	return links, err
}

// attachAll attaches every program to the cgroup at dir, or none.
func attachAll(dir string, hooks []bpfHook, progs []*ebpf.Program) ([]link.Link, error) {
	links := make([]link.Link, 0, len(progs))
	for i, p := range progs {
		l, err := link.AttachCgroup(link.CgroupOptions{Path: dir, Attach: hooks[i].attach, Program: p})
		if err != nil {
			for _, l := range links {
				l.Close()
			}
			return nil, fmt.Errorf("attaching %s to cgroup %s: %w", hooks[i].name, dir, classify(err))
		}
		links = append(links, l)
	}
	return links, nil
}

// bpfMapLookupElem is the BPF_MAP_LOOKUP_ELEM command of bpf(2).
const bpfMapLookupElem = 1

// mapElemAttr is the part of union bpf_attr that BPF_MAP_LOOKUP_ELEM reads.
type mapElemAttr struct {
	mapFD uint32
	_     uint32
	key   uint64
	value uint64
	flags uint64
}

// lookup returns the recorded owner of the socket with this cookie. It calls bpf(2) directly with stack
// buffers: the library's Lookup boxes key and value in interfaces, which allocates on every call.
func (b *bpfOwners) lookup(cookie uint64) (ownerEntry, bool) {
	if b.mode == modeStorage {
		return b.mirror.owner(cookie) // the mirror is the only record (it answers nothing once closed)
	}
	var v [ownerValueSize]byte
	attr := mapElemAttr{
		key:   uint64(uintptr(unsafe.Pointer(&cookie))),
		value: uint64(uintptr(unsafe.Pointer(&v))),
	}
	b.mu.RLock()
	if b.fd < 0 {
		b.mu.RUnlock()
		return ownerEntry{}, false
	}
	attr.mapFD = uint32(b.fd)
	_, _, errno := unix.Syscall(unix.SYS_BPF, bpfMapLookupElem, uintptr(unsafe.Pointer(&attr)), unsafe.Sizeof(attr))
	b.mu.RUnlock()
	// The kernel wrote through the addresses in attr; keep what they point to alive until it has.
	runtime.KeepAlive(&cookie)
	runtime.KeepAlive(&v)
	if errno != 0 {
		return ownerEntry{}, false
	}
	return decodeOwnerValue(&v), true
}

// lookupTuple returns the cookie the tuple map holds for k (tupleAmbiguous for a shared key), without
// allocating, like lookup.
func (b *bpfOwners) lookupTuple(k *[tupleKeySize]byte) (uint64, bool) {
	var cookie uint64
	attr := mapElemAttr{
		key:   uint64(uintptr(unsafe.Pointer(k))),
		value: uint64(uintptr(unsafe.Pointer(&cookie))),
	}
	b.mu.RLock()
	if b.tupleFD < 0 {
		b.mu.RUnlock()
		return 0, false
	}
	attr.mapFD = uint32(b.tupleFD)
	_, _, errno := unix.Syscall(unix.SYS_BPF, bpfMapLookupElem, uintptr(unsafe.Pointer(&attr)), unsafe.Sizeof(attr))
	b.mu.RUnlock()
	runtime.KeepAlive(k)
	runtime.KeepAlive(&cookie)
	return cookie, errno == 0
}

// hasTuples reports whether outbound connections' tuples are recorded (in the tuple map, or as events for the
// mirror alone).
func (b *bpfOwners) hasTuples() bool { return b.mode != modeOwners }

// close detaches the programs and releases the map.
func (b *bpfOwners) close() {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, l := range b.links {
		l.Close()
	}
	for _, p := range b.progs {
		p.Close()
	}
	b.links, b.progs = nil, nil
	if b.owners != nil {
		b.owners.Close()
		b.owners = nil
	}
	if b.tuples != nil {
		b.tuples.Close()
		b.tuples = nil
	}
	if b.storage != nil {
		b.storage.Close()
		b.storage = nil
	}
	if b.mirror != nil {
		b.mirror.close()
	}
	for _, m := range []*ebpf.Map{b.ringMap, b.lostMap} {
		if m != nil {
			m.Close()
		}
	}
	b.ringMap, b.lostMap = nil, nil
	b.fd, b.tupleFD = -1, -1
}
