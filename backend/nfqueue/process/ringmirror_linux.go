package process

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ringReader consumes a BPF ring buffer in place: the kernel maps the consumer position read-write, and the
// producer position and the data (twice in a row, so a record that wraps is contiguous) read-only. Reading
// needs no system call; the programs submit without waking anyone unless the ring is a quarter full (see
// ringWaiter).
type ringReader struct {
	cons []byte // the consumer page
	prod []byte // the producer page, then the data twice
	mask uint64 // data size - 1
	page int
}

// BPF ring buffer record header bits (linux/bpf.h).
const (
	ringBusyBit    = 1 << 31
	ringDiscardBit = 1 << 30
	ringHeaderSize = 8
)

func newRingReader(fd, size int) (*ringReader, error) {
	page := unix.Getpagesize()
	cons, err := unix.Mmap(fd, 0, page, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("mapping the ring's consumer page: %w", err)
	}
	prod, err := unix.Mmap(fd, int64(page), page+2*size, unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		unix.Munmap(cons)
		return nil, fmt.Errorf("mapping the ring's data: %w", err)
	}
	return &ringReader{cons: cons, prod: prod, mask: uint64(size - 1), page: page}, nil
}

func (r *ringReader) consPos() *uint64 { return (*uint64)(unsafe.Pointer(&r.cons[0])) }
func (r *ringReader) prodPos() *uint64 { return (*uint64)(unsafe.Pointer(&r.prod[0])) }

// drain hands every committed record to f, in order, and releases their space. It stops at a record still
// being written, and returns the bytes of ring it released.
func (r *ringReader) drain(f func([]byte)) int {
	cons := atomic.LoadUint64(r.consPos())
	start := cons
	prod := atomic.LoadUint64(r.prodPos())
	data := r.prod[r.page:]
	for cons < prod {
		off := cons & r.mask
		hdr := atomic.LoadUint32((*uint32)(unsafe.Pointer(&data[off])))
		if hdr&ringBusyBit != 0 {
			break
		}
		n := uint64(hdr &^ (ringBusyBit | ringDiscardBit))
		if hdr&ringDiscardBit == 0 {
			start := off + ringHeaderSize
			f(data[start : start+n])
		}
		cons += (n + ringHeaderSize + 7) &^ 7
		atomic.StoreUint64(r.consPos(), cons)
	}
	return int(cons - start)
}

func (r *ringReader) close() {
	unix.Munmap(r.cons)
	unix.Munmap(r.prod)
}

// mirrorRing is the socket mirror fed by the programs' ring, with the count of events the programs could not
// put in a full ring (a shared-memory counter too).
type mirrorRing struct {
	mu     sync.Mutex
	ring   *ringReader
	lost   []byte // the lost-event counter's array map, mapped
	seen   uint64 // lost events already accounted for
	events uint64 // events replayed so far
	mirror *socketMirror
}

func newMirrorRing(ringFD, ringSize, lostFD int) (*mirrorRing, error) {
	ring, err := newRingReader(ringFD, ringSize)
	if err != nil {
		return nil, err
	}
	lost, err := unix.Mmap(lostFD, 0, unix.Getpagesize(), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		ring.close()
		return nil, fmt.Errorf("mapping the lost-event counter: %w", err)
	}
	return &mirrorRing{ring: ring, lost: lost, mirror: newSocketMirror()}, nil
}

// syncLocked replays what the ring holds. A lost event (the ring was full) makes the mirror incomplete: it is
// cleared, and learns afresh from the next events. The counter is read after the ring: a program counts a loss
// before the socket call that caused it returns, so before any packet that depends on it can be queued.
func (m *mirrorRing) syncLocked() int {
	n := m.ring.drain(m.apply)
	if lost := atomic.LoadUint64((*uint64)(unsafe.Pointer(&m.lost[0]))); lost != m.seen {
		m.seen = lost
		m.mirror.reset()
	}
	return n
}

// apply replays one event and counts it.
func (m *mirrorRing) apply(ev []byte) {
	m.events++
	m.mirror.apply(ev)
}

