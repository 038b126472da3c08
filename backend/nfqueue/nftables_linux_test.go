package nfqueue

import (
	"encoding/binary"
	"strconv"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/mdlayher/netlink"

	"github.com/warden-fw/warden/backend/netnstest"
)

// TestChainJumpsFromNetlink programs chains with iptables in a namespace of its own and checks what one
// nf_tables dump per chain reads back: plain jumps by target, every other rule as "", in order; and that
// jumpsFirst says "all in place" exactly when every jump is first and alone.
func TestChainJumpsFromNetlink(t *testing.T) {
	netnstest.RequireRoot(t, "iptables", "ip6tables")
	if !iptablesIsNFT() {
		t.Skip("iptables is not the nf_tables variant: the watcher lists chains with iptables here")
	}
	ns := "wnq-nft-" + netnstest.Suffix()
	netnstest.NewNS(t, ns)
	ipt := func(v6 bool, args ...string) {
		t.Helper()
		cmd := "iptables"
		if v6 {
			cmd = "ip6tables"
		}
		netnstest.Run(t, append([]string{"ip", "netns", "exec", ns, cmd, "-w", "5"}, args...)...)
	}
	var g *genWatcher
	var dialErr error
	netnstest.InNS(t, ns, func() { g, dialErr = dialGenWatcher() })
	if dialErr != nil {
		t.Fatal(dialErr)
	}
	t.Cleanup(func() { g.Close() })

	// One plain jump and one that skips a connmark, as Warden installs them.
	jumps := []jumpRule{{"filter", "OUTPUT", "WARDEN-FILTER", 0}, {"mangle", "INPUT", "WARDEN-INGEST-INPUT", skipJump}}
	fw := &firewall{fams: []family{{name: "ipv4", jumps: jumps}, {name: "ipv6", jumps: jumps}}}
	for _, v6 := range []bool{false, true} {
		for _, j := range jumps {
			ipt(v6, "-t", j.Table, "-N", j.Target)
			ipt(v6, append([]string{"-t", j.Table, "-I", j.Builtin, "1"}, j.args()...)...)
		}
	}
	ipt(false, "-t", "filter", "-N", "OTHER")
	ipt(false, "-t", "filter", "-A", "OUTPUT", "-p", "udp", "--dport", "4444", "-j", "ACCEPT")
	ipt(false, "-t", "filter", "-A", "OUTPUT", "-j", "OTHER")
	ipt(false, "-t", "filter", "-A", "OUTPUT", "-p", "tcp", "-j", "OTHER")

	got, err := g.chainJumps(nfprotoIPv4, "filter", "OUTPUT")
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]string{"WARDEN-FILTER", "", "OTHER", ""}, got); diff != "" {
		t.Errorf("filter OUTPUT jumps (-want +got):\n%s", diff)
	}
	check := func(what string, want bool) {
		t.Helper()
		ok, err := fw.jumpsFirst(g)
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		if ok != want {
			t.Errorf("%s: jumpsFirst %v, want %v", what, ok, want)
		}
	}
	check("every jump first", true)
	if got, err := g.chainJumps(nfprotoIPv6, "mangle", "INPUT"); err != nil || len(got) != 1 || got[0] != "WARDEN-INGEST-INPUT" {
		t.Errorf("ipv6 mangle INPUT, a jump that skips a connmark: %q, %v; want the jump's target", got, err)
	}

	ipt(true, "-t", "mangle", "-I", "INPUT", "1", "-p", "udp", "-j", "ACCEPT")
	check("another rule above the ipv6 mangle INPUT jump", false)
	ipt(true, "-t", "mangle", "-D", "INPUT", "1")
	check("that rule deleted", true)

	ipt(false, "-t", "filter", "-A", "OUTPUT", "-j", "WARDEN-FILTER")
	check("a second jump to WARDEN-FILTER", false)
	ipt(false, "-t", "filter", "-D", "OUTPUT", "5")
	check("the second jump deleted", true)

	// A jump with another match in first place is not a jump Warden installs.
	ipt(false, "-t", "filter", "-R", "OUTPUT", "1", "-p", "tcp", "-j", "WARDEN-FILTER")
	check("the first rule jumps only for tcp", false)
	ipt(false, "-t", "filter", "-R", "OUTPUT", "1", "-m", "mark", "--mark", "5", "-j", "WARDEN-FILTER")
	check("the first rule jumps only for packet mark 5", false)

	// A dump filtered by name finds nothing rather than failing: no rule, so jumpsFirst says look closer.
	if got, err := g.chainJumps(nfprotoIPv4, "raw", "OUTPUT"); err != nil || len(got) != 0 {
		t.Errorf("a chain of a table that does not exist: %q, %v; want no rules", got, err)
	}
}

