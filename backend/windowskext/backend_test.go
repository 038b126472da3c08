package windowskext

import (
	"context"
	"encoding/hex"
	"errors"
	"log/slog"
	"net/netip"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/warden-fw/warden/backend"
	"github.com/warden-fw/warden/backend/windowskext/internal/testdata"
	"github.com/warden-fw/warden/backend/windowskext/kextemu"
	"github.com/warden-fw/warden/backend/windowskext/kextproto"
)

const ownPID = 4242

// logRecord is one line the backend logged.
type logRecord struct {
	Level slog.Level
	Msg   string
}

// recordingHandler is an slog.Handler that keeps every record and signals each one.
type recordingHandler struct {
	mu      sync.Mutex
	records []logRecord
	changed chan struct{}
}

func newRecordingHandler() *recordingHandler { return &recordingHandler{changed: make(chan struct{})} }

func (h *recordingHandler) Enabled(context.Context, slog.Level) bool { return true }
func (h *recordingHandler) WithAttrs([]slog.Attr) slog.Handler       { return h }
func (h *recordingHandler) WithGroup(string) slog.Handler            { return h }
func (h *recordingHandler) Handle(_ context.Context, r slog.Record) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.records = append(h.records, logRecord{r.Level, r.Message})
	close(h.changed)
	h.changed = make(chan struct{})
	return nil
}

// waitFor blocks until a logged line contains substr.
func (h *recordingHandler) waitFor(t *testing.T, substr string) logRecord {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for {
		h.mu.Lock()
		for _, r := range h.records {
			if strings.Contains(r.Msg, substr) {
				h.mu.Unlock()
				return r
			}
		}
		ch := h.changed
		h.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			t.Fatalf("nothing containing %q was logged", substr)
		}
	}
}

func (h *recordingHandler) has(substr string) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, r := range h.records {
		if strings.Contains(r.Msg, substr) {
			return true
		}
	}
	return false
}

// decisionTable is the test pipeline: it decides by remote port, accepts its own PID as final and leaves
// every other packet unanswered (sent to held).
var decisionTable = map[uint16]backend.Decision{
	80: {Verdict: backend.Accept},
	81: {Verdict: backend.Block},
	82: {Verdict: backend.Drop},
	83: {Verdict: backend.Accept, Permanent: true},
	84: {Verdict: backend.Block, Permanent: true},
	85: {Verdict: backend.Drop, Permanent: true},
	86: {Verdict: backend.RerouteToSplitTun},
	87: {Verdict: backend.RerouteToNameserver},
	88: {Verdict: backend.RerouteToTunnel},
	89: {Verdict: backend.Failed},
	90: {Verdict: 99},
}

type harness struct {
	t     *testing.T
	emu   *kextemu.Driver
	b     *Backend
	clock *fakeClock
	logs  *recordingHandler
	held  chan backend.Packet
	seen  chan backend.Info
}

type setup struct {
	opts    backend.Options
	cfg     Config
	maxRead int
}

func start(t *testing.T, s setup) *harness {
	t.Helper()
	h := &harness{
		t:     t,
		emu:   kextemu.New(kextemu.Options{MaxRead: s.maxRead}),
		clock: newFakeClock(),
		logs:  newRecordingHandler(),
		held:  make(chan backend.Packet, 100),
		seen:  make(chan backend.Info, 100),
	}
	s.opts.Logger = slog.New(h.logs)
	s.opts.OwnPID = ownPID
	if s.opts.VerdictTimeout == 0 {
		s.opts.VerdictTimeout = 5 * time.Second
	}
	s.cfg.Clock = h.clock
	if s.cfg.CleanInterval == 0 {
		// Periodic commands stay out of the way unless a test asks for them.
		s.cfg.CleanInterval, s.cfg.BandwidthInterval, s.cfg.LogsInterval = -1, -1, -1
	}
	h.b = NewWithDevice(s.opts, func(context.Context) (Device, error) { return h.emu, nil }, s.cfg)
	handler := backend.HandlerFunc(func(p backend.Packet) {
		info := p.Info()
		h.seen <- *info
		if info.PID == ownPID {
			if err := p.Apply(backend.AcceptFinal); err != nil {
				t.Errorf("apply accept-final: %v", err)
			}
			return
		}
		d, ok := decisionTable[info.Remote.Port()]
		if !ok {
			h.held <- p
			return
		}
		err := p.Apply(d)
		if (err != nil) != (d.Validate() != nil) {
			t.Errorf("Apply(%v) = %v", d, err)
		}
	})
	if err := h.b.Start(context.Background(), handler); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := h.b.Stop(); err != nil {
			t.Errorf("Stop: %v", err)
		}
		checkNoBackendGoroutines(t)
	})
	return h
}

