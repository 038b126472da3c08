package sandbox

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Topology is a client namespace with two uplinks to two server namespaces (see the package comment).
type Topology struct {
	// Client, A and B are the namespace names.
	Client, A, B string
	created      []string
}

// New creates the namespaces (named prefix-c-SUFFIX, prefix-a-SUFFIX, prefix-b-SUFFIX with a random suffix),
// the links, addresses and routes. On error everything created so far is removed again.
func New(ctx context.Context, prefix string) (_ *Topology, err error) {
	if os.Geteuid() != 0 {
		return nil, errors.New("network namespaces need root")
	}
	b := make([]byte, 3)
	if _, err := rand.Read(b); err != nil {
		return nil, err
	}
	sfx := hex.EncodeToString(b)
	t := &Topology{Client: prefix + "-c-" + sfx, A: prefix + "-a-" + sfx, B: prefix + "-b-" + sfx}
	defer func() {
		if err != nil {
			err = errors.Join(err, t.Close())
		}
	}()
	for _, ns := range []string{t.Client, t.A, t.B} {
		if err := run(ctx, "ip", "netns", "add", ns); err != nil {
			return nil, err
		}
		t.created = append(t.created, ns)
		if err := run(ctx, "ip", "-n", ns, "link", "set", "lo", "up"); err != nil {
			return nil, err
		}
		// No duplicate address detection: addresses are usable at once, and nobody else is on these links.
		// (The global addresses are added with nodad anyway; without sysctl, link-local ones take a second.)
		if _, err := exec.LookPath("sysctl"); err != nil {
			continue
		}
		for _, k := range []string{"all", "default"} {
			if err := run(ctx, "ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf."+k+".accept_dad=0"); err != nil {
				return nil, err
			}
		}
	}
	for _, u := range []struct {
		dev, ns          string
		client4, client6 string
		gw4, gw6         string
	}{
		{UplinkA, t.A, ClientAV4.String(), ClientAV6.String(), GatewayA4.String(), GatewayA6.String()},
		{UplinkB, t.B, ClientBV4.String(), ClientBV6.String(), GatewayB4.String(), GatewayB6.String()},
	} {
		// The veth pair is created inside the client namespace and its peer moved straight into the server's:
		// no interface ever appears in the host's namespace.
		steps := [][]string{
			{"ip", "-n", t.Client, "link", "add", u.dev, "type", "veth", "peer", "name", "eth0", "netns", u.ns},
			{"ip", "-n", t.Client, "addr", "add", u.client4 + "/24", "dev", u.dev},
			{"ip", "-n", t.Client, "addr", "add", u.client6 + "/64", "dev", u.dev, "nodad"},
			{"ip", "-n", t.Client, "link", "set", u.dev, "up"},
			{"ip", "-n", u.ns, "addr", "add", u.gw4 + "/24", "dev", "eth0"},
			{"ip", "-n", u.ns, "addr", "add", u.gw6 + "/64", "dev", "eth0", "nodad"},
			{"ip", "-n", u.ns, "link", "set", "eth0", "up"},
		}
		for _, a := range ServiceAddrs() {
			bits := "/32"
			if a.Is6() {
				bits = "/128"
			}
			steps = append(steps, []string{"ip", "-n", u.ns, "addr", "add", a.String() + bits, "dev", "lo"})
		}
		for _, s := range steps {
			if err := run(ctx, s...); err != nil {
				return nil, err
			}
		}
	}
	if err := t.addRoutes(ctx); err != nil {
		return nil, err
	}
	return t, nil
}

// addRoutes (re)installs the client's default routes: A preferred (metric 100), B second (metric 200). The
// kernel drops a link's routes when it goes down; after it comes back, IPv6 may need a moment before the
// gateway is usable, so each route is retried for a bounded time.
func (t *Topology) addRoutes(ctx context.Context) error {
	for _, r := range []struct{ dev, gw4, gw6, metric string }{
		{UplinkA, GatewayA4.String(), GatewayA6.String(), "100"},
		{UplinkB, GatewayB4.String(), GatewayB6.String(), "200"},
	} {
		for _, args := range [][]string{
			{"ip", "-n", t.Client, "route", "replace", "default", "via", r.gw4, "dev", r.dev, "metric", r.metric},
			{"ip", "-n", t.Client, "-6", "route", "replace", "default", "via", r.gw6, "dev", r.dev, "metric", r.metric},
		} {
			deadline := time.Now().Add(5 * time.Second)
			for {
				err := run(ctx, args...)
				if err == nil {
					break
				}
				if time.Now().After(deadline) || ctx.Err() != nil {
					return err
				}
				time.Sleep(50 * time.Millisecond)
			}
		}
	}
	return nil
}

