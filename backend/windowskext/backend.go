package windowskext

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"sync"
	"sync/atomic"
	"time"

	"github.com/warden-fw/warden/backend"
	"github.com/warden-fw/warden/backend/windowskext/kextproto"
)

// Name is the backend's registry name.
const Name = "windowskext"

// Defaults for Config and Options fields left zero.
const (
	DefaultVerdictTimeout    = 10 * time.Second
	DefaultCleanInterval     = 30 * time.Second
	DefaultBandwidthInterval = time.Second
	DefaultLogsInterval      = time.Second
	DefaultStopGrace         = 5 * time.Second
	DefaultMaxTrackedConns   = 1 << 16
)

// ErrNotRunning is returned by operations that need a started backend.
var ErrNotRunning = errors.New("windowskext backend is not running")

// ErrClosed is returned when a command is sent after Shutdown.
var ErrClosed = errors.New("kext device is shut down")

// Device is the driver's handle as the backend uses it.
type Device interface {
	// Read returns info records the way the driver's ReadFile does: whole records, batched, the last one
	// possibly split and continued by the next Read. It returns an error (io.EOF) once the driver shut down.
	Read(p []byte) (int, error)
	// Write sends exactly one command per call.
	Write(p []byte) (int, error)
	// Close releases the device and whatever its opener set up. It makes a blocked Read return.
	Close() error
}

// Opener opens the device when the backend starts.
type Opener func(ctx context.Context) (Device, error)

// Config tunes the platform-independent core. Zero values take the defaults; a negative interval disables the
// periodic command.
type Config struct {
	// Clock drives the verdict timeouts and periodic commands; nil means the system clock.
	Clock Clock
	// CleanInterval is the period of CleanEndedConnections (the driver forgets ended connections).
	CleanInterval time.Duration
	// BandwidthInterval is the period of GetBandwidthStats.
	BandwidthInterval time.Duration
	// LogsInterval is the period of GetLogs.
	LogsInterval time.Duration
	// ReadBufferSize is the size of one read from the driver; 0 means kextproto.DefaultBufferSize.
	ReadBufferSize int
	// StopGrace bounds how long Stop waits for the driver to end the info stream after Shutdown, and again
	// after closing the device. It is a safety net, not a synchronisation.
	StopGrace time.Duration
	// MaxTrackedConns bounds the connections whose byte counts are kept.
	MaxTrackedConns int
}

func (c *Config) setDefaults() {
	if c.Clock == nil {
		c.Clock = realClock{}
	}
	def := func(d *time.Duration, v time.Duration) {
		if *d == 0 {
			*d = v
		}
	}
	def(&c.CleanInterval, DefaultCleanInterval)
	def(&c.BandwidthInterval, DefaultBandwidthInterval)
	def(&c.LogsInterval, DefaultLogsInterval)
	def(&c.StopGrace, DefaultStopGrace)
	if c.MaxTrackedConns <= 0 {
		c.MaxTrackedConns = DefaultMaxTrackedConns
	}
}

// Backend drives the kernel driver. It implements backend.Backend, backend.Reevaluator, backend.Resetter and
// backend.StatsReporter.
type Backend struct {
	opts backend.Options
	open Opener
	cfg  Config
	log  *slog.Logger

	packets     atomic.Uint64
	parseErrors atomic.Uint64
	timeouts    atomic.Uint64

	bw    bandwidthTable
	onEnd atomic.Pointer[func(backend.ConnKey)]

	mu  sync.Mutex // guards run
	run *run
}

var (
	_ backend.Backend       = (*Backend)(nil)
	_ backend.Reevaluator   = (*Backend)(nil)
	_ backend.Resetter      = (*Backend)(nil)
	_ backend.StatsReporter = (*Backend)(nil)
	_ backend.EndNotifier   = (*Backend)(nil)
	_ backend.ByteCounter   = (*Backend)(nil)
)