func (h *harness) ctx() context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	h.t.Cleanup(cancel)
	return ctx
}

// verdictHex waits for the verdict command of packet id and returns its bytes in hex.
func (h *harness) verdictHex(id uint64) string {
	h.t.Helper()
	c, err := h.emu.WaitVerdict(h.ctx(), id)
	if err != nil {
		h.t.Fatalf("packet %#x: %v", id, err)
	}
	return hex.EncodeToString(c.Raw)
}

func (h *harness) waitHeld() backend.Packet {
	h.t.Helper()
	select {
	case p := <-h.held:
		return p
	case <-h.ctx().Done():
		h.t.Fatal("no packet reached the handler")
		return nil
	}
}

// checkNoBackendGoroutines fails if a goroutine of the backend outlived Stop. Stop waits for each goroutine's
// final signal (a deferred close or Done), after which the goroutine still needs a moment to return; there is
// no event for that, so the check retries for a bounded time.
func checkNoBackendGoroutines(t *testing.T) {
	t.Helper()
	var leaked []string
	for deadline := time.Now().Add(2 * time.Second); ; {
		leaked = leaked[:0]
		buf := make([]byte, 1<<20)
		buf = buf[:runtime.Stack(buf, true)]
		for _, g := range strings.Split(string(buf), "\n\n") {
			if strings.Contains(g, "windowskext.(*run)") {
				leaked = append(leaked, g)
			}
		}
		if len(leaked) == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(time.Millisecond)
	}
	for _, g := range leaked {
		t.Errorf("goroutine leaked after Stop:\n%s", g)
	}
}

func unhex(s string) string { return strings.ReplaceAll(s, " ", "") }

func conn4(id uint64, pid uint64, rport uint16) kextproto.Connection {
	return kextproto.Connection{ID: id, ProcessID: pid, Protocol: 6, PayloadLayer: 4,
		Local: netip.MustParseAddrPort("10.0.0.2:50000"), Remote: netip.AddrPortFrom(netip.MustParseAddr("93.184.216.34"), rport)}
}

func conn6(id uint64, pid uint64, rport uint16) kextproto.Connection {
	return kextproto.Connection{ID: id, ProcessID: pid, Protocol: 17, PayloadLayer: 3, Payload: []byte{0x60, 0, 0, 0},
		Local: netip.MustParseAddrPort("[2001:db8::2]:50000"), Remote: netip.AddrPortFrom(netip.MustParseAddr("2001:db8::53"), rport)}
}

