package main

import (
	"math"
	"testing"
	"time"
)

func TestParseStat(t *testing.T) {
	// Two readings of /proc/stat as a 2-CPU machine prints them (guest columns last, per-CPU lines ignored).
	before := parseStat("cpu  100 5 50 800 20 0 25 4 7 0\ncpu0 50 2 25 400 10 0 12 2 0 0\n" +
		"intr 1 2 3\nctxt 123456\nbtime 1700000000\nprocesses 99\n")
	after := parseStat("cpu  150 5 80 900 30 0 35 24 9 0\ncpu0 70 2 40 450 15 0 17 12 0 0\n" +
		"intr 1 2 3\nctxt 129456\nbtime 1700000000\nprocesses 120\n")
	if before.total != 1004 || before.idle != 820 || before.steal != 4 || before.switches != 123456 {
		t.Fatalf("before = %+v, want total 1004 (guest not counted twice), idle 820, steal 4, switches 123456", before)
	}
	// 220 jiffies passed: 110 of them idle or waiting, 20 stolen by the hypervisor, 90 busy.
	if got, want := after.busyTimeSince(before), 90*time.Second/userHZ; got != want {
		t.Errorf("busy time %v, want %v", got, want)
	}
	if got, want := after.busySince(before), 90.0/220; math.Abs(got-want) > 1e-9 {
		t.Errorf("busy share %v, want %v", got, want)
	}
	if got, want := after.stolenSince(before), 20.0/220; math.Abs(got-want) > 1e-9 {
		t.Errorf("stolen share %v, want %v", got, want)
	}
	if got := after.switches - before.switches; got != 6000 {
		t.Errorf("context switches %d, want 6000", got)
	}
	if got := parseStat("garbage\n"); got != (cpuTimes{}) {
		t.Errorf("unparsable text gave %+v, want zero", got)
	}
}

// A GODEBUG given to the harness reaches the children after the harness's own setting, so the caller's wins
// where both name the same knob.
func TestChildEnvironKeepsGODEBUG(t *testing.T) {
	t.Setenv("GODEBUG", "gctrace=1")
	env := childEnviron()
	if got, want := env[len(env)-1], "GODEBUG=asyncpreemptoff=1,gctrace=1"; got != want {
		t.Fatalf("last GODEBUG entry %q, want %q", got, want)
	}
	t.Setenv("GODEBUG", "")
	env = childEnviron()
	if got, want := env[len(env)-1], "GODEBUG=asyncpreemptoff=1"; got != want {
		t.Fatalf("without a GODEBUG: %q, want %q", got, want)
	}
}