// NewWithDevice returns a backend that opens its device with open on Start. The Windows factory uses it with
// the driver handle; tests use it with the emulated driver.
func NewWithDevice(opts backend.Options, open Opener, cfg Config) *Backend {
	cfg.setDefaults()
	if opts.VerdictTimeout <= 0 {
		opts.VerdictTimeout = DefaultVerdictTimeout
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	b := &Backend{opts: opts, open: open, cfg: cfg, log: log.With("backend", Name)}
	b.bw.max = cfg.MaxTrackedConns
	return b
}

// Name returns "windowskext".
func (b *Backend) Name() string { return Name }

// Capabilities reports what the driver supports: PIDs, reroutes and live updates, no UIDs.
func (b *Backend) Capabilities() backend.Capabilities {
	return backend.Capabilities{ProcessID: true, Reroute: true, LiveUpdate: true}
}

// Stats returns the backend's counters.
func (b *Backend) Stats() backend.Stats {
	return backend.Stats{
		VerdictTimeouts: b.timeouts.Load(),
		Packets:         b.packets.Load(),
		ParseErrors:     b.parseErrors.Load(),
	}
}

// ConnBytes returns the bytes a connection sent and received as the driver counted them, summed over the
// bandwidth reports since the connection was first reported. ok is false for a connection the backend has no
// counts for (none reported yet, or ended).
func (b *Backend) ConnBytes(key backend.ConnKey) (tx, rx uint64, ok bool) {
	return b.bw.get(key)
}

// SetConnectionEndHandler makes the backend call f (on its reader goroutine; f must be quick) for every
// connection end event of the driver, e.g. with firewall.Pipeline.ConnectionEnded. nil removes the handler.
func (b *Backend) SetConnectionEndHandler(f func(backend.ConnKey)) {
	if f == nil {
		b.onEnd.Store(nil)
		return
	}
	b.onEnd.Store(&f)
}

// Start opens the device and starts delivering packets to h.
func (b *Backend) Start(ctx context.Context, h backend.Handler) error {
	if h == nil {
		return errors.New("windowskext: nil handler")
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.run != nil {
		return errors.New("windowskext: already started")
	}
	dev, err := b.open(ctx)
	if err != nil {
		return fmt.Errorf("opening the kext device: %w", err)
	}
	b.bw.reset()
	r := &run{
		b:          b,
		dev:        dev,
		h:          h,
		clock:      b.cfg.Clock,
		failV:      mustVerdict(b.opts.FailMode.Decision(), b.opts.FailMode),
		wake:       make(chan struct{}, 1),
		stop:       make(chan struct{}),
		readerDone: make(chan struct{}),
	}
	// Timers and tickers exist before Start returns, so a test's clock cannot tick before they do.
	timer := r.clock.NewTimer(time.Hour)
	timer.Stop()
	var tickers [3]Ticker
	for i, iv := range []time.Duration{b.cfg.CleanInterval, b.cfg.BandwidthInterval, b.cfg.LogsInterval} {
		if iv > 0 {
			tickers[i] = r.clock.NewTicker(iv)
		}
	}
	dec := kextproto.NewDecoder(dev, b.cfg.ReadBufferSize)
	r.wg.Add(2)
	go r.timeouts(timer)
	go r.housekeeping(tickers)
	go r.read(dec)
	b.run = r
	b.log.Info("kext backend started", "fail_mode", b.opts.FailMode, "verdict_timeout", b.opts.VerdictTimeout)
	return nil
}

// Stop answers every pending packet with the fail-mode verdict, shuts the driver down, closes the device and
// waits for the backend's goroutines. It is safe to call more than once.
func (b *Backend) Stop() error {
	b.mu.Lock()
	r := b.run
	b.run = nil
	b.mu.Unlock()
	if r == nil {
		return nil
	}
	return r.shutdown()
}

// Reevaluate updates the driver's cached verdict of each changed live connection (UpdateV4/UpdateV6). The
// driver finds the connection by protocol, local port and remote address and port; it ignores the local
// address.
func (b *Backend) Reevaluate(changes []backend.ConnChange) error {
	r := b.current()
	if r == nil {
		return ErrNotRunning
	}
	var errs []error
	for i := range changes {
		c := &changes[i]
		v, err := KextVerdict(c.New, b.opts.FailMode)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", c.Key, err))
		}
		if err := r.sendUpdate(c.Key, v); err != nil {
			errs = append(errs, fmt.Errorf("updating %s to %s: %w", c.Key, v, err))
		}
	}
	return errors.Join(errs...)
}

// ResetAll makes the driver forget every cached verdict (ClearCache) and re-authorise every connection.
func (b *Backend) ResetAll() error {
	r := b.current()
	if r == nil {
		return ErrNotRunning
	}
	return r.sendSimple(kextproto.CmdClearCache)
}

func (b *Backend) current() *run {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.run
}

func mustVerdict(d backend.Decision, fm backend.FailMode) kextproto.Verdict {
	v, _ := KextVerdict(d, fm)
	return v
}

// run is one Start..Stop cycle.
type run struct {
	b     *Backend
	dev   Device
	h     backend.Handler
	clock Clock
	failV kextproto.Verdict // the fail mode's verdict byte

	writeMu sync.Mutex // guards wbuf, closed and writes to dev
	wbuf    [kextproto.MaxCommandSize]byte
	closed  bool

	pmu      sync.Mutex // guards pending and draining
	pending  pendingHeap
	draining bool

	wake       chan struct{} // the earliest deadline changed
	stop       chan struct{} // closed by shutdown
	wg         sync.WaitGroup
	readerDone chan struct{}

	logLimit rateLimit
}

// write sends one command. Writes are serialised: one WriteFile per command, never interleaved.
func (r *run) writeLocked(cmd []byte) error {
	if r.closed {
		return ErrClosed
	}
	n, err := r.dev.Write(cmd)
	if err == nil && n != len(cmd) {
		err = io.ErrShortWrite
	}
	return err
}

func (r *run) sendVerdict(id uint64, v kextproto.Verdict) error {
	r.writeMu.Lock()
	defer r.writeMu.Unlock()
	cmd, err := kextproto.AppendVerdict(r.wbuf[:0], id, v)
	if err != nil {
		return err
	}
	return r.writeLocked(cmd)
}

func (r *run) sendUpdate(k backend.ConnKey, v kextproto.Verdict) error {
	r.writeMu.Lock()
	defer r.writeMu.Unlock()
	cmd, err := kextproto.AppendUpdate(r.wbuf[:0], uint8(k.Protocol), k.Local, k.Remote, v)
	if err != nil {
		return err
	}
	return r.writeLocked(cmd)
}

func (r *run) sendSimple(t kextproto.CommandType) error {
	r.writeMu.Lock()
	defer r.writeMu.Unlock()
	cmd, err := kextproto.AppendSimple(r.wbuf[:0], t)
	if err != nil {
		return err
	}
	err = r.writeLocked(cmd)
	if t == kextproto.CmdShutdown {
		// The driver accepts nothing useful after Shutdown; refuse further commands here.
		r.closed = true
	}
	return err
}

// read is the reader goroutine: it decodes the info stream until it ends.
func (r *run) read(dec *kextproto.Decoder) {
	defer close(r.readerDone)
	b := r.b
	for {
		rec, err := dec.Next()
		if err != nil {
			var re *kextproto.RecordError
			if errors.As(err, &re) {
				b.parseErrors.Add(1)
				if r.logLimit.allow(r.clock.Now()) {
					b.log.Warn("skipped a malformed kext info record", "err", err, "suppressed", r.logLimit.takeSuppressed())
				}
				continue
			}
			select {
			case <-r.stop:
			default:
				// The stream ended without Stop: the driver went away. Nothing more will arrive, so answer
				// what waits rather than letting it sit until its timeout.
				b.log.Error("kext info stream ended unexpectedly", "err", err)
				r.answerPending()
			}
			return
		}
		switch rec.Type {
		case kextproto.InfoConnectionIpv4, kextproto.InfoConnectionIpv6:
			r.handleConnection(&rec.Conn)
		case kextproto.InfoConnectionEndEventV4, kextproto.InfoConnectionEndEventV6:
			e := &rec.End
			key := backend.ConnKey{Protocol: backend.Protocol(e.Protocol), Local: e.Local, Remote: e.Remote}
			b.bw.remove(key)
			if f := b.onEnd.Load(); f != nil {
				(*f)(key)
			}
		case kextproto.InfoBandwidthStatsV4, kextproto.InfoBandwidthStatsV6:
			b.bw.add(rec.Bandwidth.Protocol, rec.Bandwidth.Entries)
		case kextproto.InfoLogLine:
			r.logDriverLine(rec.Log.Severity, rec.Log.Text)
		}
	}
}

// handleConnection turns a connection info into a packet and hands it to the pipeline.
func (r *run) handleConnection(c *kextproto.Connection) {
	b := r.b
	b.packets.Add(1)
	if c.ID == 0 {
		// Id 0 is never issued; a verdict for it would answer nothing.
		b.parseErrors.Add(1)
		b.log.Warn("kext sent a connection with packet id 0; ignored")
		return
	}
	p := &packet{r: r, id: c.ID, index: -1}
	p.info = backend.Info{
		Protocol:  backend.Protocol(c.Protocol),
		Direction: backend.Outbound,
		Local:     c.Local,
		Remote:    c.Remote,
		PID:       backend.Unknown,
		UID:       backend.Unknown,
	}
	if c.Direction != 0 {
		p.info.Direction = backend.Inbound
	}
	if c.ProcessID != 0 && c.ProcessID <= math.MaxInt32 {
		p.info.PID = int32(c.ProcessID)
	}
	if len(c.Payload) > 0 {
		// The decoder reuses its buffer; the pipeline may look at the payload later.
		p.payload = bytes.Clone(c.Payload)
	}
	p.deadline = r.clock.Now().Add(b.opts.VerdictTimeout)
	if !r.enqueue(p) {
		// Stopping: nobody will decide any more.
		if p.done.CompareAndSwap(false, true) {
			_ = r.sendVerdict(p.id, r.failV)
		}
		return
	}
	r.h.HandlePacket(p)
}

func (r *run) logDriverLine(sev uint8, text []byte) {
	level, ok := driverLevel(sev)
	if !ok {
		return
	}
	ctx := context.Background()
	if r.b.log.Enabled(ctx, level) {
		r.b.log.Log(ctx, level, string(text), "source", "kext", "kext_severity", sev)
	}
}

// LevelTrace and LevelCritical are the slog levels of the driver's Trace and Critical severities.
const (
	LevelTrace    = slog.LevelDebug - 4
	LevelCritical = slog.LevelError + 4
)

// driverLevel maps a driver log severity to a slog level; ok is false for "disabled".
func driverLevel(sev uint8) (level slog.Level, ok bool) {
	switch sev {
	case kextproto.SeverityTrace:
		return LevelTrace, true
	case kextproto.SeverityDebug:
		return slog.LevelDebug, true
	case kextproto.SeverityInfo:
		return slog.LevelInfo, true
	case kextproto.SeverityWarning:
		return slog.LevelWarn, true
	case kextproto.SeverityError:
		return slog.LevelError, true
	case kextproto.SeverityCritical:
		return LevelCritical, true
	case kextproto.SeverityDisabled:
		return 0, false
	}
	return slog.LevelWarn, true
}

// housekeeping sends the periodic commands.
func (r *run) housekeeping(tickers [3]Ticker) {
	defer r.wg.Done()
	var chans [3]<-chan time.Time // a nil channel never fires: disabled ticker
	for i, t := range tickers {
		if t != nil {
			chans[i] = t.C()
			defer t.Stop()
		}
	}
	for {
		var cmd kextproto.CommandType
		select {
		case <-r.stop:
			return
		case <-chans[0]:
			cmd = kextproto.CmdCleanEndedConnections
		case <-chans[1]:
			cmd = kextproto.CmdGetBandwidthStats
		case <-chans[2]:
			cmd = kextproto.CmdGetLogs
		}
		if err := r.sendSimple(cmd); err != nil {
			r.b.log.Debug("periodic kext command failed", "command", cmd, "err", err)
		}
	}
}

// shutdown ends the run; see Backend.Stop.
func (r *run) shutdown() error {
	close(r.stop)
	r.wg.Wait()
	r.answerPending()
	var errs []error
	if err := r.sendSimple(kextproto.CmdShutdown); err != nil {
		errs = append(errs, fmt.Errorf("sending shutdown: %w", err))
	}
	// After Shutdown the driver ends pending and future reads with EOF. Closing the device is the fallback
	// for a driver that does not.
	grace := time.NewTimer(r.b.cfg.StopGrace)
	defer grace.Stop()
	select {
	case <-r.readerDone:
	case <-grace.C:
		r.b.log.Warn("kext did not end the info stream after shutdown; closing the device")
	}
	if err := r.dev.Close(); err != nil {
		errs = append(errs, fmt.Errorf("closing the kext device: %w", err))
	}
	grace.Reset(r.b.cfg.StopGrace)
	select {
	case <-r.readerDone:
	case <-grace.C:
		errs = append(errs, errors.New("the kext reader did not stop after the device was closed"))
	}
	r.b.log.Info("kext backend stopped")
	return errors.Join(errs...)
}

// rateLimit allows one log line per second and counts what it suppressed.
type rateLimit struct {
	last       time.Time
	suppressed int
}

func (l *rateLimit) allow(now time.Time) bool {
	if !l.last.IsZero() && now.Sub(l.last) < time.Second {
		l.suppressed++
		return false
	}
	l.last = now
	return true
}

func (l *rateLimit) takeSuppressed() int {
	n := l.suppressed
	l.suppressed = 0
	return n
}
