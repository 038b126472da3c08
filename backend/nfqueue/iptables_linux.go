package nfqueue

import (
	"errors"
	"fmt"
	"log/slog"
	"os/exec"
	"strconv"
	"strings"
	"sync"

	"github.com/coreos/go-iptables/iptables"
)

// iptablesRunner is the part of *iptables.IPTables the installer uses: the seam for tests of the
// installer's logic (the rules themselves are proven against the real kernel).
type iptablesRunner interface {
	NewChain(table, chain string) error
	ClearAndDeleteChain(table, chain string) error
	ChainExists(table, chain string) (bool, error)
	Append(table, chain string, rulespec ...string) error
	Insert(table, chain string, pos int, rulespec ...string) error
	List(table, chain string) ([]string, error)
	DeleteById(table, chain string, id int) error
	// Restore applies iptables-restore input without flushing what it does not name: a chain it declares is
	// emptied (or created) and refilled in one transaction.
	Restore(input string) error
}

// runner is the real iptablesRunner: go-iptables, plus iptables-restore of the same family and variant.
type runner struct {
	*iptables.IPTables
	restore string // "iptables-restore" or "ip6tables-restore"
}

func (r runner) Restore(input string) error {
	cmd := exec.Command(r.restore, "--noflush", "--wait", "5")
	cmd.Stdin = strings.NewReader(input)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("%s: %w: %s", r.restore, err, strings.TrimSpace(string(out)))
	}
	return nil
}

var _ iptablesRunner = runner{}

// family is one address family's rule set and the iptables command that programs it.
type family struct {
	name   string // "ipv4" or "ipv6"
	ipt    iptablesRunner
	chains []chainRules
	jumps  []jumpRule
	// cleanChains and cleanJumps are what cleanup removes: these chains and jumps, and those another
	// configuration installs (a crashed run in route mode leaves its source NAT chain).
	cleanChains []chainRules
	cleanJumps  []jumpRule
	// v6 and params are what chains and jumps were built from.
	v6     bool
	params ruleParams
}

// firewall installs, watches and removes Warden's chains. mu serialises those operations so the watcher
// never repairs a half-removed rule set.
type firewall struct {
	log *slog.Logger

	mu   sync.Mutex
	fams []family
}

func newFirewall(log *slog.Logger, p ruleParams, noIPv6 bool) (*firewall, error) {
	fw := &firewall{log: log}
	protos := []iptables.Protocol{iptables.ProtocolIPv4}
	if !noIPv6 {
		protos = append(protos, iptables.ProtocolIPv6)
	}
	for _, proto := range protos {
		ipt, err := iptables.New(iptables.IPFamily(proto), iptables.Timeout(5))
		if err != nil {
			return nil, fmt.Errorf("finding iptables for %v: %w", proto, err)
		}
		v6 := proto == iptables.ProtocolIPv6
		name, restore := "ipv4", "iptables-restore"
		if v6 {
			name, restore = "ipv6", "ip6tables-restore"
		}
		fw.fams = append(fw.fams, newFamily(name, runner{ipt, restore}, v6, p))
	}
	return fw, nil
}

func newFamily(name string, ipt iptablesRunner, v6 bool, p ruleParams) family {
	f := family{name: name, ipt: ipt, v6: v6, params: p}
	f.chains, f.jumps = buildRules(v6, p)
	f.cleanChains, f.cleanJumps = cleanupRules(v6, p)
	return f
}

