package backend

// Process is the program behind a connection, as far as it is known.
type Process struct {
	PID int32
	// Path is the executable's absolute path, "" when unknown.
	Path string
	// UID is the process's user, Unknown when not known.
	UID int32
}

// ProcessResolver is implemented by backends (or helpers) that can find the process owning a connection
// when the kernel did not say. Lookups may be slow (they may read /proc); the pipeline never calls
// ResolveProcess on the packet-reading goroutine. ok is false when the owner is unknown or gone; a short-lived socket whose
// process has exited must be reported unknown, never misattributed.
type ProcessResolver interface {
	ResolveProcess(info *Info) (p Process, ok bool)
}

// ImmediateProcessResolver is a ProcessResolver that can often answer at once from state it already holds (an
// eBPF map, a cache), without blocking and without reading /proc. The pipeline asks it on the packet-reading
// goroutine first, and hands the lookup to a worker (ResolveProcess) only when it cannot answer: a hand-off
// to another goroutine costs more than such an answer.
type ImmediateProcessResolver interface {
	ProcessResolver
	// ResolveProcessNow answers only what it can without blocking. ok false means "not known here", not
	// "unknown": the caller then asks ResolveProcess.
	ResolveProcessNow(info *Info) (p Process, ok bool)
}
