package process

import (
	"encoding/binary"
	"fmt"
	"strconv"
	"unsafe"

	"golang.org/x/sys/unix"
)

// procFS reads the parts of /proc (or a fake tree in tests) the resolver needs. Paths are built in
// caller-provided byte buffers and passed to the kernel NUL-terminated, so the per-connection checks do not
// allocate.
type procFS struct {
	root string
}

// pathBufSize fits "<root>/<pid>/fd/<fd>" for any sensible root.
const pathBufSize = 256

// path appends "<root>/<pid>/<rest...>" and a NUL to b[:0]. Numeric parts are given as non-negative ints.
func (p procFS) path(b []byte, pid int32, rest string, fd int32) []byte {
	b = append(b[:0], p.root...)
	b = append(b, '/')
	b = strconv.AppendInt(b, int64(pid), 10)
	b = append(b, '/')
	b = append(b, rest...)
	if fd >= 0 {
		b = strconv.AppendInt(b, int64(fd), 10)
	}
	return append(b, 0)
}

// readlinkZ is readlinkat(2) on a NUL-terminated path.
func readlinkZ(dirfd int, pathZ, buf []byte) (int, error) {
	n, _, errno := unix.Syscall6(unix.SYS_READLINKAT, uintptr(dirfd), uintptr(unsafe.Pointer(&pathZ[0])),
		uintptr(unsafe.Pointer(&buf[0])), uintptr(len(buf)), 0, 0)
	if errno != 0 {
		return 0, errno
	}
	return int(n), nil
}

// openZ is openat(2) on a NUL-terminated path.
func openZ(dirfd int, pathZ []byte, flags int) (int, error) {
	for {
		fd, _, errno := unix.Syscall6(unix.SYS_OPENAT, uintptr(dirfd), uintptr(unsafe.Pointer(&pathZ[0])),
			uintptr(flags|unix.O_CLOEXEC), 0, 0, 0)
		if errno == unix.EINTR {
			continue
		}
		if errno != 0 {
			return -1, errno
		}
		return int(fd), nil
	}
}

// holdsSocket reports whether process pid has socket inode open as descriptor fd.
func (p procFS) holdsSocket(pid, fd int32, inode uint32) bool {
	var pb [pathBufSize]byte
	var lb [64]byte
	n, err := readlinkZ(unix.AT_FDCWD, p.path(pb[:0], pid, "fd/", fd), lb[:])
	if err != nil {
		return false
	}
	got, ok := parseSocketLink(lb[:n])
	return ok && got == inode
}

// statBufSize holds /proc/<pid>/stat up to past its 22nd field: the name is at most 64 bytes and the 19 numbers
// before starttime at most 20 digits each.
const statBufSize = 1024

// readStat returns process pid's command name (aliasing buf) and start time.
func (p procFS) readStat(pid int32, buf *[statBufSize]byte) (comm []byte, start uint64, err error) {
	var pb [pathBufSize]byte
	fd, err := openZ(unix.AT_FDCWD, p.path(pb[:0], pid, "stat", -1), unix.O_RDONLY)
	if err != nil {
		return nil, 0, err
	}
	n, err := unix.Read(fd, buf[:])
	unix.Close(fd)
	if err != nil {
		return nil, 0, err
	}
	comm, start, ok := parseStat(buf[:n])
	if !ok {
		return nil, 0, fmt.Errorf("malformed %s/%d/stat", p.root, pid)
	}
	return comm, start, nil
}

// readExe returns the target of /proc/<pid>/exe, without the " (deleted)" marker.
func (p procFS) readExe(pid int32) (string, error) {
	var pb [pathBufSize]byte
	var lb [unix.PathMax]byte
	n, err := readlinkZ(unix.AT_FDCWD, p.path(pb[:0], pid, "exe", -1), lb[:])
	if err != nil {
		return "", err
	}
	return cleanExePath(string(lb[:n])), nil
}

// scanBuffers are the buffers one /proc walk reuses. Only one walk runs at a time.
type scanBuffers struct {
	dents []byte
	path  []byte
	link  [64]byte
	name  [16]byte
}

func newScanBuffers() *scanBuffers {
	return &scanBuffers{dents: make([]byte, 16<<10), path: make([]byte, 0, pathBufSize)}
}

// forEachDirent calls fn with the name of every entry of the open directory fd (fn's argument aliases the
// buffer).
func forEachDirent(fd int, buf []byte, fn func(name []byte)) error {
	for {
		n, err := unix.Getdents(fd, buf)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return err
		}
		if n <= 0 {
			return nil
		}
		// struct linux_dirent64: d_ino u64, d_off s64, d_reclen u16, d_type u8, d_name (NUL-terminated).
		const nameOff = 19
		for b := buf[:n]; len(b) >= nameOff; {
			reclen := int(binary.NativeEndian.Uint16(b[16:18]))
			if reclen < nameOff || reclen > len(b) {
				return fmt.Errorf("malformed directory entry")
			}
			name := b[nameOff:reclen]
			for i, c := range name {
				if c == 0 {
					name = name[:i]
					break
				}
			}
			fn(name)
			b = b[reclen:]
		}
	}
}

// listPIDs appends the PIDs of all processes (thread group leaders) to dst.
func (p procFS) listPIDs(bufs *scanBuffers, dst []int32) ([]int32, error) {
	bufs.path = append(append(bufs.path[:0], p.root...), 0)
	fd, err := openZ(unix.AT_FDCWD, bufs.path, unix.O_RDONLY|unix.O_DIRECTORY)
	if err != nil {
		return dst, fmt.Errorf("opening %s: %w", p.root, err)
	}
	defer unix.Close(fd)
	err = forEachDirent(fd, bufs.dents, func(name []byte) {
		if pid, ok := parseUint32(name); ok && pid > 0 && pid <= 1<<31-1 {
			dst = append(dst, int32(pid))
		}
	})
	if err != nil {
		return dst, fmt.Errorf("listing %s: %w", p.root, err)
	}
	return dst, nil
}

// socketsOf calls fn for every socket process pid has open. A process that exits meanwhile has none.
func (p procFS) socketsOf(pid int32, bufs *scanBuffers, fn func(fd int32, inode uint32)) {
	p.socketsUntil(pid, bufs, func(fd int32, inode uint32) bool { fn(fd, inode); return false })
}

// socketsUntil is socketsOf with an early stop: once fn returns true, no further descriptor is read (each
// costs a readlink system call).
func (p procFS) socketsUntil(pid int32, bufs *scanBuffers, fn func(fd int32, inode uint32) (stop bool)) {
	bufs.path = p.path(bufs.path[:0], pid, "fd", -1)
	dirfd, err := openZ(unix.AT_FDCWD, bufs.path, unix.O_RDONLY|unix.O_DIRECTORY)
	if err != nil {
		return // gone, or a kernel thread we may not look into
	}
	defer unix.Close(dirfd)
	stopped := false
	_ = forEachDirent(dirfd, bufs.dents, func(name []byte) {
		if stopped {
			return
		}
		fd, ok := parseUint32(name)
		if !ok || len(name) >= len(bufs.name) {
			return
		}
		nz := append(bufs.name[:0], name...)
		nz = append(nz, 0)
		n, err := readlinkZ(dirfd, nz, bufs.link[:])
		if err != nil {
			return
		}
		if inode, ok := parseSocketLink(bufs.link[:n]); ok {
			stopped = fn(int32(fd), inode)
		}
	})
}
