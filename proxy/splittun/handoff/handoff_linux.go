package handoff

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/warden-fw/warden/backend/nfqueue/bpfkit"
)

// A tuple key is the application socket's view of its connection: its own address (16 bytes, IPv4 as
// ::ffff:a.b.c.d), its port (big-endian), two zero bytes, then the original destination and its port the same
// way. Its first endpointSize bytes are the client end alone, which is also how the proxy's end of the loopback
// connection sees its peer.
const (
	keySize      = 40
	endpointSize = 20
	origOff      = endpointSize

	// maxEntries bounds each map. Expected tuples sit in an LRU map (a connection that never reaches the proxy
	// leaves its entry behind); a full socket map just means no handoff.
	maxEntries = 1 << 16
)

// Kernel ABI (linux/bpf.h, linux/socket.h).
const (
	afInet  = 2
	afInet6 = 10

	sockOpsActiveEstablishedCB = 4 // BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB: needs no callback flag
	bpfFIngress                = 1 // BPF_F_INGRESS: into the target's receive queue, not out of it
	skPass                     = 1

	// struct sk_msg_md
	msgFamilyOff     = 16
	msgRemoteIP4Off  = 20
	msgRemoteIP6Off  = 28
	msgRemotePortOff = 60
)

// Handoff is the loaded maps and programs.
type Handoff struct {
	expect  *ebpf.Map // tuple -> 1, written by Expect, consumed by the sock_ops program
	clients *ebpf.Map // tuple -> application socket (sockhash; user space reads socket cookies)
	pairs   *ebpf.Map // client endpoint -> tuple, for the sk_msg program
	relays  *ebpf.Map // client endpoint -> the proxy's socket (sockhash with the sk_msg program)
	progs   []*ebpf.Program
	link    link.Link

	// mu is held for reading by every use of the maps and for writing by Close, so a late caller gets
	// ErrClosed instead of a closed map.
	mu     sync.RWMutex
	closed bool

	diagMu sync.Mutex // one sock_diag request at a time on diag
	diag   int
}

// Load creates the maps, loads the programs and attaches the sock_ops program to the cgroup v2 root, for the
// network namespace the daemon runs in. Close undoes it; nothing is pinned, so nothing outlives the daemon.
func Load() (_ *Handoff, err error) {
	h := &Handoff{diag: -1}
	defer func() {
		if err != nil {
			h.Close()
		}
	}()
	probe, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	netns, err := bpfkit.NetnsCookie(probe)
	unix.Close(probe)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrUnsupported, err)
	}
	maps := []struct {
		m    **ebpf.Map
		name string
		typ  ebpf.MapType
		k, v uint32
	}{
		{&h.expect, "warden_ho_exp", ebpf.LRUHash, keySize, 4},
		{&h.clients, "warden_ho_cli", ebpf.SockHash, keySize, 8},
		{&h.pairs, "warden_ho_pairs", ebpf.Hash, endpointSize, keySize},
		{&h.relays, "warden_ho_relay", ebpf.SockHash, endpointSize, 8},
	}
	for _, m := range maps {
		*m.m, err = ebpf.NewMap(&ebpf.MapSpec{Name: m.name, Type: m.typ, KeySize: m.k, ValueSize: m.v,
			MaxEntries: maxEntries})
		if err != nil {
			return nil, fmt.Errorf("%w: creating map %s: %w", ErrUnsupported, m.name, err)
		}
	}
	ops, err := ebpf.NewProgram(&ebpf.ProgramSpec{Name: "warden_ho_sops", Type: ebpf.SockOps, License: "GPL",
		Instructions: sockOpsInsns(h.expect.FD(), h.clients.FD(), netns)})
	if err != nil {
		return nil, fmt.Errorf("%w: loading the sock_ops program: %w", ErrUnsupported, err)
	}
	h.progs = append(h.progs, ops)
	msg, err := ebpf.NewProgram(&ebpf.ProgramSpec{Name: "warden_ho_redir", Type: ebpf.SkMsg, License: "GPL",
		AttachType: ebpf.AttachSkMsgVerdict, Instructions: redirectInsns(h.pairs.FD(), h.clients.FD())})
	if err != nil {
		return nil, fmt.Errorf("%w: loading the sk_msg program: %w", ErrUnsupported, err)
	}
	h.progs = append(h.progs, msg)
	// Attached to the map, not a cgroup: it runs for the proxy's sockets in relays and nothing else, and goes
	// away with the map.
	if err := link.RawAttachProgram(link.RawAttachProgramOptions{Target: h.relays.FD(), Program: msg,
		Attach: ebpf.AttachSkMsgVerdict}); err != nil {
		return nil, fmt.Errorf("%w: attaching the sk_msg program: %w", ErrUnsupported, err)
	}
	err = bpfkit.InCgroupRoot(func(dir string) error {
		l, err := link.AttachCgroup(link.CgroupOptions{Path: dir, Attach: ebpf.AttachCGroupSockOps, Program: ops})
		h.link = l
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("%w: attaching the sock_ops program to the cgroup root: %w", ErrUnsupported, err)
	}
	h.diag, err = unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
	if err != nil {
		return nil, fmt.Errorf("opening sock_diag socket: %w", err)
	}
	tv := unix.NsecToTimeval(diagTimeout.Nanoseconds())
	if err := unix.SetsockoptTimeval(h.diag, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		return nil, fmt.Errorf("sock_diag receive timeout: %w", err)
	}
	return h, nil
}