// setSplitSNAT installs or removes the source NAT of kernel-routed split connections while the rest of the rule
// set stays in place (a reload that brings the first split rule, or takes the last away). Connections NATed
// already keep their binding: conntrack holds it, not the rule. A family already in the state asked is left
// alone; one that fails halfway is put back as it was.
func (fw *firewall) setSplitSNAT(on bool) error {
	fw.mu.Lock()
	defer fw.mu.Unlock()
	for i := range fw.fams {
		f := &fw.fams[i]
		if f.params.SplitSNAT == on {
			continue
		}
		c, j := splitSNATRules()
		remove := func() error {
			if err := deleteJumps(f.ipt, j); err != nil {
				return fmt.Errorf("%s: %w", f.name, err)
			}
			return f.deleteChain(c)
		}
		if on {
			// The chain is filled before the jump to it exists.
			err := f.createChain(c)
			if err == nil {
				err = f.insertJump(j)
			}
			if err != nil {
				return errors.Join(err, remove())
			}
		} else if err := remove(); err != nil {
			return err
		}
		f.params.SplitSNAT = on
		f.chains, f.jumps = buildRules(f.v6, f.params)
	}
	return nil
}

// isJumpTo reports whether an `iptables -S` line is a rule in builtin that jumps to target, whatever else it
// matches (an older Warden may have written it differently).
func isJumpTo(line, builtin, target string) bool {
	return strings.HasPrefix(line, "-A "+builtin+" ") && strings.HasSuffix(line, " -j "+target)
}

// jumpPositions returns the 1-based rule positions in builtin that jump to target. listing is `iptables -S
// builtin`, whose first line is the policy.
func jumpPositions(listing []string, j jumpRule) []int {
	var pos []int
	n := 0
	for _, line := range listing {
		if !strings.HasPrefix(line, "-A ") {
			continue
		}
		n++
		if isJumpTo(line, j.Builtin, j.Target) {
			pos = append(pos, n)
		}
	}
	return pos
}

// ruleAt returns the rule at 1-based position pos of a listing, or "".
func ruleAt(listing []string, pos int) string {
	n := 0
	for _, line := range listing {
		if strings.HasPrefix(line, "-A ") {
			n++
			if n == pos {
				return line
			}
		}
	}
	return ""
}

// deleteJumps removes every jump from builtin into target, highest position first so positions stay valid.
func deleteJumps(ipt iptablesRunner, j jumpRule) error {
	listing, err := ipt.List(j.Table, j.Builtin)
	if err != nil {
		if isNotExist(err) {
			return nil
		}
		return fmt.Errorf("listing %s %s: %w", j.Table, j.Builtin, err)
	}
	pos := jumpPositions(listing, j)
	var errs []error
	for i := len(pos) - 1; i >= 0; i-- {
		if err := ipt.DeleteById(j.Table, j.Builtin, pos[i]); err != nil {
			errs = append(errs, fmt.Errorf("deleting jump %s %s -> %s: %w", j.Table, j.Builtin, j.Target, err))
		}
	}
	return errors.Join(errs...)
}

func isNotExist(err error) bool {
	var e *iptables.Error
	return errors.As(err, &e) && e.IsNotExist()
}

