package windowskext

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/windows"
)

// Device names and control codes of kext v2 (kext-protocol.md 1.1, 1.2).
const (
	// DevicePath is the path user space opens.
	DevicePath = `\\.\PortmasterKext`
	// ServiceName is the driver's kernel service name.
	ServiceName = "PortmasterKext"

	ioctlVersion = 0x9C40E000
	// kextMajor is the interface major version this backend speaks; 1 is the legacy IOCTL interface.
	kextMajor = 2
)

// overlappedOp is one kind of overlapped operation (read, write or control) with its own event. The
// OVERLAPPED lives on the heap, as the kernel writes to it when a pending operation completes and a goroutine
// stack may move.
type overlappedOp struct {
	mu sync.Mutex // one operation of this kind at a time
	ov *windows.Overlapped
}

func newOverlappedOp() (*overlappedOp, error) {
	// Manual reset, as ReadFile, WriteFile and DeviceIoControl reset the event when they start.
	ev, err := windows.CreateEvent(nil, 1, 0, nil)
	if err != nil {
		return nil, fmt.Errorf("creating an event: %w", err)
	}
	return &overlappedOp{ov: &windows.Overlapped{HEvent: ev}}, nil
}

// do runs f with the operation's OVERLAPPED and waits for it if it is pending, returning the byte count.
func (o *overlappedOp) do(h windows.Handle, f func(ov *windows.Overlapped, n *uint32) error) (uint32, error) {
	ev := o.ov.HEvent
	*o.ov = windows.Overlapped{HEvent: ev}
	var n uint32
	err := f(o.ov, &n)
	if err == windows.ERROR_IO_PENDING {
		// The driver's read normally blocks inside its dispatch routine instead of pending, but a correct
		// caller must not rely on that.
		err = windows.GetOverlappedResult(h, o.ov, &n, true)
	}
	return n, err
}

func (o *overlappedOp) close() {
	windows.CloseHandle(o.ov.HEvent)
}

// kextDevice is the driver's device handle.
type kextDevice struct {
	h                  windows.Handle
	read, write, ioctl *overlappedOp
	closed             atomic.Bool
	closeOnce          sync.Once
	closeErr           error
	teardown           func() error // undoes what the opener set up around the device
}

// openDevice opens the driver's device for overlapped I/O and checks its interface version.
func openDevice() (*kextDevice, error) {
	name, err := windows.UTF16PtrFromString(DevicePath)
	if err != nil {
		return nil, err
	}
	h, err := windows.CreateFile(name, windows.GENERIC_READ|windows.GENERIC_WRITE, 0, nil,
		windows.OPEN_EXISTING, windows.FILE_ATTRIBUTE_NORMAL|windows.FILE_FLAG_OVERLAPPED, 0)
	if err != nil {
		return nil, fmt.Errorf("opening %s: %w", DevicePath, err)
	}
	d := &kextDevice{h: h}
	for _, op := range []**overlappedOp{&d.read, &d.write, &d.ioctl} {
		if *op, err = newOverlappedOp(); err != nil {
			d.release()
			return nil, err
		}
	}
	v, err := d.version()
	if err != nil {
		d.release()
		return nil, fmt.Errorf("reading the kext version: %w", err)
	}
	if v[0] != kextMajor {
		d.release()
		return nil, fmt.Errorf("kext interface version %d.%d.%d.%d is not supported: need major version %d", v[0], v[1], v[2], v[3], kextMajor)
	}
	return d, nil
}

// version asks the driver for its interface version [major, minor, revision, build].
func (d *kextDevice) version() ([4]byte, error) {
	d.ioctl.mu.Lock()
	defer d.ioctl.mu.Unlock()
	out := make([]byte, 4) // heap: the kernel may write it after DeviceIoControl returns pending
	n, err := d.ioctl.do(d.h, func(ov *windows.Overlapped, n *uint32) error {
		return windows.DeviceIoControl(d.h, ioctlVersion, nil, 0, &out[0], uint32(len(out)), n, ov)
	})
	if err != nil {
		return [4]byte{}, err
	}
	if n < 4 {
		return [4]byte{}, fmt.Errorf("version reply has %d bytes", n)
	}
	return [4]byte(out), nil
}

// Read reads infos. The driver ends reads with end-of-file after Shutdown.
func (d *kextDevice) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	d.read.mu.Lock()
	defer d.read.mu.Unlock()
	if d.closed.Load() {
		return 0, os.ErrClosed
	}
	n, err := d.read.do(d.h, func(ov *windows.Overlapped, n *uint32) error {
		return windows.ReadFile(d.h, p, n, ov)
	})
	switch {
	case err == windows.ERROR_HANDLE_EOF:
		return int(n), io.EOF // STATUS_END_OF_FILE: the queue was run down
	case err == windows.ERROR_OPERATION_ABORTED && d.closed.Load():
		return int(n), os.ErrClosed
	case err != nil:
		return int(n), fmt.Errorf("reading from the kext: %w", err)
	}
	return int(n), nil
}

// Write sends one command with one WriteFile.
func (d *kextDevice) Write(p []byte) (int, error) {
	d.write.mu.Lock()
	defer d.write.mu.Unlock()
	if d.closed.Load() {
		return 0, os.ErrClosed
	}
	n, err := d.write.do(d.h, func(ov *windows.Overlapped, n *uint32) error {
		return windows.WriteFile(d.h, p, n, ov)
	})
	if err != nil {
		return int(n), fmt.Errorf("writing to the kext: %w", err)
	}
	return int(n), nil
}

// Close cancels outstanding I/O, closes the handle and runs the teardown (service and WFP clean-up).
func (d *kextDevice) Close() error {
	d.closeOnce.Do(func() {
		d.closed.Store(true)
		// Cancels pended I/O. A read blocked inside the driver's dispatch routine is not cancellable; the
		// Shutdown command the backend sends first is what ends it.
		_ = windows.CancelIoEx(d.h, nil)
		err := d.release()
		if d.teardown != nil {
			err = errors.Join(err, d.teardown())
		}
		d.closeErr = err
	})
	return d.closeErr
}

// release closes the handle and, once no operation uses them, the events. An operation still stuck in the
// driver keeps its event (a leak of one handle) rather than having it closed under it.
func (d *kextDevice) release() error {
	err := windows.CloseHandle(d.h)
	for _, op := range []*overlappedOp{d.read, d.write, d.ioctl} {
		if op == nil {
			continue
		}
		if lockWithin(&op.mu, 2*time.Second) {
			op.close()
			op.mu.Unlock()
		}
	}
	return err
}

// lockWithin tries to lock mu for up to d.
func lockWithin(mu *sync.Mutex, d time.Duration) bool {
	deadline := time.Now().Add(d)
	for !mu.TryLock() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(10 * time.Millisecond)
	}
	return true
}
