package daemon

import (
	"testing"

	"github.com/warden-fw/warden/backend"
)

// TestDecidedCounterLabels checks that the cached counters count under the labels WithLabelValues would give,
// one counter per (decision, source), and that a cached one costs no allocation.
func TestDecidedCounterLabels(t *testing.T) {
	m := newMetrics()
	accept := backend.Decision{Verdict: backend.Accept, Permanent: true}
	block := backend.Decision{Verdict: backend.Block}
	m.decidedCounter(accept, "rule").Inc()
	m.decidedCounter(accept, "rule").Inc()
	m.decidedCounter(accept, "default").Inc()
	m.decidedCounter(block, "rule").Inc()
	want := map[[2]string]float64{
		{accept.String(), "rule"}:    2,
		{accept.String(), "default"}: 1,
		{block.String(), "rule"}:     1,
	}
	families, err := m.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[[2]string]float64{}
	for _, f := range families {
		if f.GetName() != "warden_connections_decided_total" {
			continue
		}
		for _, mm := range f.GetMetric() {
			var labels [2]string
			for _, l := range mm.GetLabel() {
				switch l.GetName() {
				case "verdict":
					labels[0] = l.GetValue()
				case "source":
					labels[1] = l.GetValue()
				}
			}
			got[labels] = mm.GetCounter().GetValue()
		}
	}
	if len(got) != len(want) {
		t.Errorf("decided label sets %v, want %v", got, want)
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("decided{verdict=%q, source=%q} = %v, want %v", k[0], k[1], got[k], v)
		}
	}
	if a := testing.AllocsPerRun(100, func() { m.decidedCounter(accept, "rule").Inc() }); a != 0 {
		t.Errorf("counting a decision allocates %v times", a)
	}
}
