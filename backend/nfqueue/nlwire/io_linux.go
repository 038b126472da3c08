package nlwire

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// Read and Write move one datagram on a netlink socket talking to the kernel, as raw system calls: without the
// Go scheduler's bookkeeping for calls that may block. Neither blocks here: the queue's socket is non-blocking
// (Go's poller waits for it), and a message to the kernel is handled in the sender's context and never waits
// for a peer. Yet a verdict carries its packet on through the stack and takes tens of microseconds; announced
// as blocking, it woke the scheduler's monitor and let it hand the processor to another thread mid-call: 0.4
// more context switches per TCP connection in wardenbench's tcp_connect, and about 3 % fewer connections per
// second.
func Read(fd int, b []byte) (int, error) { return rawIO(unix.SYS_READ, fd, b) }

// Write: see Read.
func Write(fd int, b []byte) (int, error) { return rawIO(unix.SYS_WRITE, fd, b) }

func rawIO(trap uintptr, fd int, b []byte) (int, error) {
	var p unsafe.Pointer
	if len(b) > 0 {
		p = unsafe.Pointer(&b[0])
	}
	n, _, e := unix.RawSyscall(trap, uintptr(fd), uintptr(p), uintptr(len(b)))
	if e != 0 {
		return 0, e
	}
	return int(n), nil
}
