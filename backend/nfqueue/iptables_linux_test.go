package nfqueue

import (
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
)

// fakeIPT keeps built-in chains as lists of rule lines and logs every change, to test the installer's
// logic (order of operations, positions) without a kernel.
type fakeIPT struct {
	chains map[string][]string // "table/chain" → "-A CHAIN ..." lines
	log    []string
	// failInsert makes Insert into that "table/chain" fail.
	failInsert string
}

func newFakeIPT() *fakeIPT {
	f := &fakeIPT{chains: map[string][]string{}}
	for _, tc := range []string{"filter/INPUT", "filter/OUTPUT", "mangle/INPUT", "mangle/OUTPUT", "nat/OUTPUT", "nat/POSTROUTING"} {
		f.chains[tc] = nil
	}
	return f
}

func (f *fakeIPT) NewChain(table, chain string) error {
	if _, ok := f.chains[table+"/"+chain]; ok {
		return fmt.Errorf("chain %s exists", chain)
	}
	f.chains[table+"/"+chain] = nil
	return nil
}

func (f *fakeIPT) ClearAndDeleteChain(table, chain string) error {
	delete(f.chains, table+"/"+chain)
	f.log = append(f.log, "delete-chain "+table+" "+chain)
	return nil
}

func (f *fakeIPT) ChainExists(table, chain string) (bool, error) {
	_, ok := f.chains[table+"/"+chain]
	return ok, nil
}

func (f *fakeIPT) Append(table, chain string, rulespec ...string) error {
	f.chains[table+"/"+chain] = append(f.chains[table+"/"+chain], "-A "+chain+" "+strings.Join(rulespec, " "))
	return nil
}

func (f *fakeIPT) Insert(table, chain string, pos int, rulespec ...string) error {
	k := table + "/" + chain
	if k == f.failInsert {
		return fmt.Errorf("insert into %s refused", k)
	}
	f.chains[k] = slices.Insert(f.chains[k], pos-1, "-A "+chain+" "+strings.Join(rulespec, " "))
	f.log = append(f.log, fmt.Sprintf("insert %s %s %d", table, chain, pos))
	return nil
}

func (f *fakeIPT) List(table, chain string) ([]string, error) {
	return append([]string{"-P " + chain + " ACCEPT"}, f.chains[table+"/"+chain]...), nil
}

func (f *fakeIPT) DeleteById(table, chain string, id int) error {
	k := table + "/" + chain
	f.chains[k] = slices.Delete(f.chains[k], id-1, id)
	f.log = append(f.log, fmt.Sprintf("delete %s %s %d", table, chain, id))
	return nil
}

// Restore applies iptables-restore --noflush input: a declared chain is created or emptied, then refilled.
func (f *fakeIPT) Restore(input string) error {
	table := ""
	var declared []string
	for _, l := range strings.Split(strings.TrimSpace(input), "\n") {
		switch {
		case strings.HasPrefix(l, "*"):
			table = l[1:]
		case strings.HasPrefix(l, ":"):
			chain, _, _ := strings.Cut(l[1:], " ")
			f.chains[table+"/"+chain] = nil
			declared = append(declared, chain)
		case strings.HasPrefix(l, "-A "):
			chain, _, _ := strings.Cut(l[3:], " ")
			f.chains[table+"/"+chain] = append(f.chains[table+"/"+chain], l)
		case l == "COMMIT":
		default:
			return fmt.Errorf("restore: unexpected line %q", l)
		}
	}
	f.log = append(f.log, "restore "+table+" "+strings.Join(declared, " "))
	return nil
}

func testFirewall(f *fakeIPT) *firewall {
	fam := newFamily("ipv4", f, false, ruleParams{Out: queueRange{1, 1}, In: queueRange{2, 2}})
	return &firewall{log: slog.New(slog.DiscardHandler), fams: []family{fam}}
}

func TestInstallIsIdempotentAndRemovesLeftovers(t *testing.T) {
	f := newFakeIPT()
	fw := testFirewall(f)
	// A crashed run (of an older Warden, whose jumps matched nothing) left two copies of a jump and a chain.
	f.chains["filter/OUTPUT"] = []string{"-A OUTPUT -j WARDEN-FILTER", "-A OUTPUT -p tcp -j ACCEPT", "-A OUTPUT -j WARDEN-FILTER"}
	f.chains["filter/WARDEN-FILTER"] = []string{"-A WARDEN-FILTER -j DROP"}
	if err := fw.install(); err != nil {
		t.Fatal(err)
	}
	first := snapshot(f)
	if err := fw.install(); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(first, snapshot(f)); diff != "" {
		t.Errorf("second install differs (-first +second):\n%s", diff)
	}
	if diff := cmp.Diff([]string{"-A OUTPUT -m connmark ! --mark 1710 -j WARDEN-FILTER", "-A OUTPUT -p tcp -j ACCEPT"}, f.chains["filter/OUTPUT"]); diff != "" {
		t.Errorf("filter OUTPUT (-want +got):\n%s", diff)
	}
	if err := fw.remove(); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]string{"-A OUTPUT -p tcp -j ACCEPT"}, f.chains["filter/OUTPUT"]); diff != "" {
		t.Errorf("filter OUTPUT after remove (-want +got):\n%s", diff)
	}
	for k := range f.chains {
		if strings.Contains(k, "WARDEN") {
			t.Errorf("chain %s left after remove", k)
		}
	}
}

func snapshot(f *fakeIPT) map[string][]string {
	out := map[string][]string{}
	for k, v := range f.chains {
		out[k] = slices.Clone(v)
	}
	return out
}

