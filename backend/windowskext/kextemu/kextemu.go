// Package kextemu emulates the Portmaster kernel driver (kext v2) at its device boundary, so the windowskext
// backend runs and is tested on any OS.
//
// A Driver behaves like the driver's device handle: Read follows the driver's batching (one blocking info,
// then as many more as fit without waiting, the last one split and continued by the next Read), Write takes
// one command per call and, like the driver, always reports the full length as written. The emulator keeps
// what a test needs to assert: every command received (raw bytes and decoded), the packets still waiting for
// a verdict and a connection verdict cache with the driver's lookup rule (protocol, local port, remote address
// and port; the local address is not compared).
package kextemu

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"sync"

	"github.com/warden-fw/warden/backend/windowskext/kextproto"
)

// ErrUnknownID is recorded on a Verdict command for a packet id that is not pending ("Verdict invalid id").
var ErrUnknownID = errors.New("verdict for a packet id that is not pending")

// Command is one command the driver received.
type Command struct {
	kextproto.Command
	// Raw is the written buffer.
	Raw []byte
	// Err is set when the buffer was not exactly one valid command, or a verdict named no pending packet.
	Err error
}

// Options configures a Driver.
type Options struct {
	// MaxRead caps the bytes one Read returns, emulating a reader with a small buffer so records split
	// across reads; 0 means the caller's buffer size.
	MaxRead int
}

type cacheKey struct {
	protocol  uint8
	localPort uint16
	remote    netip.AddrPort
}

type cacheEntry struct {
	verdict kextproto.Verdict
	ended   bool
}

type trafficKey struct {
	protocol      uint8
	local, remote netip.AddrPort
}

// Driver is an emulated kext v2 device.
type Driver struct {
	opts Options

	mu       sync.Mutex
	cond     sync.Cond // signals queue, shutdown and closed changes to Read
	queue    [][]byte  // encoded infos not yet read
	leftover []byte    // the unread part of a partially delivered info
	shutdown bool
	closed   bool

	nextID   uint64
	pending  map[uint64]kextproto.Connection
	verdicts map[uint64]kextproto.Verdict
	cache    map[cacheKey]*cacheEntry
	logs     []kextproto.LogLine
	traffic  map[trafficKey][2]uint64

	cmds    []Command
	changed chan struct{} // closed and replaced on every command
}

// New returns an emulated driver with nothing queued.
func New(opts Options) *Driver {
	d := &Driver{
		opts:     opts,
		pending:  make(map[uint64]kextproto.Connection),
		verdicts: make(map[uint64]kextproto.Verdict),
		cache:    make(map[cacheKey]*cacheEntry),
		traffic:  make(map[trafficKey][2]uint64),
		changed:  make(chan struct{}),
	}
	d.cond.L = &d.mu
	return d
}

// Read delivers queued infos with the driver's batching.
func (d *Driver) Read(p []byte) (int, error) {
	if d.opts.MaxRead > 0 && len(p) > d.opts.MaxRead {
		p = p[:d.opts.MaxRead]
	}
	if len(p) == 0 {
		return 0, nil
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	for len(d.leftover) == 0 && len(d.queue) == 0 && !d.shutdown && !d.closed {
		d.cond.Wait()
	}
	switch {
	case d.closed:
		return 0, os.ErrClosed
	case d.shutdown:
		// The queue was run down: pending and later reads end.
		return 0, io.EOF
	}
	var n int
	if len(d.leftover) > 0 {
		n = copy(p, d.leftover)
		d.leftover = d.leftover[n:]
		if len(d.leftover) > 0 {
			return n, nil
		}
	} else {
		n = d.copyInfoLocked(p)
	}
	// Further infos only while more than a header's worth of room is left, without waiting.
	for len(p)-n > kextproto.HeaderSize && len(d.queue) > 0 && len(d.leftover) == 0 {
		n += d.copyInfoLocked(p[n:])
	}
	return n, nil
}

// copyInfoLocked pops one info into p, keeping what does not fit as the leftover.
func (d *Driver) copyInfoLocked(p []byte) int {
	info := d.queue[0]
	d.queue[0] = nil
	d.queue = d.queue[1:]
	n := copy(p, info)
	if n < len(info) {
		d.leftover = info[n:]
	}
	return n
}

// Write receives one command.
func (d *Driver) Write(p []byte) (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return 0, os.ErrClosed
	}
	c, n, err := kextproto.DecodeCommand(p)
	if err == nil && n != len(p) {
		err = fmt.Errorf("a write of %d bytes for a %d-byte %s command", len(p), n, c.Type)
	}
	cmd := Command{Command: c, Raw: bytes.Clone(p), Err: err}
	if err == nil {
		cmd.Err = d.executeLocked(&c)
	}
	d.cmds = append(d.cmds, cmd)
	close(d.changed)
	d.changed = make(chan struct{})
	// The driver reports every write as fully written and successful.
	return len(p), nil
}