// SetUplink takes one of the client's uplinks (UplinkA or UplinkB) down or brings it back up, restoring its
// IPv6 address (the kernel flushes it on down) and the default routes.
func (t *Topology) SetUplink(ctx context.Context, dev string, up bool) error {
	if !up {
		return run(ctx, "ip", "-n", t.Client, "link", "set", dev, "down")
	}
	addr6 := ClientAV6.String() + "/64"
	if dev == UplinkB {
		addr6 = ClientBV6.String() + "/64"
	}
	if err := run(ctx, "ip", "-n", t.Client, "link", "set", dev, "up"); err != nil {
		return err
	}
	if err := run(ctx, "ip", "-n", t.Client, "addr", "replace", addr6, "dev", dev, "nodad"); err != nil {
		return err
	}
	return t.addRoutes(ctx)
}

// Command returns a command that runs name with args inside namespace ns. The child gets SIGTERM if the process
// that started it dies, so a crashed demo or test leaves no agent behind and a daemon stops cleanly; it gets its own process group, so a
// Ctrl-C at the terminal reaches only the parent, which then stops its children in order.
func Command(ctx context.Context, ns, name string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", ns, name}, args...)...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM, Setpgid: true}
	return cmd
}

// IPTablesSave returns iptables-save and ip6tables-save of namespace ns, without the comment lines (they carry
// timestamps), so two snapshots compare byte for byte.
func IPTablesSave(ctx context.Context, ns string) (string, error) {
	var b strings.Builder
	for _, tool := range []string{"iptables-save", "ip6tables-save"} {
		args := []string{tool}
		if ns != "" {
			args = append([]string{"ip", "netns", "exec", ns}, args...)
		}
		out, err := exec.CommandContext(ctx, args[0], args[1:]...).Output()
		if err != nil {
			return "", fmt.Errorf("%s: %w", strings.Join(args, " "), err)
		}
		fmt.Fprintf(&b, "### %s\n", tool)
		for _, l := range strings.SplitAfter(string(out), "\n") {
			if !strings.HasPrefix(l, "#") {
				b.WriteString(l)
			}
		}
	}
	return b.String(), nil
}

// PIDs returns the processes living in namespace ns.
func PIDs(ctx context.Context, ns string) ([]int, error) {
	out, err := exec.CommandContext(ctx, "ip", "netns", "pids", ns).Output()
	if err != nil {
		return nil, fmt.Errorf("ip netns pids %s: %w", ns, err)
	}
	var pids []int
	for _, f := range strings.Fields(string(out)) {
		if p, err := strconv.Atoi(f); err == nil {
			pids = append(pids, p)
		}
	}
	return pids, nil
}

// Close kills any process still living in the namespaces (all of them were started inside these fresh
// namespaces, so they are ours) and deletes the namespaces. It reports every failure and keeps going.
func (t *Topology) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var errs []error
	for _, ns := range t.created {
		pids, err := PIDs(ctx, ns)
		if err != nil {
			errs = append(errs, err)
		}
		for _, p := range pids {
			_ = syscall.Kill(p, syscall.SIGKILL)
		}
	}
	for _, ns := range t.created {
		if err := run(ctx, "ip", "netns", "del", ns); err != nil {
			errs = append(errs, err)
		}
	}
	t.created = nil
	return errors.Join(errs...)
}

// Namespaces lists the namespaces the topology created.
func (t *Topology) Namespaces() []string { return append([]string(nil), t.created...) }

func run(ctx context.Context, args ...string) error {
	out, err := exec.CommandContext(ctx, args[0], args[1:]...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}
