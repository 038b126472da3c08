package nfqueue

import (
	"strings"
	"testing"
)

func TestParseQueueDrops(t *testing.T) {
	// Three queues; the fields are queue, peer, waiting, copy mode, copy range, queue full, delivery failed,
	// last id, 1. A short line and a foreign queue are skipped.
	const text = `1700  4031 0 2 128 3 4 99 1
1701  4032 2 2 128 0 10 120 1
 1800 4033 0 2 128 500 500 7 1
garbage
`
	got, err := ParseQueueDrops(strings.NewReader(text), func(n uint16) bool { return n == 1700 || n == 1701 })
	if err != nil || got != 17 {
		t.Errorf("drops = %d, %v; want 17 (3+4 and 0+10)", got, err)
	}
	all, _ := ParseQueueDrops(strings.NewReader(text), func(uint16) bool { return true })
	if all != 1017 {
		t.Errorf("all queues: %d drops, want 1017", all)
	}
}
