package process

import (
	"fmt"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// maxWatched bounds the pidfds the watcher holds; records beyond it fall back to a kill(pid, 0) check per hit.
const maxWatched = 4096

// procRecord is what the resolver knows about one process: its identity (PID and start time), its name and
// executable. dead is set once the process exits, or the record is replaced, so cached answers that point at
// it are checked without a system call.
type procRecord struct {
	pid   int32
	start uint64
	comm  string
	path  string
	dead  atomic.Bool
	// pidfd is the watcher's handle, -1 when the record is not watched. It is set before the record is
	// published and never changes after, so readers need no lock; the descriptor itself belongs to the
	// watcher, which closes it when the process exits or the record is forgotten.
	pidfd int
}

// exitWatcher learns of process exits through pidfds in an epoll set (a pidfd turns readable when its process
// exits), and marks their records dead. Only processes the resolver has attributed a socket to are watched.
type exitWatcher struct {
	epfd, wakefd int
	done         chan struct{}
	onExit       func(*procRecord) // called on the watcher goroutine after a record is marked dead

	mu      sync.Mutex // guards watched and each record's pidfd
	watched map[int32]*procRecord
	closed  bool
}

func newExitWatcher(onExit func(*procRecord)) (*exitWatcher, error) {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("creating epoll set: %w", err)
	}
	wakefd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		unix.Close(epfd)
		return nil, fmt.Errorf("creating eventfd: %w", err)
	}
	if err := unix.EpollCtl(epfd, unix.EPOLL_CTL_ADD, wakefd, &unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(wakefd)}); err != nil {
		unix.Close(epfd)
		unix.Close(wakefd)
		return nil, fmt.Errorf("watching eventfd: %w", err)
	}
	w := &exitWatcher{epfd: epfd, wakefd: wakefd, done: make(chan struct{}), onExit: onExit, watched: make(map[int32]*procRecord)}
	go w.run()
	return w, nil
}

// openPidfd returns a pidfd for pid, or -1 when the kernel has none (before 5.3) or the process is gone.
func openPidfd(pid int32) int {
	fd, err := unix.PidfdOpen(int(pid), 0)
	if err != nil {
		return -1
	}
	return fd
}

// watch adds rec to the set with pidfd (which it then owns), or closes pidfd and leaves rec unwatched.
func (w *exitWatcher) watch(rec *procRecord, pidfd int) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed || len(w.watched) >= maxWatched {
		unix.Close(pidfd)
		return
	}
	if err := unix.EpollCtl(w.epfd, unix.EPOLL_CTL_ADD, pidfd, &unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(pidfd)}); err != nil {
		unix.Close(pidfd)
		return
	}
	rec.pidfd = pidfd
	w.watched[int32(pidfd)] = rec
}

// forget marks rec dead and stops watching it.
func (w *exitWatcher) forget(rec *procRecord) {
	rec.dead.Store(true)
	w.mu.Lock()
	defer w.mu.Unlock()
	w.unwatchLocked(rec)
}

func (w *exitWatcher) unwatchLocked(rec *procRecord) {
	if rec.pidfd < 0 || w.watched[int32(rec.pidfd)] != rec {
		return
	}
	delete(w.watched, int32(rec.pidfd))
	unix.EpollCtl(w.epfd, unix.EPOLL_CTL_DEL, rec.pidfd, nil)
	unix.Close(rec.pidfd)
}

func (w *exitWatcher) run() {
	defer close(w.done)
	events := make([]unix.EpollEvent, 32)
	var exited []*procRecord
	for {
		n, err := unix.EpollWait(w.epfd, events, -1)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return
		}
		exited = exited[:0]
		w.mu.Lock()
		for _, ev := range events[:n] {
			if int(ev.Fd) == w.wakefd {
				w.mu.Unlock()
				return
			}
			if rec, ok := w.watched[ev.Fd]; ok {
				rec.dead.Store(true)
				w.unwatchLocked(rec)
				exited = append(exited, rec)
			}
		}
		w.mu.Unlock()
		for _, rec := range exited {
			w.onExit(rec)
		}
	}
}

// close stops the watcher goroutine and releases every pidfd.
func (w *exitWatcher) close() {
	w.mu.Lock()
	if w.closed {
		w.mu.Unlock()
		return
	}
	w.closed = true
	w.mu.Unlock()
	var one [8]byte
	one[0] = 1 // eventfd counters are native-endian uint64; any non-zero value wakes the reader
	unix.Write(w.wakefd, one[:])
	<-w.done
	w.mu.Lock()
	for fd, rec := range w.watched {
		rec.dead.Store(true)
		unix.Close(int(fd))
	}
	clear(w.watched)
	w.mu.Unlock()
	unix.Close(w.epfd)
	unix.Close(w.wakefd)
}
