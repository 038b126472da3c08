package main

import (
	"strings"
	"testing"
	"time"
)

func TestBPFReport(t *testing.T) {
	before := map[string]bpfProgStats{
		"warden_sk_creat": {runs: 100, time: time.Millisecond},
		"warden_sk_relea": {runs: 50, time: time.Millisecond},
	}
	after := map[string]bpfProgStats{
		"warden_sk_creat": {runs: 1100, time: time.Millisecond + 800*time.Microsecond}, // 1000 runs, 800 ns each
		"warden_sk_relea": {runs: 50, time: time.Millisecond},                          // did not run
		"warden_sock_ops": {runs: 9000, time: 1800 * time.Microsecond},                 // loaded meanwhile: 200 ns
	}
	report, perOp := bpfReport(before, after, 1000)
	if want := 2600 * time.Nanosecond; perOp != want {
		t.Errorf("per operation %v, want %v", perOp, want)
	}
	rows := map[string]string{}
	for _, line := range strings.Split(report, "\n") {
		if f := strings.Fields(line); len(f) > 0 {
			rows[f[0]] = strings.Join(f, " ")
		}
	}
	for _, want := range []string{
		"warden_sk_creat 1000 1.00 800 800",
		"warden_sock_ops 9000 9.00 200 1800",
		"total: 2.60 µs per operation (1000 operations)",
	} {
		if rows[strings.Fields(want)[0]] != want {
			t.Errorf("report lacks %q:\n%s", want, report)
		}
	}
	if strings.Contains(report, "warden_sk_relea") {
		t.Errorf("a program that did not run is listed:\n%s", report)
	}
}
