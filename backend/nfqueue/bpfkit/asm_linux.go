package bpfkit

import (
	"encoding/binary"

	"github.com/cilium/ebpf/asm"
)

// Offsets in struct bpf_sock_ops (linux/bpf.h).
const (
	SockOpsOp        = 0
	SockOpsFamily    = 20
	SockOpsRemoteIP4 = 24
	SockOpsLocalIP4  = 28
	SockOpsRemoteIP6 = 32
	SockOpsLocalIP6  = 48
	// SockOpsRemotePort is in network byte order, in the upper 16 bits on kernels before 5.10 (see FoldPort).
	SockOpsRemotePort = 64
	SockOpsLocalPort  = 68 // host byte order
)

// V4MappedMarker is the third 32-bit word of an IPv4-mapped IPv6 address (bytes 00 00 ff ff) as a native-endian
// load from memory sees it.
var V4MappedMarker = int32(binary.NativeEndian.Uint32([]byte{0, 0, 0xff, 0xff}))

// StoreMappedV4 writes the IPv4 address in src at the frame offset as ::ffff:a.b.c.d. It stores words, so off
// need only be 4-aligned.
func StoreMappedV4(off int16, src asm.Register) asm.Instructions {
	return asm.Instructions{
		asm.StoreImm(asm.RFP, off, 0, asm.Word),
		asm.StoreImm(asm.RFP, off+4, 0, asm.Word),
		asm.StoreImm(asm.RFP, off+8, int64(V4MappedMarker), asm.Word),
		asm.StoreMem(asm.RFP, off+12, src, asm.Word),
	}
}

// FoldPort leaves in port the 16-bit network-order port a context field held in either its low or its high
// half (sock_ops and sk_msg contexts moved it between kernel versions); scratch is clobbered.
func FoldPort(port, scratch asm.Register) asm.Instructions {
	return asm.Instructions{
		asm.Mov.Reg(scratch, port),
		asm.RSh.Imm(scratch, 16),
		asm.And.Imm(port, 0xffff),
		asm.Or.Reg(port, scratch),
	}
}

// ZeroFrame clears n bytes (a multiple of 8) of the frame from off. The assembler has no 64-bit store of an
// immediate: R5 holds the zero.
func ZeroFrame(off, n int16) asm.Instructions {
	insns := asm.Instructions{asm.Mov.Imm(asm.R5, 0)}
	for i := int16(0); i < n; i += 8 {
		insns = append(insns, asm.StoreMem(asm.RFP, off+i, asm.R5, asm.DWord))
	}
	return insns
}

// CopyWords copies n bytes (a multiple of 4) from the context in ctx at ctxOff to the frame at frameOff, a word
// at a time (context fields allow no wider loads) through scratch.
func CopyWords(ctx, scratch asm.Register, ctxOff, frameOff, n int16) asm.Instructions {
	var insns asm.Instructions
	for i := int16(0); i < n; i += 4 {
		insns = append(insns,
			asm.LoadMem(scratch, ctx, ctxOff+i, asm.Word),
			asm.StoreMem(asm.RFP, frameOff+i, scratch, asm.Word))
	}
	return insns
}
