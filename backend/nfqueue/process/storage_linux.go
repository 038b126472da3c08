package process

import (
	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/btf"
	"golang.org/x/sys/unix"
)

// The socket storage programs (modeStorage, the default wherever the mirror runs). They report the same events
// as the map programs (see mirror_linux.go), but keep no hash map. The mirror is then the only record of owners
// and tuples, and a lookup it cannot answer goes to sock_diag and /proc. What a program must remember of a
// socket lives in the socket's own BPF storage, which the kernel frees with the socket: only a UDP socket that
// sends to addresses needs any (the process recorded and the last tuple reported, so that repeated sends
// report nothing).
//
// Why: every update, look-up and delete of the LRU hash maps touched memory no other work had in the cache (the
// bucket, the element, the LRU lists). Measured by the BPF run-time statistics in the benchmark's UDP flows
// (socket, bind, connect, send, close), the map programs cost an application 4-5 µs per flow, most of it in the
// map operations; these programs cost about 2 µs. Making a socket's storage costs about as much as a map insert
// (two allocations with memory accounting), which is why sockets get it only when they need it.
//
// What the maps did beyond remembering is done by the mirror, which sees the events in the order the programs
// wrote them: a tuple two open sockets report is marked ambiguous there (the map programs did it in the kernel
// too), and a closed socket's tuple answers nothing because its owner is gone.

// The storage value: the owner value as the owner map holds it, then the tuple key last reported for the socket
// (all zero: none yet).
const (
	storageTupleOff = ownerValueSize
	storageSize     = ownerValueSize + tupleKeySize

	skStorageGetFCreate = 1 // BPF_SK_STORAGE_GET_F_CREATE
)

// newSocketStorage creates the socket storage map. The kernel requires BTF for its key (an int) and value.
func newSocketStorage() (*ebpf.Map, error) {
	u8 := &btf.Int{Name: "unsigned char", Size: 1}
	u32 := &btf.Int{Name: "unsigned int", Size: 4}
	value := &btf.Struct{Name: "warden_sock", Size: storageSize, Members: []btf.Member{
		{Name: "owner", Type: &btf.Array{Index: u32, Type: u8, Nelems: ownerValueSize}},
		{Name: "tuple", Type: &btf.Array{Index: u32, Type: u8, Nelems: tupleKeySize}, Offset: btf.Bits(8 * storageTupleOff)},
	}}
	return ebpf.NewMap(&ebpf.MapSpec{
		Name:      "warden_socks",
		Type:      ebpf.SkStorage,
		KeySize:   4,
		ValueSize: storageSize,
		Flags:     unix.BPF_F_NO_PREALLOC, // the kernel requires it of socket storage
		Key:       &btf.Int{Name: "int", Size: 4, Encoding: btf.Signed},
		Value:     value,
	})
}

// storageHooks are the socket storage programs, at the same attach points as the map programs.
var storageHooks = []bpfHook{
	{"warden_post_bind4", ebpf.CGroupSock, ebpf.AttachCGroupInet4PostBind, storagePostBindInsns},
	{"warden_post_bind6", ebpf.CGroupSock, ebpf.AttachCGroupInet6PostBind, storagePostBindInsns},
	{"warden_sk_release", ebpf.CGroupSock, ebpf.AttachCgroupInetSockRelease, storageSockReleaseInsns},
	{"warden_connect4", ebpf.CGroupSockAddr, ebpf.AttachCGroupInet4Connect, storageConnectInsns(false)},
	{"warden_connect6", ebpf.CGroupSockAddr, ebpf.AttachCGroupInet6Connect, storageConnectInsns(true)},
	{"warden_sendmsg4", ebpf.CGroupSockAddr, ebpf.AttachCGroupUDP4Sendmsg, storageSendmsgInsns(false)},
	{"warden_sendmsg6", ebpf.CGroupSockAddr, ebpf.AttachCGroupUDP6Sendmsg, storageSendmsgInsns(true)},
	{"warden_sock_ops", ebpf.SockOps, ebpf.AttachCGroupSockOps, storageSockOpsInsns},
}

// storageGet puts the storage of the socket in sk into R0 (creating it), or 0 when the kernel could not
// allocate it. It clobbers R1-R5.
func storageGet(m progMaps, sk asm.Register) asm.Instructions {
	return asm.Instructions{
		asm.LoadMapPtr(asm.R1, m.storage),
		asm.Mov.Reg(asm.R2, sk),
		asm.Mov.Imm(asm.R3, 0),
		asm.Mov.Imm(asm.R4, skStorageGetFCreate),
		asm.FnSkStorageGet.Call(),
	}
}

// copyOwnerToStorage copies the frame's owner value into the storage in R8, unless R8 is 0, then falls through
// to the instruction labelled next.
func copyOwnerToStorage(next string) asm.Instructions {
	insns := asm.Instructions{asm.JEq.Imm(asm.R8, 0, next)}
	for off := int16(0); off < ownerValueSize; off += 8 {
		insns = append(insns,
			asm.LoadMem(asm.R1, asm.RFP, valueOff+off, asm.DWord),
			asm.StoreMem(asm.R8, off, asm.R1, asm.DWord),
		)
	}
	return insns
}