// Close detaches the programs and frees the maps. Sockets still in them return to plain TCP; data handed off to
// an application that has not read it yet is dropped with its queue.
func (h *Handoff) Close() error {
	if h == nil {
		return nil
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	h.closed = true
	var errs []error
	if h.link != nil {
		errs = append(errs, h.link.Close())
		h.link = nil
	}
	for _, p := range h.progs {
		errs = append(errs, p.Close())
	}
	h.progs = nil
	for _, m := range []**ebpf.Map{&h.expect, &h.clients, &h.pairs, &h.relays} {
		if *m != nil {
			errs = append(errs, (*m).Close())
			*m = nil
		}
	}
	h.diagMu.Lock()
	if h.diag >= 0 {
		errs = append(errs, unix.Close(h.diag))
		h.diag = -1
	}
	h.diagMu.Unlock()
	return errors.Join(errs...)
}

// Expect announces a TCP connection the proxy is about to receive, before its first packet is let through.
func (h *Handoff) Expect(client, original netip.AddrPort) error {
	h.mu.RLock()
	defer h.mu.RUnlock()
	if h.closed {
		return ErrClosed
	}
	k := tupleKey(client, original)
	if err := h.expect.Update(k[:], uint32(1), ebpf.UpdateAny); err != nil {
		return fmt.Errorf("expecting %s -> %s: %w", client, original, err)
	}
	return nil
}

// Client is an application socket the proxy's writes go to.
type Client struct {
	h        *Handoff
	key      [keySize]byte
	cookie   uint64
	client   netip.AddrPort
	original netip.AddrPort
}

// Attach pairs relay (the proxy's accepted end of the connection from client to original) with the
// application's socket. From then on everything written to relay lands in the application's receive queue.
// It must be called before the first write to relay; ErrNotPaired means nothing changed.
func (h *Handoff) Attach(relay *net.TCPConn, client, original netip.AddrPort) (*Client, error) {
	h.mu.RLock()
	defer h.mu.RUnlock()
	if h.closed {
		return nil, ErrClosed
	}
	k := tupleKey(client, original)
	var cookie uint64
	if err := h.clients.Lookup(k[:], &cookie); err != nil {
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return nil, ErrNotPaired
		}
		return nil, fmt.Errorf("looking up the application socket: %w", err)
	}
	ep := k[:endpointSize]
	if err := h.pairs.Update(ep, k[:], ebpf.UpdateAny); err != nil {
		return nil, fmt.Errorf("pairing %s: %w", client, err)
	}
	rc, err := relay.SyscallConn()
	if err != nil {
		h.pairs.Delete(ep)
		return nil, err
	}
	var uerr error
	if err := rc.Control(func(fd uintptr) { uerr = h.relays.Update(ep, uint64(fd), ebpf.UpdateAny) }); err != nil {
		uerr = err
	}
	if uerr != nil {
		h.pairs.Delete(ep)
		return nil, fmt.Errorf("adding the relay socket: %w", uerr)
	}
	return &Client{h: h, key: k, cookie: cookie, client: client, original: original}, nil
}