// cleanupLocked removes our jumps and chains, whoever left them. It keeps going after errors.
func (fw *firewall) cleanupLocked() error {
	var errs []error
	for _, f := range fw.fams {
		// Jumps go first: a chain that is still referenced cannot be deleted. mangle first, so nothing is
		// queued or marked any more while the filter chain still enforces what was marked.
		for i := len(f.cleanJumps) - 1; i >= 0; i-- {
			if err := deleteJumps(f.ipt, f.cleanJumps[i]); err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", f.name, err))
			}
		}
		// In reverse: a chain another of ours jumps to is deleted after that one.
		for i := len(f.cleanChains) - 1; i >= 0; i-- {
			if err := f.deleteChain(f.cleanChains[i]); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// deleteChain deletes one of our chains with its rules, if it exists (or its table does).
func (f *family) deleteChain(c chainRules) error {
	ok, err := f.ipt.ChainExists(c.Table, c.Chain)
	if err != nil {
		if isNotExist(err) {
			return nil
		}
		return fmt.Errorf("%s: checking chain %s %s: %w", f.name, c.Table, c.Chain, err)
	}
	if !ok {
		return nil
	}
	if err := f.ipt.ClearAndDeleteChain(c.Table, c.Chain); err != nil {
		return fmt.Errorf("%s: deleting chain %s %s: %w", f.name, c.Table, c.Chain, err)
	}
	return nil
}

// createChain creates one of our chains and fills it.
func (f *family) createChain(c chainRules) error {
	if err := f.ipt.NewChain(c.Table, c.Chain); err != nil {
		return fmt.Errorf("%s: creating chain %s %s: %w", f.name, c.Table, c.Chain, err)
	}
	for _, r := range c.Rules {
		if err := f.ipt.Append(c.Table, c.Chain, r...); err != nil {
			return fmt.Errorf("%s: appending to %s %s %q: %w", f.name, c.Table, c.Chain, strings.Join(r, " "), err)
		}
	}
	return nil
}

// insertJump puts a jump into one of our chains first in its built-in chain.
func (f *family) insertJump(j jumpRule) error {
	if err := f.ipt.Insert(j.Table, j.Builtin, 1, j.args()...); err != nil {
		return fmt.Errorf("%s: installing jump rule %s %s -> %s: %w", f.name, j.Table, j.Builtin, j.Target, err)
	}
	return nil
}

// install removes leftovers and installs the rule set; on failure it removes what it added.
func (fw *firewall) install() error {
	fw.mu.Lock()
	defer fw.mu.Unlock()
	if err := fw.cleanupLocked(); err != nil {
		return fmt.Errorf("removing leftover rules: %w", err)
	}
	if err := fw.installLocked(); err != nil {
		if cerr := fw.cleanupLocked(); cerr != nil {
			err = errors.Join(err, fmt.Errorf("undoing partial install: %w", cerr))
		}
		return err
	}
	return nil
}

func (fw *firewall) installLocked() error {
	for _, f := range fw.fams {
		// Chains are filled before anything jumps to them, so no packet sees a half-built chain.
		for _, c := range f.chains {
			if err := f.createChain(c); err != nil {
				return err
			}
		}
	}
	for _, f := range fw.fams {
		for _, j := range f.jumps {
			if err := f.insertJump(j); err != nil {
				return err
			}
		}
	}
	return nil
}

// remove deletes everything install added.
func (fw *firewall) remove() error {
	fw.mu.Lock()
	defer fw.mu.Unlock()
	return fw.cleanupLocked()
}

// enforceFirst checks that every jump is the first rule of its built-in chain, exactly once, and restores it
// when another program inserted above it: the new jump goes in at position 1 before the old one is deleted,
// so there is no moment without it. It returns the number of repairs.
func (fw *firewall) enforceFirst() (int, error) {
	fw.mu.Lock()
	defer fw.mu.Unlock()
	repaired := 0
	var errs []error
	for _, f := range fw.fams {
		for _, j := range f.jumps {
			listing, err := f.ipt.List(j.Table, j.Builtin)
			if err != nil {
				errs = append(errs, fmt.Errorf("%s: listing %s %s: %w", f.name, j.Table, j.Builtin, err))
				continue
			}
			pos := jumpPositions(listing, j)
			if len(pos) == 1 && pos[0] == 1 {
				continue
			}
			repaired++
			stale := pos
			if len(pos) == 0 || pos[0] != 1 {
				fw.log.Warn("jump rule lost first place; restoring it", "family", f.name, "table", j.Table,
					"chain", j.Builtin, "target", j.Target, "now_first", ruleAt(listing, 1), "was_at", pos)
				if err := f.ipt.Insert(j.Table, j.Builtin, 1, j.args()...); err != nil {
					errs = append(errs, fmt.Errorf("%s: reinserting jump %s %s: %w", f.name, j.Table, j.Builtin, err))
					continue
				}
				// Everything moved down by one.
				for i := range stale {
					stale[i]++
				}
			} else {
				stale = pos[1:]
				fw.log.Warn("duplicate jump rules; removing extras", "family", f.name, "table", j.Table,
					"chain", j.Builtin, "positions", pos)
			}
			for i := len(stale) - 1; i >= 0; i-- {
				if err := f.ipt.DeleteById(j.Table, j.Builtin, stale[i]); err != nil {
					errs = append(errs, fmt.Errorf("%s: deleting old jump %s %s #%d: %w", f.name, j.Table, j.Builtin, stale[i], err))
				}
			}
		}
	}
	return repaired, errors.Join(errs...)
}

// enforceChains checks that each of our chains holds as many rules as it should, and rewrites those that do
// not, one iptables-restore transaction per table. Another program flushing or deleting chains (`iptables -F`,
// `iptables -X`, a firewall manager's reload) is what happens in practice: a flushed WARDEN-FILTER enforces no
// verdict and empty ingest chains queue nothing, so every connection would pass undecided while the daemon
// looks healthy. Run before enforceFirst: a deleted chain must exist again before a jump to it. It returns the
// number of chains rewritten.
func (fw *firewall) enforceChains() (int, error) {
	fw.mu.Lock()
	defer fw.mu.Unlock()
	repaired := 0
	var errs []error
	for _, f := range fw.fams {
		broken := map[string][]chainRules{}
		var tables []string // in install order
		for _, c := range f.chains {
			// Asked first: iptables-nft 1.8 lists a chain that does not exist as "incompatible", not as missing.
			exists, err := f.ipt.ChainExists(c.Table, c.Chain)
			if err != nil && !isNotExist(err) {
				errs = append(errs, fmt.Errorf("%s: checking chain %s %s: %w", f.name, c.Table, c.Chain, err))
				continue
			}
			have := -1 // the chain is gone
			if exists {
				listing, err := f.ipt.List(c.Table, c.Chain)
				if err != nil {
					errs = append(errs, fmt.Errorf("%s: listing %s %s: %w", f.name, c.Table, c.Chain, err))
					continue
				}
				have = 0
				for _, l := range listing {
					if strings.HasPrefix(l, "-A ") {
						have++
					}
				}
			}
			if have == len(c.Rules) {
				continue
			}
			fw.log.Warn("chain changed by another program; restoring it", "family", f.name, "table", c.Table,
				"chain", c.Chain, "rules", have, "want", len(c.Rules))
			if _, ok := broken[c.Table]; !ok {
				tables = append(tables, c.Table)
			}
			broken[c.Table] = append(broken[c.Table], c)
		}
		for _, t := range tables {
			if err := f.ipt.Restore(restoreInput(t, broken[t])); err != nil {
				errs = append(errs, fmt.Errorf("%s: restoring chains of table %s: %w", f.name, t, err))
				continue
			}
			repaired += len(broken[t])
		}
	}
	return repaired, errors.Join(errs...)
}

// restoreInput renders chains of one table as iptables-restore input that declares (so empties or creates)
// each and appends its rules.
func restoreInput(table string, chains []chainRules) string {
	var b strings.Builder
	b.WriteString("*" + table + "\n")
	for _, c := range chains {
		b.WriteString(":" + c.Chain + " - [0:0]\n")
	}
	for _, c := range chains {
		for _, r := range c.Rules {
			b.WriteString("-A " + c.Chain)
			for _, a := range r {
				if strings.ContainsAny(a, " \t\"") {
					a = strconv.Quote(a)
				}
				b.WriteString(" " + a)
			}
			b.WriteString("\n")
		}
	}
	b.WriteString("COMMIT\n")
	return b.String()
}

// iptablesIsNFT reports whether the iptables command is the nf_tables variant, whose changes the nf_tables
// generation counter reflects.
func iptablesIsNFT() bool {
	out, err := exec.Command("iptables", "-V").Output()
	return err == nil && strings.Contains(string(out), "nf_tables")
}
