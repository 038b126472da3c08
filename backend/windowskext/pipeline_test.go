package windowskext

import (
	"context"
	"encoding/hex"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/warden-fw/warden/backend"
	"github.com/warden-fw/warden/backend/windowskext/kextemu"
	"github.com/warden-fw/warden/backend/windowskext/kextproto"
	"github.com/warden-fw/warden/config"
	"github.com/warden-fw/warden/firewall"
)

type splitRecorder struct {
	mu   sync.Mutex
	seen map[netip.AddrPort]netip.AddrPort
}

func (s *splitRecorder) RecordSplit(_ backend.Protocol, client, original netip.AddrPort, _ string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.seen[client] = original
}

func compile(t *testing.T, yaml string) *firewall.Policy {
	t.Helper()
	cfg, err := config.LoadBytes([]byte(yaml), ".yaml", nil)
	if err != nil {
		t.Fatalf("config: %v", err)
	}
	pol, err := firewall.Compile(cfg)
	if err != nil {
		t.Fatalf("compile: %v", err)
	}
	return pol
}

// TestWithPipeline runs the backend against the real pipeline over the emulated driver: verdict bytes for
// the policy's decisions, own traffic, and a reload that changes a live connection (UpdateV4).
func TestWithPipeline(t *testing.T) {
	split := &splitRecorder{seen: map[netip.AddrPort]netip.AddrPort{}}
	pipe := firewall.New(compile(t, `
default_action: allow
inbound_default: block
rules:
  - {name: no-telnet, action: block, protocol: tcp, ports: [23]}
  - {name: drop-dns, action: drop, protocol: udp, ports: [53]}
  - {name: split-web, action: split, protocol: tcp, ports: [443], via: eth1}
`), firewall.Options{OwnPID: ownPID, Split: split})
	t.Cleanup(pipe.Close)

	emu := kextemu.New(kextemu.Options{MaxRead: 64})
	b := NewWithDevice(backend.Options{OwnPID: ownPID}, func(context.Context) (Device, error) { return emu, nil },
		Config{Clock: newFakeClock(), CleanInterval: -1, BandwidthInterval: -1, LogsInterval: -1})
	if err := b.Start(context.Background(), pipe); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := b.Stop(); err != nil {
			t.Error(err)
		}
		checkNoBackendGoroutines(t)
	})

	local := netip.MustParseAddr("10.0.0.2")
	mk := func(id uint64, pid uint64, dir uint8, proto uint8, lport, rport uint16) kextproto.Connection {
		return kextproto.Connection{ID: id, ProcessID: pid, Direction: dir, Protocol: proto, PayloadLayer: 4,
			Local: netip.AddrPortFrom(local, lport), Remote: netip.AddrPortFrom(netip.MustParseAddr("93.184.216.34"), rport)}
	}
	tests := []struct {
		name string
		conn kextproto.Connection
		want string
	}{
		{"allowed by default", mk(1, 100, 0, 6, 50001, 80), "01 0100000000000000 03"},
		{"telnet blocked", mk(2, 100, 0, 6, 50002, 23), "01 0200000000000000 05"},
		{"dns dropped", mk(3, 100, 0, 17, 50003, 53), "01 0300000000000000 07"},
		{"web split", mk(4, 100, 0, 6, 50004, 443), "01 0400000000000000 0b"},
		{"inbound blocked by default", mk(5, 100, 1, 6, 8080, 50005), "01 0500000000000000 05"},
		{"own traffic accepted final", mk(6, ownPID, 0, 6, 50006, 23), "01 0600000000000000 03"},
	}
	for _, tt := range tests {
		emu.Connect(tt.conn, false)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, tt := range tests {
		c, err := emu.WaitVerdict(ctx, tt.conn.ID)
		if err != nil {
			t.Fatalf("%s: %v", tt.name, err)
		}
		if got := hex.EncodeToString(c.Raw); got != unhex(tt.want) {
			t.Errorf("%s: %s, want %s", tt.name, got, unhex(tt.want))
		}
	}
	split.mu.Lock()
	if got := split.seen[tests[3].conn.Local]; got != tests[3].conn.Remote {
		t.Errorf("split destination recorded as %v", got)
	}
	split.mu.Unlock()

	// Reload: port 80 is now blocked. The live connection's cached verdict is updated in the driver.
	changes := pipe.SetPolicy(compile(t, `
default_action: allow
inbound_default: block
rules:
  - {name: no-web, action: block, protocol: tcp, ports: [80]}
`))
	before := len(emu.Commands())
	if err := b.Reevaluate(changes); err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, c := range emu.Commands()[before:] {
		got = append(got, hex.EncodeToString(c.Raw))
	}
	// The allowed web connection becomes blocked; telnet and DNS become allowed by default.
	want := map[string]bool{
		unhex("02 06 0a000002 51c3 5db8d822 5000 05"): true, // 50001 -> :80 block
		unhex("02 06 0a000002 52c3 5db8d822 1700 03"): true, // 50002 -> :23 accept
		unhex("02 11 0a000002 53c3 5db8d822 3500 03"): true, // 50003 -> :53 accept
	}
	gotSet := map[string]bool{}
	for _, g := range got {
		gotSet[g] = true
	}
	for w := range want {
		if !gotSet[w] {
			t.Errorf("missing update %s; got %v", w, got)
		}
	}
	if v, ok := emu.CachedVerdict(6, tests[0].conn.Local, tests[0].conn.Remote); !ok || v != kextproto.VerdictPermanentBlock {
		t.Errorf("driver cache for the web connection after reload: %v %v", v, ok)
	}
	if diff := cmp.Diff(len(changes), len(got)); diff != "" {
		t.Errorf("one update per change (-changes +updates):\n%s", diff)
	}
}
