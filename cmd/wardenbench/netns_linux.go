package main

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
)

// Topology (every namespace fresh, named wb-<pid>-<random>-{c,s,u}, removed on exit):
//
//	client ns C ── ua: 10.201.0.1-.8/24 ──veth── eth0 of server ns S: 10.201.0.100/24
//	            └─ ub: 10.202.0.2/24    ──veth── eth0 of uplink ns U: 10.202.0.1/24, 192.0.2.10/32 on lo
//
// C routes 192.0.2.0/24 via U. The firewall under test (nothing, the bare consumer or Warden) runs in C;
// S and U carry no rules. The proxy workloads go to 192.0.2.10: directly over ub, or through Warden's split
// rule, which sends them to the local proxy that dials out over ub.
// uplinkAddr is C's address on ub.
var uplinkAddr = netip.MustParseAddr("10.202.0.2")

type topology struct {
	client, server, uplink string
	created                []string
}

func sh(args ...string) error {
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// inNS runs a command inside namespace ns.
func inNS(ns string, args ...string) error {
	return sh(append([]string{"ip", "netns", "exec", ns}, args...)...)
}

// removeStale deletes namespaces an earlier wardenbench left behind when it was killed without a chance to
// clean up (their creator's PID is gone).
func removeStale() {
	out, err := exec.Command("ip", "netns", "list").Output()
	if err != nil {
		return
	}
	for line := range strings.SplitSeq(string(out), "\n") {
		name, _, _ := strings.Cut(strings.TrimSpace(line), " ")
		rest, ok := strings.CutPrefix(name, nsPrefix)
		if !ok {
			continue
		}
		pidStr, _, _ := strings.Cut(rest, "-")
		pid, err := strconv.Atoi(pidStr)
		if err != nil || pid == os.Getpid() {
			continue
		}
		if _, err := os.Stat("/proc/" + pidStr); err == nil {
			continue // its wardenbench is still running
		}
		_ = exec.Command("ip", "netns", "del", name).Run()
	}
}

func newTopology() (t *topology, err error) {
	b := make([]byte, 3)
	if _, err := rand.Read(b); err != nil {
		return nil, err
	}
	base := fmt.Sprintf("%s%d-%s-", nsPrefix, os.Getpid(), hex.EncodeToString(b))
	t = &topology{client: base + "c", server: base + "s", uplink: base + "u"}
	defer func() {
		if err != nil {
			err = errors.Join(err, t.remove())
		}
	}()
	for _, ns := range []string{t.client, t.server, t.uplink} {
		if err := sh("ip", "netns", "add", ns); err != nil {
			return t, err
		}
		t.created = append(t.created, ns)
		if err := sh("ip", "-n", ns, "link", "set", "lo", "up"); err != nil {
			return t, err
		}
		// Shorter conntrack TIME_WAIT, so that entries of earlier runs do not pile up towards the table's
		// limit; it changes nothing about the connections measured.
		_ = inNS(ns, "sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_timeout_time_wait=10")
	}
	// The split destination's server keeps no TIME_WAIT sockets. The direct, proxy and route configurations all
	// reach it from C's one uplink address, the proxy with its own sockets' timestamp clocks and route mode
	// (MASQUERADE) with the client sockets'; a later configuration reusing a port of an earlier one would meet
	// its TIME_WAIT socket and have about 1% of its SYNs dropped by PAWS (TcpExtPAWSTimewait), a cross-run
	// artefact no real client sees. Nothing else in the measurements depends on the server's TIME_WAIT.
	if err := inNS(t.uplink, "sysctl", "-qw", "net.ipv4.tcp_max_tw_buckets=0"); err != nil {
		return t, err
	}
	cmds := [][]string{
		{"ip", "-n", t.client, "link", "add", "ua", "type", "veth", "peer", "name", "eth0", "netns", t.server},
		{"ip", "-n", t.client, "link", "add", "ub", "type", "veth", "peer", "name", "eth0", "netns", t.uplink},
		{"ip", "-n", t.server, "addr", "add", serverAddr.String() + "/24", "dev", "eth0"},
		{"ip", "-n", t.uplink, "addr", "add", "10.202.0.1/24", "dev", "eth0"},
		{"ip", "-n", t.uplink, "addr", "add", serviceAddr.String() + "/32", "dev", "lo"},
		{"ip", "-n", t.client, "addr", "add", uplinkAddr.String() + "/24", "dev", "ub"},
	}
	for _, a := range clientAddrs() {
		cmds = append(cmds, []string{"ip", "-n", t.client, "addr", "add", a.String() + "/24", "dev", "ua"})
	}
	cmds = append(cmds,
		[]string{"ip", "-n", t.client, "link", "set", "ua", "up"},
		[]string{"ip", "-n", t.client, "link", "set", "ub", "up"},
		[]string{"ip", "-n", t.server, "link", "set", "eth0", "up"},
		[]string{"ip", "-n", t.uplink, "link", "set", "eth0", "up"},
		[]string{"ip", "-n", t.client, "route", "add", "192.0.2.0/24", "via", "10.202.0.1", "dev", "ub"},
		[]string{"ip", "-n", t.uplink, "route", "add", "default", "via", uplinkAddr.String(), "dev", "eth0"},
	)
	for _, c := range cmds {
		if err := sh(c...); err != nil {
			return t, err
		}
	}
	return t, nil
}

// resetFirewall removes every rule and table in C and forgets its connections, so that each configuration
// starts from the same empty kernel state.
func (t *topology) resetFirewall() error {
	var errs []error
	if err := inNS(t.client, "nft", "flush", "ruleset"); err != nil {
		errs = append(errs, err)
	}
	for _, ns := range []string{t.client, t.server, t.uplink} {
		// conntrack exits 1 with "0 flow entries" on an empty table, which is not a failure.
		_ = inNS(ns, "conntrack", "-F")
	}
	return errors.Join(errs...)
}

// ruleCount returns how many rules C has (iptables-save lines starting with -A).
func (t *topology) ruleCount() (int, error) {
	out, err := exec.Command("ip", "netns", "exec", t.client, "iptables-save").Output()
	if err != nil {
		return 0, fmt.Errorf("iptables-save in %s: %w", t.client, err)
	}
	n := 0
	for l := range strings.SplitSeq(string(out), "\n") {
		if strings.HasPrefix(l, "-A ") {
			n++
		}
	}
	return n, nil
}

func (t *topology) remove() error {
	var errs []error
	for _, ns := range t.created {
		if err := sh("ip", "netns", "del", ns); err != nil {
			errs = append(errs, err)
		}
	}
	t.created = nil
	return errors.Join(errs...)
}
