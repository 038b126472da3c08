package backend

import (
	"errors"
	"net/netip"
	"testing"
)

func TestVerdictNames(t *testing.T) {
	seen := map[string]Verdict{}
	for v := Verdict(0); v < numVerdicts; v++ {
		name := v.String()
		if name == "" {
			t.Fatalf("verdict %d has no name", v)
		}
		if prev, dup := seen[name]; dup {
			t.Fatalf("verdicts %d and %d share the name %q", prev, v, name)
		}
		seen[name] = v
	}
	if got := Verdict(200).String(); got != "verdict(200)" {
		t.Errorf("unknown verdict renders as %q", got)
	}
	if Verdict(200).Valid() {
		t.Error("verdict 200 reported valid")
	}
}

func TestDecisionValidate(t *testing.T) {
	tests := []struct {
		d    Decision
		ok   bool
		name string
	}{
		{Decision{Verdict: Accept}, true, "accept"},
		{Decision{Verdict: Block, Permanent: true}, true, "block-permanent"},
		{AcceptFinal, true, "accept-final"},
		{Decision{Verdict: Block, Permanent: true, Final: true}, false, "block-final"},
		{Decision{Verdict: Accept, Final: true}, false, "accept-final"},
		{Decision{Verdict: 99}, false, "verdict(99)"},
		{Decision{Verdict: RerouteToSplitTun, Permanent: true, Route: 3}, true, "reroute-split-permanent"},
		{Decision{Verdict: RerouteToSplitTun, Permanent: true, Route: MaxSplitRoutes + 1}, false, "reroute-split-permanent"},
		{Decision{Verdict: Drop, Route: 1}, false, "drop"},
	}
	for _, tt := range tests {
		err := tt.d.Validate()
		if (err == nil) != tt.ok {
			t.Errorf("%+v: Validate() = %v, want ok=%v", tt.d, err, tt.ok)
		}
		if got := tt.d.String(); got != tt.name {
			t.Errorf("%+v: String() = %q, want %q", tt.d, got, tt.name)
		}
	}
}

func TestFailModeDecision(t *testing.T) {
	if d := FailOpen.Decision(); d.Verdict != Accept || d.Permanent {
		t.Errorf("open fail mode decides %v", d)
	}
	if d := FailClosed.Decision(); d.Verdict != Drop || d.Permanent {
		t.Errorf("closed fail mode decides %v", d)
	}
}

func TestResolveUnknownIsUnsupported(t *testing.T) {
	if _, err := Resolve("no-such-backend"); !errors.Is(err, ErrUnsupported) {
		t.Fatalf("Resolve(unknown) = %v, want ErrUnsupported", err)
	}
	if _, err := New("no-such-backend", Options{}); !errors.Is(err, ErrUnsupported) {
		t.Fatalf("New(unknown) = %v, want ErrUnsupported", err)
	}
}

func TestInfoKeyAndString(t *testing.T) {
	i := Info{
		Protocol: TCP, Direction: Inbound,
		Local:  netip.MustParseAddrPort("10.0.0.1:22"),
		Remote: netip.MustParseAddrPort("10.0.0.2:40000"),
	}
	if got, want := i.String(), "tcp inbound 10.0.0.1:22 <- 10.0.0.2:40000"; got != want {
		t.Errorf("String() = %q, want %q", got, want)
	}
	k := i.Key()
	if k.Protocol != TCP || k.Local != i.Local || k.Remote != i.Remote {
		t.Errorf("Key() = %v", k)
	}
}
