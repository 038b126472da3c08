package control

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"time"
	"unsafe"

	"golang.org/x/sys/windows"
)

// pipeSDDL grants the pipe to SYSTEM and the Administrators group only ("P": no inherited entries).
const pipeSDDL = "D:P(A;;GA;;;SY)(A;;GA;;;BA)"

// Listen creates the control named pipe (e.g. \\.\pipe\warden), usable by SYSTEM and Administrators only.
// FILE_FLAG_FIRST_PIPE_INSTANCE makes it fail if another process already owns the name, so nobody can
// squat the pipe before the daemon starts and intercept the CLI.
func Listen(path string) (net.Listener, error) {
	sd, err := windows.SecurityDescriptorFromString(pipeSDDL)
	if err != nil {
		return nil, fmt.Errorf("control pipe security descriptor: %w", err)
	}
	l := &pipeListener{path: path, sa: &windows.SecurityAttributes{
		Length: uint32(unsafe.Sizeof(windows.SecurityAttributes{})), SecurityDescriptor: sd,
	}, closed: make(chan struct{})}
	h, err := l.newInstance(true)
	if err != nil {
		return nil, fmt.Errorf("control pipe %s: %w", path, err)
	}
	l.next = h
	return l, nil
}

type pipeListener struct {
	path   string
	sa     *windows.SecurityAttributes
	mu     sync.Mutex
	next   windows.Handle // the instance the next Accept waits on
	closed chan struct{}
	once   sync.Once
}

func (l *pipeListener) newInstance(first bool) (windows.Handle, error) {
	name, err := windows.UTF16PtrFromString(l.path)
	if err != nil {
		return 0, err
	}
	flags := uint32(windows.PIPE_ACCESS_DUPLEX | windows.FILE_FLAG_OVERLAPPED)
	if first {
		flags |= windows.FILE_FLAG_FIRST_PIPE_INSTANCE
	}
	mode := uint32(windows.PIPE_TYPE_BYTE | windows.PIPE_READMODE_BYTE | windows.PIPE_WAIT | windows.PIPE_REJECT_REMOTE_CLIENTS)
	return windows.CreateNamedPipe(name, flags, mode, windows.PIPE_UNLIMITED_INSTANCES, 64<<10, 64<<10, 0, l.sa)
}

// Accept waits for a client on the current instance, then prepares the next one.
func (l *pipeListener) Accept() (net.Conn, error) {
	l.mu.Lock()
	h := l.next
	l.next = 0
	l.mu.Unlock()
	if h == 0 {
		var err error
		if h, err = l.newInstance(false); err != nil {
			return nil, err
		}
	}
	ev, err := windows.CreateEvent(nil, 1, 0, nil)
	if err != nil {
		windows.CloseHandle(h)
		return nil, err
	}
	defer windows.CloseHandle(ev)
	ov := &windows.Overlapped{HEvent: ev}
	err = windows.ConnectNamedPipe(h, ov)
	switch {
	case err == nil, errors.Is(err, windows.ERROR_PIPE_CONNECTED):
	case errors.Is(err, windows.ERROR_IO_PENDING):
		// Wait for a client or for Close, which cancels the pending connect.
		waitDone := make(chan struct{})
		go func() {
			select {
			case <-l.closed:
				_ = windows.CancelIoEx(h, ov)
			case <-waitDone:
			}
		}()
		var n uint32
		err = windows.GetOverlappedResult(h, ov, &n, true)
		close(waitDone)
		if err != nil {
			windows.CloseHandle(h)
			select {
			case <-l.closed:
				return nil, net.ErrClosed
			default:
				return nil, fmt.Errorf("control pipe connect: %w", err)
			}
		}
	default:
		windows.CloseHandle(h)
		return nil, fmt.Errorf("control pipe connect: %w", err)
	}
	// os.NewFile registers an overlapped handle with the runtime poller, so reads, writes and deadlines
	// work like a socket's.
	return &pipeConn{File: os.NewFile(uintptr(h), l.path), path: l.path}, nil
}

func (l *pipeListener) Close() error {
	l.once.Do(func() {
		close(l.closed)
		l.mu.Lock()
		if l.next != 0 {
			windows.CloseHandle(l.next)
			l.next = 0
		}
		l.mu.Unlock()
	})
	return nil
}

func (l *pipeListener) Addr() net.Addr { return pipeAddr(l.path) }

type pipeAddr string

func (a pipeAddr) Network() string { return "pipe" }
func (a pipeAddr) String() string  { return string(a) }

// pipeConn adapts a connected pipe handle to net.Conn.
type pipeConn struct {
	*os.File
	path string
}

func (c *pipeConn) LocalAddr() net.Addr  { return pipeAddr(c.path) }
func (c *pipeConn) RemoteAddr() net.Addr { return pipeAddr(c.path) }

func dial(ctx context.Context, path string) (net.Conn, error) {
	name, err := windows.UTF16PtrFromString(path)
	if err != nil {
		return nil, err
	}
	for {
		h, err := windows.CreateFile(name, windows.GENERIC_READ|windows.GENERIC_WRITE, 0, nil,
			windows.OPEN_EXISTING, windows.FILE_FLAG_OVERLAPPED, 0)
		if err == nil {
			return &pipeConn{File: os.NewFile(uintptr(h), path), path: path}, nil
		}
		if errors.Is(err, windows.ERROR_ACCESS_DENIED) {
			return nil, fmt.Errorf("%w (the control pipe is for Administrators only)", err)
		}
		if !errors.Is(err, windows.ERROR_PIPE_BUSY) {
			return nil, err
		}
		// Every instance is busy: the server creates the next one right after an Accept.
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}
