package nfqverdict

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// write sends b without telling the Go scheduler that a system call may block (RawSyscall): a netlink message to
// the kernel is processed in the sender's context and never waits for a peer, yet a verdict carries its packet
// on through the stack and takes tens of microseconds. Announced as blocking, it woke the scheduler's monitor
// and let it hand the processor to another thread in mid-call: 0.4 more context switches per TCP connection
// in wardenbench's tcp_connect, and about 3 % fewer connections per second.
func write(fd int, b []byte) (int, error) {
	var p unsafe.Pointer
	if len(b) > 0 {
		p = unsafe.Pointer(&b[0])
	}
	n, _, e := unix.RawSyscall(unix.SYS_WRITE, uintptr(fd), uintptr(p), uintptr(len(b)))
	if e != 0 {
		return 0, e
	}
	return int(n), nil
}
