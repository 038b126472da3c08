package nfqueue

import (
	"flag"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/warden-fw/warden/backend"
)

var update = flag.Bool("update", false, "rewrite the golden rule files in testdata")

// The whole rule set, rendered as text, is reviewed in testdata/*.rules; a change shows up as a diff. It is the
// rule set of split_tunnel.mode auto, the default, which on Linux routes split connections in the kernel.
func TestRulesGolden(t *testing.T) {
	s, err := resolve(backend.Options{QueueCount: 2, FailMode: backend.FailClosed, RouteSplit: true}, Config{})
	if err != nil {
		t.Fatal(err)
	}
	for _, v6 := range []bool{false, true} {
		name := "ipv4-closed.rules"
		if v6 {
			name = "ipv6-closed.rules"
		}
		got := renderRules(buildRules(v6, s.ruleParams()))
		path := filepath.Join("testdata", name)
		if *update {
			if err := os.MkdirAll("testdata", 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		want, err := os.ReadFile(path)
		if err != nil {
			t.Fatalf("%v (run with -update to create)", err)
		}
		if diff := cmp.Diff(string(want), got); diff != "" {
			t.Errorf("%s (-golden +got):\n%s", name, diff)
		}
	}
}

func TestFailOpenHasNoMarkZeroDrop(t *testing.T) {
	s, err := resolve(backend.Options{}, Config{})
	if err != nil {
		t.Fatal(err)
	}
	chains, _ := buildRules(false, s.ruleParams())
	for _, c := range chains {
		for _, r := range c.Rules {
			if cmp.Equal(r, []string{"-m", "mark", "--mark", "0", "-j", "DROP"}) {
				t.Errorf("fail open installs %v", r)
			}
		}
	}
}

func TestResolveQueues(t *testing.T) {
	tests := []struct {
		base    uint16
		count   int
		out, in queueRange
		wantErr bool
	}{
		{0, 2, queueRange{1700, 1701}, queueRange{1702, 1703}, false},
		{100, 1, queueRange{100, 100}, queueRange{101, 101}, false},
		{17000, 40, queueRange{}, queueRange{}, true}, // overlaps Portmaster's 17040
		{65530, 4, queueRange{}, queueRange{}, true},
	}
	for _, tt := range tests {
		s, err := resolve(backend.Options{QueueBase: tt.base, QueueCount: tt.count}, Config{})
		if (err != nil) != tt.wantErr {
			t.Errorf("base %d count %d: error %v, want error %v", tt.base, tt.count, err, tt.wantErr)
			continue
		}
		if err == nil && (s.out != tt.out || s.in != tt.in) {
			t.Errorf("base %d count %d: out %v in %v, want %v %v", tt.base, tt.count, s.out, s.in, tt.out, tt.in)
		}
	}
}

// Without kernel-routed split connections no nat chain runs after routing (it would give every new connection a
// null binding), but a cleanup still removes the one a run in route mode left behind.
func TestRulesWithoutRouteSplitHaveNoSourceNAT(t *testing.T) {
	s, err := resolve(backend.Options{QueueCount: 2}, Config{})
	if err != nil {
		t.Fatal(err)
	}
	for _, v6 := range []bool{false, true} {
		chains, jumps := buildRules(v6, s.ruleParams())
		for _, c := range chains {
			if c.Chain == chainSplitSNAT {
				t.Errorf("v6=%v: %s installed without route mode", v6, chainSplitSNAT)
			}
		}
		for _, j := range jumps {
			if j.Builtin == "POSTROUTING" {
				t.Errorf("v6=%v: jump from %s %s installed without route mode", v6, j.Table, j.Builtin)
			}
		}
		full, _ := buildRules(v6, ruleParams{Out: s.out, In: s.in, SplitSNAT: true})
		cleanChains, cleanJumps := cleanupRules(v6, s.ruleParams())
		if len(cleanChains) != len(chains)+1 || len(cleanChains) != len(full) {
			t.Errorf("v6=%v: cleanup removes %d chains, want the %d of route mode", v6, len(cleanChains), len(full))
		}
		if got := cleanChains[len(cleanChains)-1].Chain; got != chainSplitSNAT {
			t.Errorf("v6=%v: cleanup's last chain is %s, want %s", v6, got, chainSplitSNAT)
		}
		if !slices.Contains(cleanJumps, jumpRule{"nat", "POSTROUTING", chainSplitSNAT, 0}) {
			t.Errorf("v6=%v: cleanup does not remove the POSTROUTING jump", v6)
		}
	}
}