// encodeRule builds a rule's attributes as nf_tables reports them: table, chain, and one expression per name,
// "immediate:CODE:CHAIN" giving an immediate verdict and "match:NAME" an xtables match.
func encodeRule(t testing.TB, exprs ...string) []byte {
	t.Helper()
	ae := netlink.NewAttributeEncoder()
	ae.String(nftaRuleTable, "filter")
	ae.String(nftaRuleChain, "OUTPUT")
	ae.Nested(nftaRuleExpressions, func(list *netlink.AttributeEncoder) error {
		for _, e := range exprs {
			name, verdict, _ := strings.Cut(e, ":")
			list.Nested(nftaListElem, func(x *netlink.AttributeEncoder) error {
				x.String(nftaExprName, name)
				x.Nested(nftaExprData, func(d *netlink.AttributeEncoder) error {
					switch {
					case name == "match" && verdict != "":
						d.String(nftaMatchName, verdict)
						return nil
					case name != "immediate":
						d.Uint64(1, 0) // a counter's packets
						return nil
					}
					code, chain, _ := strings.Cut(verdict, ":")
					n, err := strconv.ParseInt(code, 10, 32)
					if err != nil {
						return err
					}
					d.Uint32(1, 0) // NFTA_IMMEDIATE_DREG: the verdict register
					d.Nested(nftaImmediateData, func(v *netlink.AttributeEncoder) error {
						v.Nested(nftaDataVerdict, func(vv *netlink.AttributeEncoder) error {
							vv.ByteOrder = binary.BigEndian
							vv.Uint32(nftaVerdictCode, uint32(int32(n)))
							if chain != "" {
								vv.String(nftaVerdictChain, chain)
							}
							return nil
						})
						return nil
					})
					return nil
				})
				return nil
			})
		}
		return nil
	})
	b, err := ae.Encode()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestPlainJumpDecoding(t *testing.T) {
	for _, c := range []struct {
		exprs []string
		want  string
	}{
		{[]string{"counter", "immediate:-3:WARDEN-FILTER"}, "WARDEN-FILTER"},
		{[]string{"immediate:-3:WARDEN-FILTER"}, "WARDEN-FILTER"},
		{[]string{"match:connmark", "counter", "immediate:-3:WARDEN-FILTER"}, "WARDEN-FILTER"},
		{[]string{"match:connmark", "match:connmark", "immediate:-3:WARDEN-FILTER"}, "WARDEN-FILTER"},
		{[]string{"match:mark", "counter", "immediate:-3:WARDEN-FILTER"}, ""},
		{[]string{"match", "counter", "immediate:-3:WARDEN-FILTER"}, ""},       // a match without a name
		{[]string{"meta", "cmp", "counter", "immediate:-3:WARDEN-FILTER"}, ""}, // a native match first
		{[]string{"counter", "immediate:-4:WARDEN-FILTER"}, ""},                // goto
		{[]string{"counter", "immediate:1:"}, ""},                              // accept
		{[]string{"counter", "immediate:-3:A", "immediate:-3:B"}, ""},
		{[]string{"counter"}, ""},
		{nil, ""},
	} {
		got, err := plainJump(encodeRule(t, c.exprs...))
		if err != nil || got != c.want {
			t.Errorf("%q: %q, %v; want %q", c.exprs, got, err, c.want)
		}
	}
	if _, err := plainJump([]byte{8, 0, 4}); err == nil {
		t.Error("a truncated attribute: no error")
	}
}

// FuzzPlainJump feeds arbitrary rule attributes to the decoder: it must return, never panic.
func FuzzPlainJump(f *testing.F) {
	f.Add([]byte{})
	f.Add(encodeRule(f, "counter", "immediate:-3:WARDEN-FILTER"))
	f.Add(encodeRule(f, "meta", "cmp", "immediate:1:"))
	f.Add(encodeRule(f, "match:connmark", "counter", "immediate:-3:WARDEN-FILTER"))
	f.Fuzz(func(t *testing.T, b []byte) {
		_, _ = plainJump(b)
	})
}