// TestVerdictBytes runs the backend against the emulated driver, with reads small enough to split records,
// and checks the exact Verdict command bytes for each kind of decision.
func TestVerdictBytes(t *testing.T) {
	h := start(t, setup{maxRead: 57})
	tests := []struct {
		name string
		conn kextproto.Connection
		v6   bool
		want string
	}{
		{"allow", conn4(0x1122334455667788, 100, 80), false, "01 8877665544332211 02"},
		{"block", conn4(2, 100, 81), false, "01 0200000000000000 04"},
		{"drop", conn6(3, 100, 82), true, "01 0300000000000000 06"},
		{"allow permanent", conn4(4, 100, 83), false, "01 0400000000000000 03"},
		{"block permanent", conn6(5, 100, 84), true, "01 0500000000000000 05"},
		{"drop permanent", conn4(6, 100, 85), false, "01 0600000000000000 07"},
		{"split tunnel", conn4(7, 100, 86), false, "01 0700000000000000 0b"},
		{"nameserver", conn6(8, 100, 87), true, "01 0800000000000000 08"},
		{"tunnel", conn4(9, 100, 88), false, "01 0900000000000000 09"},
		{"failed under fail-open", conn4(10, 100, 89), false, "01 0a00000000000000 02"},
		{"invalid decision gets the fail-mode verdict", conn4(11, 100, 90), false, "01 0b00000000000000 02"},
		{"own PID accept-final", conn4(12, ownPID, 9999), false, "01 0c00000000000000 03"},
	}
	// Queue everything first so the driver batches several infos per read.
	for _, tt := range tests {
		h.emu.Connect(tt.conn, tt.v6)
	}
	for _, tt := range tests {
		if got := h.verdictHex(tt.conn.ID); got != unhex(tt.want) {
			t.Errorf("%s: verdict command %s, want %s", tt.name, got, unhex(tt.want))
		}
	}
	for _, c := range h.emu.Commands() {
		if c.Err != nil {
			t.Errorf("driver rejected command %x: %v", c.Raw, c.Err)
		}
	}
	if got := h.b.Stats(); got.Packets != uint64(len(tests)) || got.ParseErrors != 0 || got.VerdictTimeouts != 0 {
		t.Errorf("stats %+v", got)
	}
}

func TestFailClosedVerdicts(t *testing.T) {
	h := start(t, setup{opts: backend.Options{FailMode: backend.FailClosed}})
	h.emu.Connect(conn4(1, 7, 89), false)
	h.emu.Connect(conn4(2, 7, 90), false)
	if got := h.verdictHex(1); got != unhex("01 0100000000000000 0a") {
		t.Errorf("failed under fail-closed: %s, want kext Failed (10)", got)
	}
	if got := h.verdictHex(2); got != unhex("01 0200000000000000 06") {
		t.Errorf("invalid decision under fail-closed: %s, want drop (6)", got)
	}
}

func TestInfoFromDriver(t *testing.T) {
	h := start(t, setup{})
	c := conn6(1, 0, 5353) // PID 0: unknown
	c.Direction = 7        // anything but 0 is inbound
	h.emu.Connect(c, true)
	p := h.waitHeld()
	want := backend.Info{Protocol: backend.UDP, Direction: backend.Inbound, Local: c.Local, Remote: c.Remote,
		PID: backend.Unknown, UID: backend.Unknown}
	if diff := cmp.Diff(want, *p.Info(), cmp.Comparer(func(a, b netip.AddrPort) bool { return a == b })); diff != "" {
		t.Errorf("info (-want +got):\n%s", diff)
	}
	if got := hex.EncodeToString(p.Payload()); got != "60000000" {
		t.Errorf("payload %s", got)
	}

	v4 := conn4(2, 31337, 5353)
	h.emu.Connect(v4, false)
	p4 := h.waitHeld()
	if i := p4.Info(); i.PID != 31337 || i.Direction != backend.Outbound || !i.Local.Addr().Is4() || i.Remote != v4.Remote {
		t.Errorf("v4 info %+v", i)
	}
	if p4.Payload() != nil {
		t.Errorf("empty payload reported as %x", p4.Payload())
	}
	if err := p.Apply(backend.Decision{Verdict: backend.Accept}); err != nil {
		t.Fatal(err)
	}
	if err := p4.Apply(backend.Decision{Verdict: backend.Accept}); err != nil {
		t.Fatal(err)
	}
}