// Detach forgets the pairing once the proxy writes no more. The application socket stays in the map until it
// closes (the kernel removes it then), so data it has not read yet stays readable.
func (c *Client) Detach() {
	c.h.mu.RLock()
	defer c.h.mu.RUnlock()
	if !c.h.closed {
		_ = c.h.pairs.Delete(c.key[:endpointSize])
	}
}

// drainPoll bounds how often Drain asks again: no event tells it that an application read.
const (
	drainPollMin = time.Millisecond
	drainPollMax = 50 * time.Millisecond
)

// Drain waits until no application socket in the map holds handed-off data it has not read, or until ctx is
// done, and returns how many still do. Close drops what is unread, so a daemon stopping gracefully drains
// first: the proxy has finished its relays by then, and what is left is the tail of finished downloads. A
// connection that has closed in both directions cannot be asked (sock_diag answers for its TIME_WAIT entry),
// so Drain does not wait for its application.
func (h *Handoff) Drain(ctx context.Context) int {
	h.mu.RLock()
	defer h.mu.RUnlock()
	if h.closed {
		return 0
	}
	wait := drainPollMin
	for {
		pending := 0
		var k [keySize]byte
		var cookie uint64
		it := h.clients.Iterate()
		for it.Next(&k, &cookie) {
			c := Client{h: h, key: k, cookie: cookie, client: keyEndpoint(k[:endpointSize]),
				original: keyEndpoint(k[origOff:])}
			if q, err := c.Queued(); err == nil && q > 0 {
				pending++
			}
		}
		if pending == 0 || ctx.Err() != nil {
			return pending
		}
		select {
		case <-ctx.Done():
		case <-time.After(wait):
		}
		wait = min(2*wait, drainPollMax)
	}
}

// keyEndpoint reads an address and port written by tupleKey.
func keyEndpoint(b []byte) netip.AddrPort {
	return netip.AddrPortFrom(netip.AddrFrom16([16]byte(b[:16])).Unmap(), binary.BigEndian.Uint16(b[16:18]))
}

// tupleKey builds the maps' key.
func tupleKey(client, original netip.AddrPort) [keySize]byte {
	var k [keySize]byte
	a := client.Addr().As16() // IPv4 becomes ::ffff:a.b.c.d
	copy(k[:16], a[:])
	binary.BigEndian.PutUint16(k[16:], client.Port())
	o := original.Addr().As16()
	copy(k[origOff:origOff+16], o[:])
	binary.BigEndian.PutUint16(k[origOff+16:], original.Port())
	return k
}

// keyOff is where both programs build their key on the stack.
const keyOff = -keySize

