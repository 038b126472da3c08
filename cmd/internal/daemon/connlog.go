package daemon

import (
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/warden-fw/warden/backend"
	"github.com/warden-fw/warden/firewall"
)

// connLogger writes one JSON object per decided connection. Decisions are handed over through a buffered
// channel so the deciding goroutine never waits for the disk; when the buffer is full, entries are dropped
// and counted rather than slowing the firewall down.
type connLogger struct {
	path string
	log  *slog.Logger
	// procs names the process of connections decided without one (no rule needed it); nil: such lines keep
	// pid -1.
	procs   backend.ProcessResolver
	ch      chan connRecord
	dropped atomic.Uint64
	done    chan struct{}

	mu sync.Mutex // guards f
	f  *os.File
}

type connRecord struct {
	Time      time.Time `json:"time"`
	Protocol  string    `json:"protocol"`
	Direction string    `json:"direction"`
	Local     string    `json:"local"`
	Remote    string    `json:"remote"`
	Domain    string    `json:"domain,omitempty"`
	PID       int32     `json:"pid"`
	App       string    `json:"app,omitempty"`
	UID       int32     `json:"uid"`
	Verdict   string    `json:"verdict"`
	Rule      string    `json:"rule"`
	Source    string    `json:"source"`

	key backend.ConnKey
	dir backend.Direction
}

// openConnLog opens the connection log, or returns a disabled logger for an empty path.
func openConnLog(path string, log *slog.Logger, procs backend.ProcessResolver) (*connLogger, error) {
	l := &connLogger{path: path, log: log, procs: procs}
	if path == "" {
		return l, nil
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("opening connection log: %w", err)
	}
	l.f = f
	l.ch = make(chan connRecord, 4096)
	l.done = make(chan struct{})
	go l.writer()
	return l, nil
}

// Log queues one connection for the log.
func (l *connLogger) Log(c *firewall.Conn) {
	if l == nil || l.ch == nil {
		return
	}
	ci := c.Info()
	r := connRecord{Time: time.Unix(0, c.Created), Protocol: ci.Protocol, Direction: ci.Direction, Local: ci.Local,
		Remote: ci.Remote, Domain: ci.Domain, PID: ci.PID, App: ci.App, UID: ci.UID, Verdict: ci.Verdict, Rule: ci.Rule, Source: ci.Source,
		key: c.Key, dir: c.Direction}
	select {
	case l.ch <- r:
	default:
		l.dropped.Add(1)
	}
}

func (l *connLogger) writer() {
	defer close(l.done)
	for r := range l.ch {
		l.nameProcess(&r)
		b, err := json.Marshal(r)
		if err != nil {
			continue
		}
		b = append(b, '\n')
		l.mu.Lock()
		_, err = l.f.Write(b)
		l.mu.Unlock()
		if err != nil {
			l.log.Warn("writing connection log", "err", err)
		}
	}
}

// nameProcess fills in the process of a connection decided without one. It runs on the writer, off the packet
// path. A lookup that may have to wait (reading /proc) is made only while the writer keeps up: once a quarter
// of the queue is waiting, lines are written with what the resolver knows at once, so that enriching them never
// costs a line.
func (l *connLogger) nameProcess(r *connRecord) {
	if r.PID >= 0 || l.procs == nil || !r.key.Protocol.HasPorts() {
		return
	}
	info := backend.Info{Protocol: r.key.Protocol, Direction: r.dir, Local: r.key.Local, Remote: r.key.Remote,
		PID: backend.Unknown, UID: r.UID}
	var p backend.Process
	var ok bool
	if now, immediate := l.procs.(backend.ImmediateProcessResolver); immediate {
		p, ok = now.ResolveProcessNow(&info)
	}
	if !ok && len(l.ch) < cap(l.ch)/4 {
		p, ok = l.procs.ResolveProcess(&info)
	}
	if ok {
		r.PID, r.App = p.PID, p.Path
		if r.UID < 0 {
			r.UID = p.UID
		}
	}
}

// Reopen reopens the file at its path, so that log rotation (move, then SIGHUP) works.
func (l *connLogger) Reopen() error {
	if l == nil || l.f == nil {
		return nil
	}
	f, err := os.OpenFile(l.path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return err
	}
	l.mu.Lock()
	old := l.f
	l.f = f
	l.mu.Unlock()
	return old.Close()
}

// Close flushes and closes the log.
func (l *connLogger) Close() error {
	if l == nil || l.f == nil {
		return nil
	}
	close(l.ch)
	<-l.done
	return l.f.Close()
}
