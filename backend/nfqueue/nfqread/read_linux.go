package nfqread

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// read is a non-blocking read (the socket is registered with Go's poller, which waits for it), so it is made
// without the scheduler's bookkeeping for system calls that may block (see nfqverdict's write).
func read(fd int, b []byte) (int, error) {
	var p unsafe.Pointer
	if len(b) > 0 {
		p = unsafe.Pointer(&b[0])
	}
	n, _, e := unix.RawSyscall(unix.SYS_READ, uintptr(fd), uintptr(p), uintptr(len(b)))
	if e != 0 {
		return 0, e
	}
	return int(n), nil
}