func TestApplyOnce(t *testing.T) {
	h := start(t, setup{})
	h.emu.Connect(conn4(1, 5, 7777), false)
	p := h.waitHeld()
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for range 8 {
		wg.Go(func() { errs <- p.Apply(backend.Decision{Verdict: backend.Block}) })
	}
	wg.Wait()
	close(errs)
	ok := 0
	for err := range errs {
		switch {
		case err == nil:
			ok++
		case !errors.Is(err, backend.ErrAlreadyApplied):
			t.Errorf("Apply: %v", err)
		}
	}
	if ok != 1 {
		t.Fatalf("%d Apply calls succeeded, want 1", ok)
	}
	n := 0
	for _, c := range h.emu.Commands() {
		if c.Type == kextproto.CmdVerdict {
			n++
		}
	}
	if n != 1 {
		t.Fatalf("%d verdict commands sent, want 1", n)
	}
}

// TestReevaluate checks the UpdateV4/UpdateV6 bytes for live connections whose decision changed.
func TestReevaluate(t *testing.T) {
	h := start(t, setup{})
	c4, c6 := conn4(1, 5, 80), conn6(2, 5, 80)
	h.emu.Connect(c4, false)
	h.emu.Connect(c6, true)
	h.verdictHex(1)
	h.verdictHex(2)

	changes := []backend.ConnChange{
		{Key: backend.ConnKey{Protocol: backend.TCP, Local: c4.Local, Remote: c4.Remote},
			Old: backend.Decision{Verdict: backend.Accept}, New: backend.Decision{Verdict: backend.Block, Permanent: true}},
		{Key: backend.ConnKey{Protocol: backend.UDP, Local: c6.Local, Remote: c6.Remote},
			Old: backend.Decision{Verdict: backend.Accept}, New: backend.Decision{Verdict: backend.RerouteToSplitTun}},
		// A v4 connection keyed with v4-in-v6 addresses still goes out as UpdateV4.
		{Key: backend.ConnKey{Protocol: backend.TCP, Local: netip.MustParseAddrPort("[::ffff:10.0.0.2]:50001"),
			Remote: netip.MustParseAddrPort("[::ffff:1.2.3.4]:443")}, New: backend.Decision{Verdict: backend.Drop}},
	}
	if err := h.b.Reevaluate(changes); err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, c := range h.emu.Commands()[2:] {
		got = append(got, hex.EncodeToString(c.Raw))
	}
	want := []string{
		unhex("02 06 0a000002 50c3 5db8d822 5000 05"),
		unhex("03 11 20010db8000000000000000000000002 50c3 20010db8000000000000000000000053 5000 0b"),
		unhex("02 06 0a000002 51c3 01020304 bb01 06"),
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("update commands (-want +got):\n%s", diff)
	}
	if v, ok := h.emu.CachedVerdict(6, c4.Local, c4.Remote); !ok || v != kextproto.VerdictPermanentBlock {
		t.Errorf("driver cache for the v4 connection: %v %v", v, ok)
	}

	// An invalid decision still updates with a safe value, and says so.
	bad := []backend.ConnChange{{Key: changes[0].Key, New: backend.Decision{Verdict: backend.Block, Final: true}}}
	if err := h.b.Reevaluate(bad); err == nil {
		t.Error("Reevaluate with an invalid decision returned no error")
	}
	cmds := h.emu.Commands()
	if last := hex.EncodeToString(cmds[len(cmds)-1].Raw); last != unhex("02 06 0a000002 50c3 5db8d822 5000 02") {
		t.Errorf("invalid decision sent as %s", last)
	}

	mixed := []backend.ConnChange{{Key: backend.ConnKey{Protocol: backend.TCP, Local: c4.Local, Remote: c6.Remote}}}
	if err := h.b.Reevaluate(mixed); !errors.Is(err, kextproto.ErrAddressFamily) {
		t.Errorf("mixed families: %v", err)
	}
}

func TestResetAll(t *testing.T) {
	h := start(t, setup{})
	if err := h.b.ResetAll(); err != nil {
		t.Fatal(err)
	}
	cmds := h.emu.Commands()
	if len(cmds) != 1 || hex.EncodeToString(cmds[0].Raw) != "04" {
		t.Fatalf("commands %+v, want one ClearCache", cmds)
	}
}