// storagePostBindInsns reports the process that bound a TCP or UDP socket to an address (cgroup/post_bind4 and
// post_bind6): the owner of listeners and receiving UDP sockets, which connect and send report nothing for.
// Sockets are not reported when they are created: a client socket's connect or send names its user anyway, and
// an event per socket cost every new connection about 0.5 µs in the application and one more event for the
// mirror to apply. A socket that is never bound, connected or sent from with an address (a listener bound by
// listen alone) is left to sock_diag and /proc, as sockets older than the resolver are. It gives the socket no
// storage: allocating it (with its memory accounting) cost about as much as the owner map's update did, and most
// sockets never need it (see storageSendmsgInsns).
func storagePostBindInsns(m progMaps) asm.Instructions {
	insns := asm.Instructions{asm.Mov.Reg(asm.R6, asm.R1)}
	insns = append(insns, socketFilter(m, sockProtocolOff)...)
	insns = append(insns, cookieAndTgid()...)
	insns = append(insns, ownerValueInsns()...)
	insns = append(insns, emitInsns(m, valueOff, ownerEventSize, "c_emitted")...)
	return append(insns, allow()...)
}

// storageConnectInsns is the connect4/connect6 program: it reports the connecting process as the socket's user
// (a socket may have been made by another process: a parent that forked), and for a UDP socket already bound to
// a port its tuple too (see connectInsns), in one event. A socket connects once, so nothing is remembered to
// skip a repeat.
func storageConnectInsns(v6 bool) func(progMaps) asm.Instructions {
	return func(m progMaps) asm.Instructions {
		insns := asm.Instructions{asm.Mov.Reg(asm.R6, asm.R1)}
		insns = append(insns, socketFilter(m, sockAddrProtocolOff)...)
		insns = append(insns, cookieAndTgid()...)
		insns = append(insns, ownerValueInsns()...)
		insns = append(insns, udpTupleKeyOr(m, v6, false, "c_owner", reportTupleInsns(m, connectEventSize))...)
		// Another protocol, or a socket without its port yet: its user alone.
		owner := emitInsns(m, valueOff, ownerEventSize, "c_emitted")
		owner[0] = owner[0].WithSymbol("c_owner")
		insns = append(insns, owner...)
		return append(insns, allow()...)
	}
}

// storageSendmsgInsns is the sendmsg4/sendmsg6 program (UDP sends that name a destination). A send to the peer
// the socket is connected to adds nothing: connect4 reported the tuple if the socket had its port by then, and
// if it had not, the socket's sends are left to sock_diag, as its sends without a destination (which run no
// program) always are. Otherwise, like sockAddrInsns, it reports the process using the socket when it is not
// the one recorded in the socket's storage, or its thread has another name, and then the tuple (see
// udpTupleKey) unless it is the one the socket reported last: a socket sending to one peer after another
// reports each change, and a repeat costs neither an event nor a map operation. The storage is made at the
// socket's first such send.
func storageSendmsgInsns(v6 bool) func(progMaps) asm.Instructions {
	return func(m progMaps) asm.Instructions {
		insns := asm.Instructions{asm.Mov.Reg(asm.R6, asm.R1)}
		insns = append(insns, socketFilter(m, sockAddrProtocolOff)...)
		insns = append(insns, asm.LoadMem(asm.R1, asm.R6, sockAddrSkOff, asm.DWord).WithSymbol("record"))
		insns = append(insns, connectedPeerInsns(v6, "s_new")...)
		owner := cookieAndTgid()
		owner[0] = owner[0].WithSymbol("s_new") // instead of "record", which names the context's load above
		insns = append(insns, owner...)
		insns = append(insns, asm.LoadMem(asm.R2, asm.R6, sockAddrSkOff, asm.DWord))
		insns = append(insns, storageGet(m, asm.R2)...)
		insns = append(insns,
			asm.Mov.Reg(asm.R8, asm.R0), // the storage stays valid across helper calls, R0 does not
			asm.JEq.Imm(asm.R8, 0, "update"),
		)
		insns = append(insns, ownerCurrentInsns()...)
		update := ownerValueInsns()
		update[0] = update[0].WithSymbol("update")
		insns = append(insns, update...)
		insns = append(insns, copyOwnerToStorage("u_emit")...)
		emit := emitInsns(m, valueOff, ownerEventSize, "u_emitted")
		emit[0] = emit[0].WithSymbol("u_emit")
		insns = append(insns, emit...)
		tail := udpTupleKey(m, v6, true, storageTupleInsns(m))
		tail[0] = tail[0].WithSymbol("owned")
		insns = append(insns, tail...)
		return append(insns, allow()...)
	}
}

