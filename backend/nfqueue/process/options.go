package process

// Options tunes a Resolver.
type Options struct {
	// DisableEBPF keeps the resolver from loading its eBPF socket owner map: every lookup then walks /proc.
	DisableEBPF bool
	// DisableTupleMap keeps the eBPF programs from recording outbound connections' tuples: every lookup then
	// asks sock_diag for the socket first.
	DisableTupleMap bool
	// DisableMirror makes the programs keep their records in the eBPF hash maps and lookups read those with
	// bpf(2) instead of the user-space mirror (for comparison; by default the programs keep what they need in
	// socket storage and report to the mirror, which holds the only record).
	DisableMirror bool
	// DisableSocketStorage loads the hash map programs, as on a kernel that cannot give the programs socket
	// storage: the mirror then mirrors the maps, which answer what it cannot.
	DisableSocketStorage bool
}

// Stats counts how a Resolver answered lookups that missed its 5-tuple cache.
type Stats struct {
	// EBPF reports whether the eBPF socket owner map is in use.
	EBPF bool `json:"ebpf"`
	// MapAnswers counts lookups the eBPF map answered.
	MapAnswers uint64 `json:"map_answers"`
	// ProcAnswers counts lookups answered by looking through /proc/<pid>/fd.
	ProcAnswers uint64 `json:"proc_answers"`
	// MapMisses counts lookups the map had no entry for: sockets created before the resolver, sockets accepted
	// from a listener (the kernel creates those), or entries the bounded map evicted.
	MapMisses uint64 `json:"map_misses"`
	// MapStale counts map entries whose process was gone (or whose PID names a newer process); /proc then
	// finds whoever holds the socket now.
	MapStale uint64 `json:"map_stale"`
	// MapFast counts the MapAnswers given from what the resolver already knew of the process, without any
	// system call (the others read /proc/<pid>/stat to check the PID still names the process the map does).
	MapFast uint64 `json:"map_fast"`
	// TupleMap reports whether outbound connections' tuples are recorded (in the eBPF tuple map, or in the mirror
	// alone with SocketStorage).
	TupleMap bool `json:"tuple_map"`
	// SocketStorage reports whether the programs keep their records in socket storage instead of hash maps: the
	// mirror then answers what the maps did.
	SocketStorage bool `json:"socket_storage"`
	// TupleAnswers counts the MapAnswers given for outbound connections from the tuple map, without asking
	// sock_diag for the socket.
	TupleAnswers uint64 `json:"tuple_answers"`
	// DiagLookups counts sock_diag socket lookups.
	DiagLookups uint64 `json:"diag_lookups"`
	// Immediate counts lookups answered on the packet's own goroutine (ResolveProcessNow), without handing
	// the packet to a lookup worker.
	Immediate uint64 `json:"immediate"`
	// Mirror reports whether the eBPF maps are mirrored in user space (fed by a ring of the programs' events),
	// so that outbound connections are resolved without a system call.
	Mirror bool `json:"mirror"`
	// MirrorAnswers counts tuple lookups the mirror answered (found, or known absent) without bpf(2).
	MirrorAnswers uint64 `json:"mirror_answers"`
	// MirrorSockets is the number of open sockets the mirror holds; MirrorResets how often it had to be
	// cleared (events lost to a full ring, or its size bound).
	MirrorSockets int    `json:"mirror_sockets"`
	MirrorResets  uint64 `json:"mirror_resets"`
	// MirrorEvents counts the programs' events the mirror replayed: about three per short-lived socket.
	MirrorEvents uint64 `json:"mirror_events"`
}
