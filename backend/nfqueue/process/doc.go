// Package process finds the process behind a connection on Linux, for packets whose owner the kernel did not
// tell (NFQUEUE delivers the UID/GID, never the PID).
//
// A lookup asks the kernel's sock_diag netlink interface for the socket that owns the 5-tuple (its inode, UID
// and cookie). The owner is then read, when it can be, from what small cgroup programs recorded of the socket
// cookie: the process that bound the socket or last connected or sent with it (the map programs of older kernels
// record its creator instead of its binder). By default the programs report it as events in a ring that the
// resolver replays into a user-space mirror, keeping only what they must remember in the socket's own storage
// (storage_linux.go); where the kernel cannot do that, they keep an eBPF map from cookie to owner
// (ebpf_linux.go). The PID found is trusted only if that process still exists and had started when the entry
// was written.
// The entry also holds the writing thread's name: when the resolver already has a record of that process, kept
// live by its exit watcher, with the same name and an earlier start, the record answers without any system
// call; otherwise /proc/<pid>/stat is read to check the PID still names that process.
// Otherwise (a socket older than the resolver, an accepted connection, an evicted entry, a creator that has
// exited, or a system without the programs) the inode is mapped to a PID through a cached index of
// /proc/<pid>/fd. The PID is mapped to its executable through /proc/<pid>/exe, cached by PID and start time so
// a reused PID is never mistaken for the old process. Results are also cached by 5-tuple for a short time. A
// socket whose process is already gone is reported as unknown.
//
// An outbound TCP connection, or a UDP send to an address, that the programs saw skips sock_diag: the mirror
// (or, with the older programs, a second eBPF map) names the socket by the connection's tuple, and the answer
// comes when the socket's owner entry exists (the socket is still open) and is trusted as above; the UID is
// then the one the packet's queue reported.
// Connected UDP sockets, inbound connections and everything else take the sock_diag path.
//
// sock_diag answers for the network namespace the resolver was created in, so only that namespace's sockets
// are ever looked up. The eBPF programs see every socket of the cgroup tree and skip other namespaces' sockets
// before recording anything (on kernels that report namespace cookies). /proc is global.
package process
