package daemon

import (
	"bytes"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/warden-fw/warden/backend"
	"github.com/warden-fw/warden/config"
	"github.com/warden-fw/warden/firewall"
)

// A decision is logged at debug level exactly when the logger takes debug records (the level is read once,
// when the logger is installed), and counted either way.
func TestDecisionLoggedAtDebugOnly(t *testing.T) {
	conn := firewall.Conn{Key: backend.ConnKey{Protocol: backend.TCP, Local: netip.MustParseAddrPort("10.0.0.1:40000"),
		Remote: netip.MustParseAddrPort("10.0.0.2:443")}, App: "/usr/bin/curl"}
	for _, c := range []struct {
		level string
		want  bool
	}{{"debug", true}, {"info", false}} {
		var out bytes.Buffer
		d := &Daemon{metrics: newMetrics()}
		d.setLogger(NewLogger(&out, config.Log{Level: c.level}))
		d.onDecision(conn, 30*time.Microsecond)
		if got := strings.Contains(out.String(), "msg=decided") && strings.Contains(out.String(), "app=/usr/bin/curl"); got != c.want {
			t.Errorf("level %s: decision logged %v, want %v:\n%s", c.level, got, c.want, out.String())
		}
		if n := decidedTotal(t, d.metrics); n != 1 {
			t.Errorf("level %s: %v decisions counted, want 1", c.level, n)
		}
	}
}

// decidedTotal sums warden_connections_decided_total over its labels.
func decidedTotal(t *testing.T, m *metrics) float64 {
	t.Helper()
	families, err := m.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var n float64
	for _, f := range families {
		if f.GetName() == "warden_connections_decided_total" {
			for _, x := range f.GetMetric() {
				n += x.GetCounter().GetValue()
			}
		}
	}
	return n
}
