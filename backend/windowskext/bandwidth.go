package windowskext

import (
	"sync"

	"github.com/warden-fw/warden/backend"
	"github.com/warden-fw/warden/backend/windowskext/kextproto"
)

// bandwidthTable accumulates the driver's per-connection byte deltas until the connection ends.
type bandwidthTable struct {
	mu      sync.Mutex
	m       map[backend.ConnKey]byteCount
	max     int
	dropped uint64 // entries not tracked because the table was full
}

type byteCount struct{ tx, rx uint64 }

func (t *bandwidthTable) reset() {
	t.mu.Lock()
	t.m = nil
	t.mu.Unlock()
}

// add applies one bandwidth record. The driver's counters are deltas since its previous report.
func (t *bandwidthTable) add(proto uint8, entries []kextproto.BandwidthEntry) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.m == nil {
		t.m = make(map[backend.ConnKey]byteCount)
	}
	for i := range entries {
		e := &entries[i]
		k := backend.ConnKey{Protocol: backend.Protocol(proto), Local: e.Local, Remote: e.Remote}
		c, ok := t.m[k]
		if !ok && len(t.m) >= t.max {
			t.dropped++
			continue
		}
		c.tx += e.Tx
		c.rx += e.Rx
		t.m[k] = c
	}
}

func (t *bandwidthTable) remove(k backend.ConnKey) {
	t.mu.Lock()
	delete(t.m, k)
	t.mu.Unlock()
}

func (t *bandwidthTable) get(k backend.ConnKey) (tx, rx uint64, ok bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	c, ok := t.m[k]
	return c.tx, c.rx, ok
}