// TestMalformedRecord feeds the golden file's malformed first record and an unknown type: each is logged,
// counted and skipped, and the connection after them still gets its verdict.
func TestMalformedRecord(t *testing.T) {
	h := start(t, setup{maxRead: 33})
	golden := testdata.Read(t, "kext_info_stream.bin")
	h.emu.QueueRaw(golden[:74])
	h.emu.QueueRaw([]byte{9, 2, 0, 0, 0, 0xaa, 0xbb})
	h.emu.Connect(conn4(1, 5, 80), false)
	if got := h.verdictHex(1); got != unhex("01 0100000000000000 02") {
		t.Fatalf("verdict after malformed records: %s", got)
	}
	if got := h.b.Stats().ParseErrors; got != 2 {
		t.Errorf("ParseErrors = %d, want 2", got)
	}
	r := h.logs.waitFor(t, "malformed kext info")
	if r.Level != slog.LevelWarn {
		t.Errorf("malformed record logged at %v", r.Level)
	}
}

// TestVerdictTimeout leaves a packet unanswered: past the timeout it gets the fail-mode verdict, counted once,
// and a late Apply is refused. A packet answered in time is not touched.
func TestVerdictTimeout(t *testing.T) {
	for _, tt := range []struct {
		mode backend.FailMode
		want string
	}{
		{backend.FailOpen, "01 0100000000000000 02"},
		{backend.FailClosed, "01 0100000000000000 06"},
	} {
		t.Run(tt.mode.String(), func(t *testing.T) {
			h := start(t, setup{opts: backend.Options{FailMode: tt.mode, VerdictTimeout: 3 * time.Second}})
			h.emu.Connect(conn4(1, 5, 7777), false)
			p := h.waitHeld()
			h.emu.Connect(conn4(2, 5, 80), false)
			h.verdictHex(2)
			h.clock.Advance(3 * time.Second)
			if got := h.verdictHex(1); got != unhex(tt.want) {
				t.Fatalf("timed-out packet got %s, want %s", got, unhex(tt.want))
			}
			if err := p.Apply(backend.Decision{Verdict: backend.Accept}); !errors.Is(err, backend.ErrAlreadyApplied) {
				t.Errorf("Apply after the timeout: %v", err)
			}
			if got := h.b.Stats().VerdictTimeouts; got != 1 {
				t.Errorf("VerdictTimeouts = %d, want 1", got)
			}
			if n := h.emu.Pending(); n != 0 {
				t.Errorf("%d packets still pending in the driver", n)
			}
		})
	}
}

// TestExpireOrder checks the deadline heap directly: only due packets expire, earliest first, and packets
// answered before their deadline are gone from it.
func TestExpireOrder(t *testing.T) {
	emu := kextemu.New(kextemu.Options{})
	clock := newFakeClock()
	b := NewWithDevice(backend.Options{}, nil, Config{Clock: clock})
	r := &run{b: b, dev: emu, clock: clock, failV: kextproto.VerdictAccept, wake: make(chan struct{}, 1)}
	base := clock.Now()
	offsets := []int{5, 1, 9, 3, 7, 2, 8, 4, 6, 10}
	pkts := map[int]*packet{}
	for _, off := range offsets {
		id := emu.Connect(conn4(uint64(off), 1, 1), false)
		p := &packet{r: r, id: id, index: -1, deadline: base.Add(time.Duration(off) * time.Second)}
		pkts[off] = p
		r.enqueue(p)
	}
	if err := pkts[2].Apply(backend.Decision{Verdict: backend.Block}); err != nil {
		t.Fatal(err)
	}
	r.expire(base.Add(4*time.Second), nil)
	var got []uint64
	for _, c := range emu.Commands() {
		got = append(got, c.ID)
	}
	if diff := cmp.Diff([]uint64{2, 1, 3, 4}, got); diff != "" {
		t.Errorf("answer order (-want +got):\n%s", diff)
	}
	if len(r.pending) != 6 || b.Stats().VerdictTimeouts != 3 {
		t.Errorf("%d still pending, %d timeouts; want 6 and 3", len(r.pending), b.Stats().VerdictTimeouts)
	}
	for i, p := range r.pending {
		if p.index != i {
			t.Fatalf("heap index of %d is %d", i, p.index)
		}
	}
}

