package splitroute

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/warden-fw/warden/backend/netnstest"
)

// The functions act on the calling process's network namespace (netlink and /proc/sys), so the tests re-run
// this test binary inside a fresh namespace (`ip netns exec`) with childEnv naming what to do; the parent
// checks the outcome with `ip` from outside.
const childEnv = "SPLITROUTE_CHILD"

func TestMain(m *testing.M) {
	if cmd := os.Getenv(childEnv); cmd != "" {
		os.Exit(child(cmd))
	}
	os.Exit(m.Run())
}

// child runs one command in the namespace it was started in and reports errors on stderr.
func child(cmd string) int {
	var err error
	verb, arg, _ := strings.Cut(cmd, " ")
	switch verb {
	case "install":
		var idx int
		if idx, err = strconv.Atoi(arg); err == nil {
			err = Install(3, idx, true)
		}
	case "install-open":
		var idx int
		if idx, err = strconv.Atoi(arg); err == nil {
			err = Install(3, idx, false)
		}
	case "intact", "intact-open":
		var ok bool
		if ok, err = Intact(3, verb == "intact"); err == nil {
			fmt.Print(ok)
		}
	case "watch":
		// Report the first change to the routing policy, within 10 s.
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		changed := false
		err = WatchPolicy(ctx, func() {
			changed = true
			cancel()
		})
		if err == nil && !changed {
			err = errors.New("no change seen in 10 s")
		}
		if err == nil {
			fmt.Print("changed")
		}
	case "remove":
		err = Remove(3)
	case "cleanup":
		err = Cleanup()
	case "rpfilter":
		// Loosen, print what the kernel has now, then restore.
		var restore func() error
		if restore, err = LoosenRPFilter(arg); err == nil {
			b, _ := os.ReadFile("/proc/sys/net/ipv4/conf/" + arg + "/rp_filter")
			fmt.Print(strings.TrimSpace(string(b)))
			err = restore()
		}
	default:
		err = fmt.Errorf("unknown command %q", cmd)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

// newNS creates a namespace with link "up0" (10.9.0.2/24, 2001:db8:9::2/64) whose default route goes via
// 10.9.0.1, and returns its name and the link's index.
func newNS(t *testing.T) (string, int) {
	t.Helper()
	netnstest.RequireRoot(t)
	ns := "srt-" + netnstest.Suffix()
	netnstest.Create(t, ns)
	for _, c := range [][]string{
		{"link", "add", "up0", "type", "veth", "peer", "name", "peer0"},
		{"link", "set", "up0", "up"}, {"link", "set", "peer0", "up"},
		{"addr", "add", "10.9.0.2/24", "dev", "up0"},
		{"-6", "addr", "add", "2001:db8:9::2/64", "dev", "up0", "nodad"},
		{"route", "add", "default", "via", "10.9.0.1", "dev", "up0", "metric", "50"},
	} {
		netnstest.Run(t, append([]string{"ip", "-n", ns}, c...)...)
	}
	out := netnstest.Run(t, "ip", "-n", ns, "-o", "link", "show", "up0")
	idx, err := strconv.Atoi(strings.TrimSpace(strings.SplitN(out, ":", 2)[0]))
	if err != nil {
		t.Fatalf("link index from %q: %v", out, err)
	}
	return ns, idx
}

func inNS(t *testing.T, ns, cmd string) string {
	t.Helper()
	c := netnstest.Child(context.Background(), t, ns, childEnv+"="+cmd)
	out, err := c.Output()
	if err != nil {
		stderr := ""
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = string(ee.Stderr)
		}
		t.Fatalf("%s in %s: %v: %s", cmd, ns, err, stderr)
	}
	return string(out)
}

// policy returns what Warden could own in ns: rules of priority 1728-1743 and the routes of table 1730
// (route 3), for IPv4 and IPv6.
func policy(t *testing.T, ns string) string {
	t.Helper()
	var b strings.Builder
	for _, fam := range []string{"-4", "-6"} {
		for _, line := range strings.Split(netnstest.Run(t, "ip", "-n", ns, fam, "rule", "show"), "\n") {
			if strings.HasPrefix(line, "17") {
				b.WriteString(fam + " rule " + strings.Join(strings.Fields(line), " ") + "\n")
			}
		}
		// All tables, filtered: showing table 1730 alone fails while it does not exist.
		for _, line := range strings.Split(netnstest.Run(t, "ip", "-n", ns, fam, "route", "show", "table", "all"), "\n") {
			if !strings.Contains(line, "table 1730") {
				continue
			}
			line = strings.Replace(line, " table 1730", "", 1)
			if line = strings.Join(strings.Fields(line), " "); line != "" {
				b.WriteString(fam + " route " + line + "\n")
			}
		}
	}
	return b.String()
}

// Install puts route 3's rule and table in place for both families (via the link's gateway where the main
// table has one, on-link otherwise, plus the fail-closed unreachable default); it is idempotent; Remove and
// Cleanup take everything away.
func TestInstallRemoveCleanup(t *testing.T) {
	t.Parallel()
	ns, idx := newNS(t)
	if got := policy(t, ns); got != "" {
		t.Fatalf("a fresh namespace already has:\n%s", got)
	}
	inNS(t, ns, fmt.Sprintf("install %d", idx))
	inNS(t, ns, fmt.Sprintf("install %d", idx)) // again: no duplicates
	want := strings.Join([]string{
		"-4 rule 1730: from all fwmark 0x6c2 lookup 1730",
		"-4 route default via 10.9.0.1 dev up0",
		"-4 route unreachable default metric 4294967295",
		"-6 rule 1730: from all fwmark 0x6c2 lookup 1730",
		"-6 route default dev up0 metric 1024 pref medium",
		"-6 route unreachable default dev lo metric 4294967295 pref medium",
	}, "\n") + "\n"
	if got := policy(t, ns); got != want {
		t.Errorf("after Install:\n%s\nwant:\n%s", got, want)
	}
	inNS(t, ns, fmt.Sprintf("install-open %d", idx))
	if got := policy(t, ns); strings.Contains(got, "unreachable") {
		t.Errorf("Install without failClosed keeps an unreachable route:\n%s", got)
	}
	// The split interface changes: the route moves to the new link (on-link: it has no gateway) in place.
	for _, c := range [][]string{{"link", "add", "up1", "type", "veth", "peer", "name", "peer1"},
		{"link", "set", "up1", "up"}, {"addr", "add", "10.8.0.2/24", "dev", "up1"}} {
		netnstest.Run(t, append([]string{"ip", "-n", ns}, c...)...)
	}
	out := netnstest.Run(t, "ip", "-n", ns, "-o", "link", "show", "up1")
	idx1, _ := strconv.Atoi(strings.TrimSpace(strings.SplitN(out, ":", 2)[0]))
	inNS(t, ns, fmt.Sprintf("install %d", idx1))
	if got := policy(t, ns); strings.Contains(got, "up0") || !strings.Contains(got, "-4 route default dev up1 scope link") {
		t.Errorf("after moving to up1:\n%s", got)
	}
	inNS(t, ns, "remove")
	if got := policy(t, ns); got != "" {
		t.Errorf("after Remove:\n%s", got)
	}
	inNS(t, ns, fmt.Sprintf("install %d", idx))
	inNS(t, ns, "cleanup")
	if got := policy(t, ns); got != "" {
		t.Errorf("after Cleanup:\n%s", got)
	}
	inNS(t, ns, "cleanup") // nothing left to remove: no error
}

// WatchPolicy reports a change to the ip rules. The rule is added and deleted again until the watcher, which
// subscribes at some moment after it starts, has seen one (bounded by the child's own 10 s).
func TestWatchPolicy(t *testing.T) {
	t.Parallel()
	ns, _ := newNS(t)
	done := make(chan string, 1)
	go func() {
		out, err := netnstest.Child(context.Background(), t, ns, childEnv+"=watch").Output()
		if err != nil {
			out = append(out, []byte(" "+err.Error())...)
		}
		done <- string(out)
	}()
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	for i := 0; ; i++ {
		select {
		case out := <-done:
			if out != "changed" {
				t.Fatalf("watch: %q, want changed", out)
			}
			return
		case <-tick.C:
			if i > 60 {
				t.Fatal("the watcher neither saw a change nor gave up")
			}
			op := "add"
			if i%2 == 1 {
				op = "del"
			}
			netnstest.Run(t, "ip", "-n", ns, "rule", op, "fwmark", "0x99", "lookup", "99", "priority", "99")
		}
	}
}

// Intact tells whether the parts of a route whose loss would let its packets fall through to the main table
// are there: the ip rules, and with failClosed the unreachable defaults.
func TestIntact(t *testing.T) {
	t.Parallel()
	ns, idx := newNS(t)
	if got := inNS(t, ns, "intact"); got != "false" {
		t.Errorf("before Install: intact = %s", got)
	}
	inNS(t, ns, fmt.Sprintf("install %d", idx))
	if got := inNS(t, ns, "intact"); got != "true" {
		t.Fatalf("after Install: intact = %s\n%s", got, policy(t, ns))
	}
	for _, c := range []struct {
		name   string
		cmd    []string
		intact string // "intact" or "intact-open"
	}{
		{"ipv4 rule deleted", []string{"-4", "rule", "del", "fwmark", "0x6c2", "lookup", "1730"}, "intact-open"},
		{"ipv6 rule deleted", []string{"-6", "rule", "del", "fwmark", "0x6c2", "lookup", "1730"}, "intact-open"},
		{"ipv4 unreachable deleted", []string{"-4", "route", "del", "unreachable", "default", "table", "1730", "metric", "4294967295"}, "intact"},
	} {
		netnstest.Run(t, append([]string{"ip", "-n", ns}, c.cmd...)...)
		if got := inNS(t, ns, c.intact); got != "false" {
			t.Errorf("%s: %s = %s\n%s", c.name, c.intact, got, policy(t, ns))
		}
		inNS(t, ns, fmt.Sprintf("install %d", idx))
		if got := inNS(t, ns, "intact"); got != "true" {
			t.Errorf("%s, installed again: intact = %s", c.name, got)
		}
	}
	// The link's own default route going away (the kernel's doing when the link goes down) is not a loss.
	netnstest.Run(t, "ip", "-n", ns, "-4", "route", "del", "default", "table", "1730", "dev", "up0")
	if got := inNS(t, ns, "intact"); got != "true" {
		t.Errorf("without the link's default route: intact = %s", got)
	}
}

// Strict reverse-path filtering on the link is loosened to 2 and put back; anything else is left alone.
func TestLoosenRPFilter(t *testing.T) {
	t.Parallel()
	ns, _ := newNS(t)
	for _, c := range []struct{ all, own, during string }{
		{"1", "0", "2"}, // effective strict through "all"
		{"0", "1", "2"},
		{"2", "0", "0"}, // already loose: untouched
		{"0", "0", "0"},
	} {
		netnstest.Run(t, "ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.conf.all.rp_filter="+c.all, "net.ipv4.conf.up0.rp_filter="+c.own)
		if got := inNS(t, ns, "rpfilter up0"); got != c.during {
			t.Errorf("all=%s up0=%s: up0 is %s while loosened, want %s", c.all, c.own, got, c.during)
		}
		if got := strings.TrimSpace(netnstest.Run(t, "ip", "netns", "exec", ns, "sysctl", "-n", "net.ipv4.conf.up0.rp_filter")); got != c.own {
			t.Errorf("all=%s up0=%s: up0 is %s after restore", c.all, c.own, got)
		}
	}
	if _, err := LoosenRPFilter("../all"); err == nil {
		t.Error("a path-like interface name was accepted")
	}
}