// connectedPeerInsns jumps to "allow" when the send's destination is the peer the socket (in R1, from the
// context's sk) is connected to, else to next. R6 holds the bpf_sock_addr context; R2 and R3 are clobbered.
func connectedPeerInsns(v6 bool, next string) asm.Instructions {
	insns := asm.Instructions{
		asm.LoadMem(asm.R2, asm.R1, sockDstPortOff, asm.Half),
		asm.JEq.Imm(asm.R2, 0, next),
		// user_port holds the port as it is in memory (network order) in its low 16 bits, as dst_port does.
		asm.LoadMem(asm.R3, asm.R6, sockAddrUserPortOff, asm.Word),
		asm.And.Imm(asm.R3, 0xffff),
		asm.JNE.Reg(asm.R2, asm.R3, next),
	}
	if !v6 {
		return append(insns,
			asm.LoadMem(asm.R2, asm.R1, sockDstIP4Off, asm.Word),
			asm.LoadMem(asm.R3, asm.R6, sockAddrUserIP4Off, asm.Word),
			asm.JNE.Reg(asm.R2, asm.R3, next),
			asm.Ja.Label("allow"),
		)
	}
	for i := int16(0); i < 16; i += 4 {
		insns = append(insns,
			asm.LoadMem(asm.R2, asm.R1, sockDstIP6Off+i, asm.Word),
			asm.LoadMem(asm.R3, asm.R6, sockAddrUserIP6Off+i, asm.Word),
			asm.JNE.Reg(asm.R2, asm.R3, next),
		)
	}
	return append(insns, asm.Ja.Label("allow"))
}

// storageTupleInsns reports the frame's tuple key for the context's socket, whose cookie is at the frame's key,
// unless the socket's storage (R8, or 0 for none) holds it already as the last one reported; the key is
// reported ambiguous for a socket that may share its port (see reuseCheckInsns). It ends by jumping to "allow".
func storageTupleInsns(m progMaps) asm.Instructions {
	insns := asm.Instructions{asm.JEq.Imm(asm.R8, 0, "t_check")}
	for off := int16(0); off < tupleKeySize; off += 8 {
		insns = append(insns,
			asm.LoadMem(asm.R1, asm.R8, storageTupleOff+off, asm.DWord),
			asm.LoadMem(asm.R2, asm.RFP, tupleKeyOff+off, asm.DWord),
			asm.JNE.Reg(asm.R1, asm.R2, "t_store"),
		)
	}
	insns = append(insns, asm.Ja.Label("allow"))
	for off := int16(0); off < tupleKeySize; off += 8 {
		ld := asm.LoadMem(asm.R2, asm.RFP, tupleKeyOff+off, asm.DWord)
		if off == 0 {
			ld = ld.WithSymbol("t_store")
		}
		insns = append(insns, ld, asm.StoreMem(asm.R8, storageTupleOff+off, asm.R2, asm.DWord))
	}
	report := reportTupleInsns(m, tupleEventSize)
	report[0] = report[0].WithSymbol("t_check")
	return append(insns, report...)
}

// reportTupleInsns sets the frame's tuple value (the cookie at the frame's key, or ambiguous for a socket that
// may share its port: see reuseCheckInsns) and reports size bytes of the frame from it: a tuple event, or a
// connect event with the owner value after it. It ends by jumping to "allow".
func reportTupleInsns(m progMaps, size int32) asm.Instructions {
	insns := reuseCheckInsns("t_shared")
	insns = append(insns,
		asm.LoadMem(asm.R1, asm.RFP, keyOff, asm.DWord),
		asm.StoreMem(asm.RFP, tupleValOff, asm.R1, asm.DWord),
		asm.Ja.Label("t_emit"),
		asm.Mov.Imm(asm.R1, tupleAmbiguous).WithSymbol("t_shared"),
		asm.StoreMem(asm.RFP, tupleValOff, asm.R1, asm.DWord),
	)
	emit := emitInsns(m, tupleValOff, size, "t_emitted")
	emit[0] = emit[0].WithSymbol("t_emit")
	insns = append(insns, emit...)
	return append(insns, asm.Ja.Label("allow"))
}

// storageSockOpsInsns reports a new TCP connection's full 4-tuple with its socket's cookie (see sockOpsInsns).
// No two open sockets share a 4-tuple, and the mirror forgets a closed socket's, so nothing is remembered here.
func storageSockOpsInsns(m progMaps) asm.Instructions {
	return sockOpsProgram(m, func(m progMaps) asm.Instructions {
		insns := asm.Instructions{asm.StoreMem(asm.RFP, tupleValOff, asm.R7, asm.DWord)}
		insns = append(insns, emitInsns(m, tupleValOff, tupleEventSize, "t_emitted")...)
		return append(insns, asm.Ja.Label("allow"))
	})
}

// storageSockReleaseInsns reports a TCP or UDP socket's release (its last file reference closed); its storage
// goes with it.
func storageSockReleaseInsns(m progMaps) asm.Instructions {
	insns := asm.Instructions{asm.Mov.Reg(asm.R6, asm.R1)}
	insns = append(insns, socketFilter(m, sockProtocolOff)...)
	insns = append(insns,
		asm.Mov.Reg(asm.R1, asm.R6).WithSymbol("record"),
		asm.FnGetSocketCookie.Call(),
		asm.StoreMem(asm.RFP, keyOff, asm.R0, asm.DWord),
	)
	insns = append(insns, emitInsns(m, keyOff, releaseEventSize, "r_emitted")...)
	return append(insns, allow()...)
}
