package process

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"strings"
	"sync"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// The eBPF socket owner map: small cgroup programs record, for every TCP and UDP socket a process creates (and
// again whenever another process connects or sends with it), socket cookie -> tgid. sock_diag reports the same
// cookie with the socket, so a lookup costs one map read instead of a walk of /proc/<pid>/fd.
//
// The programs are attached to the cgroup v2 root, so they see every process of the cgroup namespace the daemon
// runs in. They never change what a socket call does: each returns "allow". They and their links are held only
// by file descriptors (never pinned), so they detach when the resolver closes them or the daemon dies.
//
// bpf_get_current_pid_tgid reports the tgid in the initial pid namespace, which is what /proc shows the daemon
// only when it runs there too; elsewhere the map is not used (see initialPidNS).

// ownerMapEntries bounds the owner map. It is an LRU map, so a burst of sockets evicts the oldest entries and
// their lookups fall back to /proc.
const ownerMapEntries = 1 << 16

// errBPFUnavailable marks a loader failure caused by what the system lacks or forbids (no cgroup v2, no BPF
// permission, an old kernel, another pid namespace), as opposed to a rejected program.
var errBPFUnavailable = errors.New("kernel feature missing")

// bpfOwners is the loaded owner map with its programs and links.
type bpfOwners struct {
	mu     sync.RWMutex // held for reading by lookups, for writing by close, so no lookup uses a closed fd
	owners *ebpf.Map
	fd     int // owners.FD(); -1 once closed
	progs  []*ebpf.Program
	links  []link.Link
}

// Kernel constants the programs use (linux/in.h, linux/bpf.h).
const (
	bpfAny = 0 // BPF_ANY: create or replace

	sockProtocolOff     = 12 // offsetof(struct bpf_sock, protocol)
	sockAddrProtocolOff = 36 // offsetof(struct bpf_sock_addr, protocol)
)

// The frame layout shared by the programs: the key at fp-8, the value (ownerValueSize bytes) below it.
const (
	keyOff   = -8
	valueOff = keyOff - ownerValueSize
	commOff  = valueOff + ownerCommOff // where the value's comm is built
)