// lookup brings the mirror up to date and resolves k.
func (m *mirrorRing) lookup(k *tupleKey) (ownerEntry, mirrorAnswer) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.ring == nil {
		return ownerEntry{}, mirrorUnknown
	}
	m.syncLocked()
	return m.mirror.lookup(k)
}

// owner brings the mirror up to date and returns the recorded owner of the open socket with this cookie.
func (m *mirrorRing) owner(cookie uint64) (ownerEntry, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.ring == nil {
		return ownerEntry{}, false
	}
	m.syncLocked()
	o, ok := m.mirror.owners[cookie]
	return o.e, ok
}

// sync drains the ring without a lookup, so it does not fill up while no connection needs resolving. It
// returns the bytes it drained and the ring's size (0 once closed).
func (m *mirrorRing) sync() (drained, size int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.ring == nil {
		return 0, 0
	}
	return m.syncLocked(), int(m.ring.mask + 1)
}

// stats returns the mirror's size, how often it was reset, and the events it replayed.
func (m *mirrorRing) stats() (sockets int, resets, events uint64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.mirror.owners), m.mirror.resets, m.events
}

func (m *mirrorRing) close() {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.ring == nil {
		return
	}
	m.ring.close()
	unix.Munmap(m.lost)
	m.ring, m.lost = nil, nil
}

// ringWaiter puts the ring's background reader to sleep until a timeout, a wake-up from the programs (they
// send one when they write into a ring already a quarter full: a burst of sockets while no lookup reads it), or
// the resolver's Close.
type ringWaiter struct {
	ep   int // epoll instance: the ring (edge-triggered) and stop
	stop int // eventfd that Close writes

	mu     sync.Mutex // guards stop against wake after close
	closed bool
}

func newRingWaiter(ringFD int) (_ *ringWaiter, err error) {
	w := &ringWaiter{ep: -1, stop: -1}
	defer func() {
		if err != nil {
			w.close()
		}
	}()
	if w.ep, err = unix.EpollCreate1(unix.EPOLL_CLOEXEC); err != nil {
		return nil, fmt.Errorf("epoll_create1: %w", err)
	}
	if w.stop, err = unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK); err != nil {
		return nil, fmt.Errorf("eventfd: %w", err)
	}
	// Edge-triggered: the ring polls readable whenever it holds an event, which between lookups is most of the
	// time; only the programs' wake-ups should end a wait.
	if err = unix.EpollCtl(w.ep, unix.EPOLL_CTL_ADD, ringFD, &unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLET, Fd: int32(ringFD)}); err != nil {
		return nil, fmt.Errorf("watching the event ring: %w", err)
	}
	if err = unix.EpollCtl(w.ep, unix.EPOLL_CTL_ADD, w.stop, &unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(w.stop)}); err != nil {
		return nil, fmt.Errorf("watching the stop event: %w", err)
	}
	return w, nil
}

// wait sleeps for up to d; it returns false once wake was called.
func (w *ringWaiter) wait(d time.Duration) bool {
	var evs [2]unix.EpollEvent
	n, err := unix.EpollWait(w.ep, evs[:], max(int(d/time.Millisecond), 1))
	if err != nil && !errors.Is(err, unix.EINTR) {
		// Not expected with valid descriptors; sleep out the wait rather than spin.
		time.Sleep(d)
	}
	for _, ev := range evs[:max(n, 0)] {
		if ev.Fd == int32(w.stop) {
			return false
		}
	}
	return true
}

// wake ends the current or next wait, for good.
func (w *ringWaiter) wake() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.closed {
		var one [8]byte
		binary.NativeEndian.PutUint64(one[:], 1)
		unix.Write(w.stop, one[:])
	}
}

// close releases the descriptors; the reader calls it when it stops waiting.
func (w *ringWaiter) close() {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.closed = true
	for _, fd := range []int{w.ep, w.stop} {
		if fd >= 0 {
			unix.Close(fd)
		}
	}
	w.ep, w.stop = -1, -1
}