// The watcher reinserts the jump at 1 before deleting the displaced copy: never a moment without it.
func TestEnforceFirstInsertsBeforeDeleting(t *testing.T) {
	f := newFakeIPT()
	fw := testFirewall(f)
	if err := fw.install(); err != nil {
		t.Fatal(err)
	}
	if n, err := fw.enforceFirst(); n != 0 || err != nil {
		t.Fatalf("nothing to repair: %d, %v", n, err)
	}
	f.chains["mangle/OUTPUT"] = slices.Insert(f.chains["mangle/OUTPUT"], 0, "-A OUTPUT -j OTHER")
	f.log = nil
	n, err := fw.enforceFirst()
	if n != 1 || err != nil {
		t.Fatalf("repairs %d, %v; want 1", n, err)
	}
	if diff := cmp.Diff([]string{"insert mangle OUTPUT 1", "delete mangle OUTPUT 3"}, f.log); diff != "" {
		t.Errorf("operations (-want +got):\n%s", diff)
	}
	want := []string{"-A OUTPUT -m connmark ! --mark 1710 -j WARDEN-INGEST-OUTPUT", "-A OUTPUT -j OTHER"}
	if diff := cmp.Diff(want, f.chains["mangle/OUTPUT"]); diff != "" {
		t.Errorf("mangle OUTPUT (-want +got):\n%s", diff)
	}
	// A duplicate further down is removed, the first stays.
	f.chains["nat/OUTPUT"] = append(f.chains["nat/OUTPUT"], "-A OUTPUT -j RETURN", "-A OUTPUT -j WARDEN-REDIRECT")
	if n, err := fw.enforceFirst(); n != 1 || err != nil {
		t.Fatalf("repairs %d, %v; want 1", n, err)
	}
	if diff := cmp.Diff([]string{"-A OUTPUT -j WARDEN-REDIRECT", "-A OUTPUT -j RETURN"}, f.chains["nat/OUTPUT"]); diff != "" {
		t.Errorf("nat OUTPUT (-want +got):\n%s", diff)
	}
}

// A chain another program flushed or deleted is rewritten whole, in one restore per table, with the exact
// rules an install writes; chains left alone are not touched.
func TestEnforceChainsRestoresFlushedAndDeletedChains(t *testing.T) {
	f := newFakeIPT()
	fw := testFirewall(f)
	if err := fw.install(); err != nil {
		t.Fatal(err)
	}
	installed := maps.Clone(f.chains)
	if n, err := fw.enforceChains(); n != 0 || err != nil {
		t.Fatalf("intact rule set: %d chains rewritten, %v", n, err)
	}
	f.chains["filter/"+chainFilter] = nil                                           // iptables -F
	delete(f.chains, "mangle/"+chainForeignOutput)                                  // iptables -X (after a flush)
	f.chains["mangle/"+chainIngestInput] = f.chains["mangle/"+chainIngestInput][:2] // rules deleted
	f.log = nil
	n, err := fw.enforceChains()
	if n != 3 || err != nil {
		t.Fatalf("%d chains rewritten, %v; want 3", n, err)
	}
	want := []string{"restore mangle " + chainForeignOutput + " " + chainIngestInput, "restore filter " + chainFilter}
	if diff := cmp.Diff(want, f.log); diff != "" {
		t.Errorf("operations (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff(installed, f.chains); diff != "" {
		t.Errorf("rule set after the repair differs from the installed one (-installed +repaired):\n%s", diff)
	}
}

func TestRestoreInputQuotes(t *testing.T) {
	got := restoreInput("filter", []chainRules{{Table: "filter", Chain: "C", Rules: [][]string{{"-m", "comment", "--comment", "a b", "-j", "RETURN"}}}})
	want := "*filter\n:C - [0:0]\n-A C -m comment --comment \"a b\" -j RETURN\nCOMMIT\n"
	if got != want {
		t.Errorf("restoreInput:\n%s\nwant\n%s", got, want)
	}
}

// Turning the split source NAT on when its jump cannot be inserted leaves the rule set as it was (no chain
// without a jump) and the state off, so that a retry installs it; on and then off again is the starting state.
func TestSetSplitSNATRollsBack(t *testing.T) {
	f := newFakeIPT()
	fw := testFirewall(f)
	if err := fw.install(); err != nil {
		t.Fatal(err)
	}
	before := snapshot(f)
	f.failInsert = "nat/POSTROUTING"
	if err := fw.setSplitSNAT(true); err == nil {
		t.Fatal("setSplitSNAT(true) succeeded with the jump refused")
	}
	if diff := cmp.Diff(before, snapshot(f)); diff != "" {
		t.Errorf("after a failed setSplitSNAT(true) (-before +after):\n%s", diff)
	}
	f.failInsert = ""
	if err := fw.setSplitSNAT(true); err != nil {
		t.Fatalf("retry: %v", err)
	}
	if got := f.chains["nat/POSTROUTING"]; len(got) != 1 || got[0] != "-A POSTROUTING -j "+chainSplitSNAT {
		t.Errorf("POSTROUTING after setSplitSNAT(true): %q", got)
	}
	if _, ok := f.chains["nat/"+chainSplitSNAT]; !ok || !slices.ContainsFunc(fw.fams[0].jumps, func(j jumpRule) bool { return j.Target == chainSplitSNAT }) {
		t.Error("the chain, or the watcher's copy of the jump, is missing")
	}
	if err := fw.setSplitSNAT(false); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(before, snapshot(f), cmpopts.EquateEmpty()); diff != "" {
		t.Errorf("after on and off (-before +after):\n%s", diff)
	}
}