// protocolFilter lets TCP and UDP sockets through to "record" and sends everything else (raw, ICMP, SCTP) to
// "allow": the resolver only asks about TCP and UDP, and other sockets would only crowd the LRU.
func protocolFilter(ctxOff int16) asm.Instructions {
	return asm.Instructions{
		asm.LoadMem(asm.R2, asm.R6, ctxOff, asm.Word),
		asm.JEq.Imm(asm.R2, ipprotoTCP, "record"),
		asm.JEq.Imm(asm.R2, ipprotoUDP, "record"),
		asm.Ja.Label("allow"),
	}
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

// storeOwner writes the value (tgid from R7, the time, the thread's name) and updates the map at the frame's
// key.
func storeOwner(mapFD int) asm.Instructions {
	insns := asm.Instructions{
		asm.StoreMem(asm.RFP, valueOff, asm.R7, asm.Word),
		asm.StoreImm(asm.RFP, valueOff+4, 0, asm.Word),
		asm.FnKtimeGetBootNs.Call(),
		asm.StoreMem(asm.RFP, valueOff+8, asm.R0, asm.DWord),
	}
	insns = append(insns, currentComm()...)
	return append(insns,
		asm.LoadMapPtr(asm.R1, mapFD),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, keyOff),
		asm.Mov.Reg(asm.R3, asm.RFP),
		asm.Add.Imm(asm.R3, valueOff),
		asm.Mov.Imm(asm.R4, bpfAny),
		asm.FnMapUpdateElem.Call(),
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
func sockCreateInsns(mapFD int) asm.Instructions {
	var insns asm.Instructions
	insns = append(insns, asm.Mov.Reg(asm.R6, asm.R1))
	insns = append(insns, protocolFilter(sockProtocolOff)...)
	insns = append(insns, cookieAndTgid()...)
	insns = append(insns, storeOwner(mapFD)...)
	return append(insns, allow()...)
}

// sockAddrInsns records the process that connects or sends with a socket (cgroup/connect4, connect6, sendmsg4,
// sendmsg6) when it is not the one already recorded, or its thread has another name than the one recorded: a
// socket created by one process and used by another (a forked child) is then attributed to its user, and one
// whose process has exec'd another program since names the new program's name, which the resolver compares
// with what it knows of the process (an exec keeps the PID). The common case, the creator using its own
// socket, is a map read without a write.
func sockAddrInsns(mapFD int) asm.Instructions {
	var insns asm.Instructions
	insns = append(insns, asm.Mov.Reg(asm.R6, asm.R1))
	insns = append(insns, protocolFilter(sockAddrProtocolOff)...)
	insns = append(insns, cookieAndTgid()...)
	insns = append(insns,
		asm.LoadMapPtr(asm.R1, mapFD),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, keyOff),
		asm.FnMapLookupElem.Call(),
		asm.JEq.Imm(asm.R0, 0, "update"),
		asm.LoadMem(asm.R1, asm.R0, 0, asm.Word),
		asm.JNE.Reg(asm.R1, asm.R7, "update"),
		asm.Mov.Reg(asm.R8, asm.R0), // the value stays valid across the helper call (RCU), R0 does not
	)
	insns = append(insns, currentComm()...)
	insns = append(insns,
		asm.LoadMem(asm.R1, asm.R8, ownerCommOff, asm.DWord),
		asm.LoadMem(asm.R2, asm.RFP, commOff, asm.DWord),
		asm.JNE.Reg(asm.R1, asm.R2, "update"),
		asm.LoadMem(asm.R1, asm.R8, ownerCommOff+8, asm.DWord),
		asm.LoadMem(asm.R2, asm.RFP, commOff+8, asm.DWord),
		asm.JEq.Reg(asm.R1, asm.R2, "allow"),
	)
	store := storeOwner(mapFD)
	store[0] = store[0].WithSymbol("update")
	insns = append(insns, store...)
	return append(insns, allow()...)
}

// sockReleaseInsns forgets a TCP or UDP socket when its last file reference is closed (cgroup/sock_release).
func sockReleaseInsns(mapFD int) asm.Instructions {
	var insns asm.Instructions
	insns = append(insns, asm.Mov.Reg(asm.R6, asm.R1))
	insns = append(insns, protocolFilter(sockProtocolOff)...)
	insns = append(insns,
		asm.Mov.Reg(asm.R1, asm.R6).WithSymbol("record"),
		asm.FnGetSocketCookie.Call(),
		asm.StoreMem(asm.RFP, keyOff, asm.R0, asm.DWord),
		asm.LoadMapPtr(asm.R1, mapFD),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, keyOff),
		asm.FnMapDeleteElem.Call(),
	)
	return append(insns, allow()...)
}

// bpfHook is one program and where it attaches.
type bpfHook struct {
	name   string
	typ    ebpf.ProgramType
	attach ebpf.AttachType
	insns  func(mapFD int) asm.Instructions
}

var bpfHooks = []bpfHook{
	{"warden_sk_create", ebpf.CGroupSock, ebpf.AttachCGroupInetSockCreate, sockCreateInsns},
	{"warden_sk_release", ebpf.CGroupSock, ebpf.AttachCgroupInetSockRelease, sockReleaseInsns},
	{"warden_connect4", ebpf.CGroupSockAddr, ebpf.AttachCGroupInet4Connect, sockAddrInsns},
	{"warden_connect6", ebpf.CGroupSockAddr, ebpf.AttachCGroupInet6Connect, sockAddrInsns},
	{"warden_sendmsg4", ebpf.CGroupSockAddr, ebpf.AttachCGroupUDP4Sendmsg, sockAddrInsns},
	{"warden_sendmsg6", ebpf.CGroupSockAddr, ebpf.AttachCGroupUDP6Sendmsg, sockAddrInsns},
}