// TestPeriodicCommands drives the tickers: bandwidth stats and logs every second, cleaning every 30 s. The
// driver's answers become per-connection byte counts (removed by the end event) and log lines at mapped
// levels.
func TestPeriodicCommands(t *testing.T) {
	h := start(t, setup{cfg: Config{CleanInterval: 30 * time.Second, BandwidthInterval: time.Second, LogsInterval: time.Second}})
	local, remote := netip.MustParseAddrPort("10.0.0.2:50000"), netip.MustParseAddrPort("1.2.3.4:443")
	local6, remote6 := netip.MustParseAddrPort("[2001:db8::2]:5000"), netip.MustParseAddrPort("[2001:db8::53]:53")
	h.emu.AddTraffic(6, local, remote, 100, 2000)
	h.emu.AddTraffic(17, local6, remote6, 7, 8)
	h.emu.Log(kextproto.SeverityWarning, "kext.rs:10 something odd")
	h.emu.Log(kextproto.SeverityCritical, "kext.rs:11 something bad")
	h.emu.Log(kextproto.SeverityTrace, "kext.rs:12 tracing")
	h.emu.Log(kextproto.SeverityDisabled, "kext.rs:13 never shown")

	isCmd := func(t kextproto.CommandType) func(kextemu.Command) bool {
		return func(c kextemu.Command) bool { return c.Type == t }
	}
	h.clock.Advance(time.Second)
	for _, c := range []kextproto.CommandType{kextproto.CmdGetBandwidthStats, kextproto.CmdGetLogs} {
		if _, err := h.emu.WaitFor(h.ctx(), isCmd(c)); err != nil {
			t.Fatalf("%s: %v", c, err)
		}
	}
	// Infos are handled in order: once a later connection is answered, the stats and logs before it are in.
	h.emu.Connect(conn4(1, 5, 80), false)
	h.verdictHex(1)

	key := backend.ConnKey{Protocol: backend.TCP, Local: local, Remote: remote}
	if tx, rx, ok := h.b.ConnBytes(key); !ok || tx != 100 || rx != 2000 {
		t.Errorf("ConnBytes(v4) = %d, %d, %v", tx, rx, ok)
	}
	key6 := backend.ConnKey{Protocol: backend.UDP, Local: local6, Remote: remote6}
	if tx, rx, ok := h.b.ConnBytes(key6); !ok || tx != 7 || rx != 8 {
		t.Errorf("ConnBytes(v6) = %d, %d, %v", tx, rx, ok)
	}
	for _, l := range []struct {
		text  string
		level slog.Level
	}{{"something odd", slog.LevelWarn}, {"something bad", LevelCritical}, {"tracing", LevelTrace}} {
		if r := h.logs.waitFor(t, l.text); r.Level != l.level {
			t.Errorf("%q logged at %v, want %v", l.text, r.Level, l.level)
		}
	}
	if h.logs.has("never shown") {
		t.Error("a line of severity Disabled was logged")
	}

	// The counts are deltas: a second report adds up. The end event removes the connection.
	h.emu.AddTraffic(6, local, remote, 1, 1)
	h.clock.Advance(time.Second)
	if _, err := h.emu.WaitN(h.ctx(), 2, isCmd(kextproto.CmdGetBandwidthStats)); err != nil {
		t.Fatal(err)
	}
	h.emu.Connect(conn4(2, 5, 80), false) // queued after the stats the second command produced
	h.verdictHex(2)
	if tx, rx, ok := h.b.ConnBytes(key); !ok || tx != 101 || rx != 2001 {
		t.Errorf("ConnBytes after a second report = %d, %d, %v; want 101, 2001", tx, rx, ok)
	}
	ended := make(chan backend.ConnKey, 1)
	h.b.SetConnectionEndHandler(func(k backend.ConnKey) { ended <- k })
	h.emu.End(kextproto.ConnectionEnd{Protocol: 6, Local: local, Remote: remote}, false)
	h.emu.Connect(conn4(3, 5, 80), false)
	h.verdictHex(3)
	if _, _, ok := h.b.ConnBytes(key); ok {
		t.Error("byte counts survive the connection's end event")
	}
	select {
	case k := <-ended:
		if k != key {
			t.Errorf("end handler got %v, want %v", k, key)
		}
	default:
		t.Error("the end handler was not called before the next info was handled")
	}

	h.clock.Advance(28 * time.Second)
	if _, err := h.emu.WaitFor(h.ctx(), isCmd(kextproto.CmdCleanEndedConnections)); err != nil {
		t.Fatal(err)
	}
}