func (d *Driver) executeLocked(c *kextproto.Command) error {
	switch c.Type {
	case kextproto.CmdShutdown:
		d.shutdown = true
		for id, conn := range d.pending {
			d.cache[keyOf(conn.Protocol, conn.Local, conn.Remote)] = &cacheEntry{verdict: kextproto.VerdictPermanentBlock}
			delete(d.pending, id)
		}
		d.queue, d.leftover = nil, nil
		d.cond.Broadcast()
	case kextproto.CmdVerdict:
		conn, ok := d.pending[c.ID]
		if !ok {
			return fmt.Errorf("packet %d: %w", c.ID, ErrUnknownID)
		}
		delete(d.pending, c.ID)
		d.verdicts[c.ID] = c.Verdict
		d.cache[keyOf(conn.Protocol, conn.Local, conn.Remote)] = &cacheEntry{verdict: c.Verdict}
	case kextproto.CmdUpdateV4, kextproto.CmdUpdateV6:
		if e, ok := d.cache[keyOf(c.Protocol, c.Local, c.Remote)]; ok {
			e.verdict = c.Verdict
		}
	case kextproto.CmdClearCache:
		clear(d.cache)
	case kextproto.CmdGetLogs:
		for i := range d.logs {
			d.queueLocked(&kextproto.Record{Type: kextproto.InfoLogLine, Log: d.logs[i]})
		}
		d.logs = nil
		d.cond.Broadcast()
	case kextproto.CmdGetBandwidthStats:
		d.flushTrafficLocked()
	case kextproto.CmdCleanEndedConnections:
		for k, e := range d.cache {
			if e.ended {
				delete(d.cache, k)
			}
		}
	}
	return nil
}

// flushTrafficLocked queues the bandwidth records in the driver's order (TCPv4, TCPv6, UDPv4, UDPv6), none for
// an empty group, and resets the counters: they are deltas.
func (d *Driver) flushTrafficLocked() {
	for _, g := range []struct {
		proto uint8
		typ   kextproto.InfoType
	}{{6, kextproto.InfoBandwidthStatsV4}, {6, kextproto.InfoBandwidthStatsV6}, {17, kextproto.InfoBandwidthStatsV4}, {17, kextproto.InfoBandwidthStatsV6}} {
		rec := kextproto.Record{Type: g.typ, Bandwidth: kextproto.BandwidthStats{Protocol: g.proto}}
		for k, c := range d.traffic {
			if k.protocol == g.proto && k.remote.Addr().Is6() == g.typ.IsV6() {
				rec.Bandwidth.Entries = append(rec.Bandwidth.Entries, kextproto.BandwidthEntry{Local: k.local, Remote: k.remote, Tx: c[0], Rx: c[1]})
			}
		}
		if len(rec.Bandwidth.Entries) > 0 {
			d.queueLocked(&rec)
		}
	}
	clear(d.traffic)
	d.cond.Broadcast()
}

func (d *Driver) queueLocked(r *kextproto.Record) {
	b, err := kextproto.AppendRecord(nil, r)
	if err != nil {
		panic(fmt.Sprintf("kextemu: encoding %s: %v", r.Type, err)) // a bug in the test's input
	}
	d.queue = append(d.queue, b)
}

// Close closes the device: blocked and later reads and writes fail.
func (d *Driver) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.closed = true
	d.cond.Broadcast()
	return nil
}