// newBPFOwners creates the owner map, loads the programs and attaches them to the cgroup v2 root. An error
// wrapping errBPFUnavailable means the system cannot run them; any other is a bug (a rejected program).
func newBPFOwners() (_ *bpfOwners, err error) {
	if !initialPidNS() {
		return nil, fmt.Errorf("%w: not in the initial pid namespace (the programs would record other PIDs than /proc shows)", errBPFUnavailable)
	}
	m, err := ebpf.NewMap(&ebpf.MapSpec{
		Name:       "warden_owners",
		Type:       ebpf.LRUHash,
		KeySize:    ownerKeySize,
		ValueSize:  ownerValueSize,
		MaxEntries: ownerMapEntries,
	})
	if err != nil {
		return nil, fmt.Errorf("creating socket owner map: %w", classify(err))
	}
	b := &bpfOwners{owners: m, fd: m.FD()}
	defer func() {
		if err != nil {
			b.close()
		}
	}()
	for _, h := range bpfHooks {
		p, err := ebpf.NewProgram(&ebpf.ProgramSpec{
			Name:         h.name,
			Type:         h.typ,
			AttachType:   h.attach,
			Instructions: h.insns(b.fd),
			// No GPL-only helper is used, so the programs need no particular license.
			License: "",
		})
		if err != nil {
			return nil, fmt.Errorf("loading %s: %w", h.name, classify(err))
		}
		b.progs = append(b.progs, p)
	}
	if b.links, err = attachToCgroupRoot(b.progs); err != nil {
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
func attachToCgroupRoot(progs []*ebpf.Program) (links []link.Link, err error) {
	err = inCgroupRoot(func(dir string) error {
		links, err = attachAll(dir, progs)
		return err
	})
	return links, err
}

// inCgroupRoot calls fn with the path of the cgroup v2 root: the mount /proc/self/mountinfo names, or, when
// this mount namespace has none (`ip netns exec` remounts /sys without it), a mount of our own made in a
// private mount namespace of a throwaway thread, so no other process ever sees it. fn runs on that thread then,
// and must not start goroutines that use the path.
func inCgroupRoot(fn func(dir string) error) error {
	mountinfo, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return fmt.Errorf("%w: reading mountinfo: %w", errBPFUnavailable, err)
	}
	if dir, ok := cgroup2Mount(mountinfo); ok {
		return fn(dir)
	}
	done := make(chan error, 1)
	go func() {
		// The thread is never unlocked: it leaves the process with its mount namespace when this goroutine
		// returns.
		runtime.LockOSThread()
		done <- inPrivateCgroupMount(fn)
	}()
	return <-done
}

// inPrivateCgroupMount runs on a locked thread: it gives the thread its own mount namespace, mounts cgroup2
// there and calls fn with the mount point.
func inPrivateCgroupMount(fn func(dir string) error) error {
	if err := unix.Unshare(unix.CLONE_NEWNS); err != nil {
		return fmt.Errorf("%w: no cgroup2 mount, and cannot make a private mount namespace: %w", errBPFUnavailable, err)
	}
	// Without this a mount below a shared mount would propagate back to the original namespace.
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("%w: making mounts private: %w", errBPFUnavailable, err)
	}
	dir, err := os.MkdirTemp("", "warden-cgroup2-")
	if err != nil {
		return fmt.Errorf("%w: %w", errBPFUnavailable, err)
	}
	defer os.Remove(dir)
	if err := unix.Mount("none", dir, "cgroup2", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
		return fmt.Errorf("%w: no cgroup2 mount, and mounting one failed: %w", errBPFUnavailable, err)
	}
	defer unix.Unmount(dir, unix.MNT_DETACH)
	return fn(dir)
}

// attachAll attaches every program to the cgroup at dir, or none.
func attachAll(dir string, progs []*ebpf.Program) ([]link.Link, error) {
	links := make([]link.Link, 0, len(progs))
	for i, p := range progs {
		l, err := link.AttachCgroup(link.CgroupOptions{Path: dir, Attach: bpfHooks[i].attach, Program: p})
		if err != nil {
			for _, l := range links {
				l.Close()
			}
			return nil, fmt.Errorf("attaching %s to cgroup %s: %w", bpfHooks[i].name, dir, classify(err))
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
	b.fd = -1
}