// sockOpsInsns: when a TCP socket of namespace netns becomes established by connecting and its tuple is
// expected, move it from the expect map into the clients sockhash. Always allows.
func sockOpsInsns(expectFD, clientsFD int, netns uint64) asm.Instructions {
	insns := asm.Instructions{
		asm.Mov.Reg(asm.R6, asm.R1),
		asm.LoadMem(asm.R2, asm.R6, bpfkit.SockOpsOp, asm.Word),
		asm.JNE.Imm(asm.R2, sockOpsActiveEstablishedCB, "allow"),
		asm.Mov.Reg(asm.R1, asm.R6),
		asm.FnGetNetnsCookie.Call(),
		asm.LoadImm(asm.R1, int64(netns), asm.DWord),
		asm.JNE.Reg(asm.R0, asm.R1, "allow"),
	}
	insns = append(insns, bpfkit.ZeroFrame(keyOff, keySize)...)
	insns = append(insns,
		asm.LoadMem(asm.R2, asm.R6, bpfkit.SockOpsLocalPort, asm.Word),
		asm.HostTo(asm.BE, asm.R2, asm.Half),
		asm.StoreMem(asm.RFP, keyOff+16, asm.R2, asm.Half),
		asm.LoadMem(asm.R2, asm.R6, bpfkit.SockOpsRemotePort, asm.Word),
	)
	insns = append(insns, bpfkit.FoldPort(asm.R2, asm.R3)...)
	insns = append(insns,
		asm.StoreMem(asm.RFP, keyOff+origOff+16, asm.R2, asm.Half),
		asm.LoadMem(asm.R2, asm.R6, bpfkit.SockOpsFamily, asm.Word),
		asm.JEq.Imm(asm.R2, afInet, "v4"),
		asm.JNE.Imm(asm.R2, afInet6, "allow"),
	)
	insns = append(insns, bpfkit.CopyWords(asm.R6, asm.R2, bpfkit.SockOpsLocalIP6, keyOff, 16)...)
	insns = append(insns, bpfkit.CopyWords(asm.R6, asm.R2, bpfkit.SockOpsRemoteIP6, keyOff+origOff, 16)...)
	insns = append(insns, asm.Ja.Label("keyed"))
	insns = append(insns, asm.LoadMem(asm.R2, asm.R6, bpfkit.SockOpsLocalIP4, asm.Word).WithSymbol("v4"))
	insns = append(insns, bpfkit.StoreMappedV4(keyOff, asm.R2)...)
	insns = append(insns, asm.LoadMem(asm.R2, asm.R6, bpfkit.SockOpsRemoteIP4, asm.Word))
	insns = append(insns, bpfkit.StoreMappedV4(keyOff+origOff, asm.R2)...)
	insns = append(insns,
		// Deleting answers whether the tuple was expected (0) or not (-ENOENT): no lookup first.
		asm.LoadMapPtr(asm.R1, expectFD).WithSymbol("keyed"),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, keyOff),
		asm.FnMapDeleteElem.Call(),
		asm.JNE.Imm(asm.R0, 0, "allow"),
		asm.Mov.Reg(asm.R1, asm.R6),
		asm.LoadMapPtr(asm.R2, clientsFD),
		asm.Mov.Reg(asm.R3, asm.RFP),
		asm.Add.Imm(asm.R3, keyOff),
		asm.Mov.Imm(asm.R4, 0), // BPF_ANY
		asm.FnSockHashUpdate.Call(),
		asm.Mov.Imm(asm.R0, 1).WithSymbol("allow"),
		asm.Return(),
	)
	return insns
}

// redirectInsns: a write on a relay socket goes to the receive queue of the application socket its peer
// endpoint is paired with. An unpaired relay passes its writes through unchanged (the proxy never writes to one
// before Attach, so that does not happen in practice).
func redirectInsns(pairsFD, clientsFD int) asm.Instructions {
	insns := asm.Instructions{asm.Mov.Reg(asm.R6, asm.R1)}
	insns = append(insns, bpfkit.ZeroFrame(keyOff, 24)...)
	insns = append(insns,
		asm.LoadMem(asm.R2, asm.R6, msgRemotePortOff, asm.Word),
	)
	insns = append(insns, bpfkit.FoldPort(asm.R2, asm.R3)...)
	insns = append(insns,
		asm.StoreMem(asm.RFP, keyOff+16, asm.R2, asm.Half),
		asm.LoadMem(asm.R2, asm.R6, msgFamilyOff, asm.Word),
		asm.JEq.Imm(asm.R2, afInet, "v4"),
		asm.JNE.Imm(asm.R2, afInet6, "pass"),
	)
	insns = append(insns, bpfkit.CopyWords(asm.R6, asm.R2, msgRemoteIP6Off, keyOff, 16)...)
	insns = append(insns, asm.Ja.Label("keyed"))
	insns = append(insns, asm.LoadMem(asm.R2, asm.R6, msgRemoteIP4Off, asm.Word).WithSymbol("v4"))
	insns = append(insns, bpfkit.StoreMappedV4(keyOff, asm.R2)...)
	insns = append(insns,
		asm.LoadMapPtr(asm.R1, pairsFD).WithSymbol("keyed"),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, keyOff),
		asm.FnMapLookupElem.Call(),
		asm.JEq.Imm(asm.R0, 0, "pass"),
		asm.Mov.Reg(asm.R3, asm.R0),
		asm.Mov.Reg(asm.R1, asm.R6),
		asm.LoadMapPtr(asm.R2, clientsFD),
		asm.Mov.Imm(asm.R4, bpfFIngress),
		asm.FnMsgRedirectHash.Call(), // SK_PASS when queued, SK_DROP (the write fails) when the socket is gone
		asm.Return(),
		asm.Mov.Imm(asm.R0, skPass).WithSymbol("pass"),
		asm.Return(),
	)
	return insns
}