func keyOf(protocol uint8, local, remote netip.AddrPort) cacheKey {
	return cacheKey{protocol: protocol, localPort: local.Port(), remote: netip.AddrPortFrom(remote.Addr().Unmap(), remote.Port())}
}

// Connect queues a connection info, as the driver does for a packet it holds, and returns its packet id
// (c.ID, or the next free id when c.ID is 0). v6 selects the ConnectionIpv6 record.
func (d *Driver) Connect(c kextproto.Connection, v6 bool) uint64 {
	d.mu.Lock()
	defer d.mu.Unlock()
	if c.ID == 0 {
		d.nextID++
		c.ID = d.nextID
	}
	typ := kextproto.InfoConnectionIpv4
	if v6 {
		typ = kextproto.InfoConnectionIpv6
	}
	d.queueLocked(&kextproto.Record{Type: typ, Conn: c})
	c.Payload = bytes.Clone(c.Payload)
	d.pending[c.ID] = c
	d.cond.Broadcast()
	return c.ID
}

// End queues a connection end event and marks the cached connection as ended.
func (d *Driver) End(e kextproto.ConnectionEnd, v6 bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	typ := kextproto.InfoConnectionEndEventV4
	if v6 {
		typ = kextproto.InfoConnectionEndEventV6
	}
	d.queueLocked(&kextproto.Record{Type: typ, End: e})
	if ce, ok := d.cache[keyOf(e.Protocol, e.Local, e.Remote)]; ok {
		ce.ended = true
	}
	d.cond.Broadcast()
}

// QueueRaw queues bytes as if they were one info, for malformed records.
func (d *Driver) QueueRaw(b []byte) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.queue = append(d.queue, bytes.Clone(b))
	d.cond.Broadcast()
}

// Log adds a line to the driver's log buffer; GetLogs delivers it.
func (d *Driver) Log(severity uint8, text string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.logs = append(d.logs, kextproto.LogLine{Severity: severity, Text: []byte(text)})
}

// AddTraffic counts bytes on a connection; GetBandwidthStats delivers and resets the counts.
func (d *Driver) AddTraffic(protocol uint8, local, remote netip.AddrPort, tx, rx uint64) {
	d.mu.Lock()
	defer d.mu.Unlock()
	k := trafficKey{protocol, local, remote}
	c := d.traffic[k]
	c[0] += tx
	c[1] += rx
	d.traffic[k] = c
}

// Commands returns a copy of every command received so far.
func (d *Driver) Commands() []Command {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]Command(nil), d.cmds...)
}

// WaitFor blocks until a received command satisfies match, and returns the first one that does.
func (d *Driver) WaitFor(ctx context.Context, match func(Command) bool) (Command, error) {
	cmds, err := d.WaitN(ctx, 1, match)
	if err != nil {
		return Command{}, err
	}
	return cmds[0], nil
}

// WaitN blocks until n received commands satisfy match, and returns them. match runs with the driver locked
// and must not call the driver.
func (d *Driver) WaitN(ctx context.Context, n int, match func(Command) bool) ([]Command, error) {
	for {
		d.mu.Lock()
		var found []Command
		for _, c := range d.cmds {
			if match(c) {
				found = append(found, c)
			}
		}
		ch := d.changed
		d.mu.Unlock()
		if len(found) >= n {
			return found[:n], nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return nil, fmt.Errorf("waiting for %d kext commands, got %d: %w", n, len(found), ctx.Err())
		}
	}
}

// WaitVerdict blocks until the packet id got a verdict command, and returns it.
func (d *Driver) WaitVerdict(ctx context.Context, id uint64) (Command, error) {
	return d.WaitFor(ctx, func(c Command) bool { return c.Type == kextproto.CmdVerdict && c.ID == id && c.Err == nil })
}

// Pending returns how many packets are still waiting for a verdict.
func (d *Driver) Pending() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.pending)
}

// CachedVerdict returns the verdict the driver's cache holds for a connection, looked up the driver's way.
func (d *Driver) CachedVerdict(protocol uint8, local, remote netip.AddrPort) (kextproto.Verdict, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	e, ok := d.cache[keyOf(protocol, local, remote)]
	if !ok {
		return 0, false
	}
	return e.verdict, true
}