// TestStop answers every pending packet with the fail-mode verdict, then sends Shutdown; Stop can be called
// twice and the backend starts again.
func TestStop(t *testing.T) {
	h := start(t, setup{opts: backend.Options{FailMode: backend.FailClosed}})
	h.emu.Connect(conn4(1, 5, 7777), false)
	h.emu.Connect(conn6(2, 5, 7777), true)
	p1, p2 := h.waitHeld(), h.waitHeld()
	if err := h.b.Stop(); err != nil {
		t.Fatal(err)
	}
	checkNoBackendGoroutines(t)
	var got []string
	for _, c := range h.emu.Commands() {
		got = append(got, hex.EncodeToString(c.Raw))
	}
	want := []string{unhex("01 0100000000000000 06"), unhex("01 0200000000000000 06"), "00"}
	if got[0] > got[1] { // the two pending packets may be answered in either order
		got[0], got[1] = got[1], got[0]
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("commands at stop (-want +got):\n%s", diff)
	}
	for _, p := range []backend.Packet{p1, p2} {
		if err := p.Apply(backend.Decision{Verdict: backend.Accept}); !errors.Is(err, backend.ErrAlreadyApplied) {
			t.Errorf("Apply after Stop: %v", err)
		}
	}
	if err := h.b.Stop(); err != nil {
		t.Errorf("second Stop: %v", err)
	}
	if err := h.b.ResetAll(); !errors.Is(err, ErrNotRunning) {
		t.Errorf("ResetAll after Stop: %v", err)
	}

	// Start again on a fresh device.
	emu2 := kextemu.New(kextemu.Options{})
	h.b.open = func(context.Context) (Device, error) { return emu2, nil }
	h.emu = emu2
	if err := h.b.Start(context.Background(), backend.HandlerFunc(func(p backend.Packet) { _ = p.Apply(backend.Decision{Verdict: backend.Accept}) })); err != nil {
		t.Fatal(err)
	}
	emu2.Connect(conn4(1, 5, 80), false)
	if got := h.verdictHex(1); got != unhex("01 0100000000000000 02") {
		t.Errorf("after restart: %s", got)
	}
}

func TestKextVerdictTable(t *testing.T) {
	type row struct {
		d    backend.Decision
		open kextproto.Verdict
		shut kextproto.Verdict
		err  bool
	}
	rows := []row{
		{backend.Decision{Verdict: backend.Undecided}, 0, 0, false},
		{backend.Decision{Verdict: backend.Undeterminable}, 1, 1, false},
		{backend.Decision{Verdict: backend.Accept}, 2, 2, false},
		{backend.Decision{Verdict: backend.Accept, Permanent: true}, 3, 3, false},
		{backend.AcceptFinal, 3, 3, false},
		{backend.Decision{Verdict: backend.Block}, 4, 4, false},
		{backend.Decision{Verdict: backend.Block, Permanent: true}, 5, 5, false},
		{backend.Decision{Verdict: backend.Drop}, 6, 6, false},
		{backend.Decision{Verdict: backend.Drop, Permanent: true}, 7, 7, false},
		{backend.Decision{Verdict: backend.RerouteToNameserver}, 8, 8, false},
		{backend.Decision{Verdict: backend.RerouteToTunnel}, 9, 9, false},
		{backend.Decision{Verdict: backend.Failed}, 2, 10, false},
		{backend.Decision{Verdict: backend.RerouteToSplitTun, Permanent: true}, 11, 11, false},
		{backend.Decision{Verdict: backend.Accept, Final: true}, 2, 6, true},
		{backend.Decision{Verdict: backend.Drop, Permanent: true, Final: true}, 2, 6, true},
		{backend.Decision{Verdict: backend.Verdict(backend.NumVerdicts)}, 2, 6, true},
		{backend.Decision{Verdict: 255}, 2, 6, true},
	}
	for _, r := range rows {
		for _, m := range []struct {
			fm   backend.FailMode
			want kextproto.Verdict
		}{{backend.FailOpen, r.open}, {backend.FailClosed, r.shut}} {
			got, err := KextVerdict(r.d, m.fm)
			if got != m.want || (err != nil) != r.err {
				t.Errorf("KextVerdict(%v, %v) = %v, %v; want %v, error %t", r.d, m.fm, got, err, m.want, r.err)
			}
			if !got.Valid() {
				t.Errorf("KextVerdict(%v, %v) produced an unknown value %d", r.d, m.fm, got)
			}
		}
	}
	// Every verdict and flag combination maps to a value the driver knows.
	for v := range 256 {
		for _, perm := range []bool{false, true} {
			for _, fin := range []bool{false, true} {
				for _, fm := range []backend.FailMode{backend.FailOpen, backend.FailClosed} {
					if got, _ := KextVerdict(backend.Decision{Verdict: backend.Verdict(v), Permanent: perm, Final: fin}, fm); !got.Valid() {
						t.Fatalf("verdict %d perm %t final %t: unknown kext value %d", v, perm, fin, got)
					}
				}
			}
		}
	}
}

func TestCapabilitiesAndName(t *testing.T) {
	b := NewWithDevice(backend.Options{}, nil, Config{})
	if b.Name() != "windowskext" {
		t.Errorf("Name = %q", b.Name())
	}
	if diff := cmp.Diff(backend.Capabilities{ProcessID: true, Reroute: true, LiveUpdate: true}, b.Capabilities()); diff != "" {
		t.Errorf("capabilities (-want +got):\n%s", diff)
	}
	if err := b.Reevaluate(nil); !errors.Is(err, ErrNotRunning) {
		t.Errorf("Reevaluate before Start: %v", err)
	}
	openErr := errors.New("no driver")
	b = NewWithDevice(backend.Options{}, func(context.Context) (Device, error) { return nil, openErr }, Config{})
	if err := b.Start(context.Background(), backend.HandlerFunc(func(backend.Packet) {})); !errors.Is(err, openErr) {
		t.Errorf("Start with a failing opener: %v", err)
	}
}

// discardDevice accepts every command; its Read never returns data.
type discardDevice struct{}

func (discardDevice) Read([]byte) (int, error)    { select {} }
func (discardDevice) Write(p []byte) (int, error) { return len(p), nil }
func (discardDevice) Close() error                { return nil }

func TestApplyNoAllocs(t *testing.T) {
	b := NewWithDevice(backend.Options{}, nil, Config{})
	r := &run{b: b, dev: discardDevice{}, clock: realClock{}, wake: make(chan struct{}, 1)}
	allocs := testing.AllocsPerRun(1000, func() {
		p := packet{r: r, id: 1, index: -1}
		if err := p.Apply(backend.Decision{Verdict: backend.Accept, Permanent: true}); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Fatalf("Apply allocates %.1f times", allocs)
	}
}

func BenchmarkApply(b *testing.B) {
	bk := NewWithDevice(backend.Options{}, nil, Config{})
	r := &run{b: bk, dev: discardDevice{}, clock: realClock{}, wake: make(chan struct{}, 1)}
	b.ReportAllocs()
	for b.Loop() {
		p := packet{r: r, id: 1, index: -1}
		_ = p.Apply(backend.Decision{Verdict: backend.Block})
	}
}
