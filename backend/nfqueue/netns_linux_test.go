package nfqueue

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/warden-fw/warden/backend/netnstest"
)

func TestMain(m *testing.M) {
	if cfg := os.Getenv(childEnv); cfg != "" {
		os.Exit(childMain(cfg))
	}
	os.Exit(m.Run())
}

// testNet is a client namespace (where Warden runs) and a server namespace joined by a veth pair. Every
// address lives only inside these namespaces.
type testNet struct {
	client, server string
	// Server addresses: ServerV4/ServerV6 and a second pair (Server2V4/Server2V6) on the same link.
	ClientV4, ServerV4, Server2V4 netip.Addr
	ClientV6, ServerV6, Server2V6 netip.Addr
}

// newTestNet creates the namespaces and removes them when the test ends, whatever happens.
func newTestNet(t *testing.T) *testNet {
	t.Helper()
	netnstest.RequireRoot(t)
	sfx := netnstest.Suffix()
	n := &testNet{
		client: "wnq-c-" + sfx, server: "wnq-s-" + sfx,
		ClientV4: netip.MustParseAddr("10.201.0.1"), ServerV4: netip.MustParseAddr("10.201.0.2"),
		Server2V4: netip.MustParseAddr("10.201.0.3"),
		ClientV6:  netip.MustParseAddr("fd00:201::1"), ServerV6: netip.MustParseAddr("fd00:201::2"),
		Server2V6: netip.MustParseAddr("fd00:201::3"),
	}
	vc, vs := "wqc"+sfx, "wqs"+sfx
	for _, ns := range []string{n.client, n.server} {
		netnstest.NewNS(t, ns)
		for _, k := range []string{"all", "default"} {
			netnstest.Run(t, "ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf."+k+".accept_dad=0")
		}
	}
	netnstest.Veth(t, n.client, vc, n.server, vs)
	netnstest.Run(t, "ip", "-n", n.client, "addr", "add", n.ClientV4.String()+"/24", "dev", vc)
	netnstest.Run(t, "ip", "-n", n.client, "addr", "add", n.ClientV6.String()+"/64", "dev", vc, "nodad")
	for _, a := range []netip.Addr{n.ServerV4, n.Server2V4} {
		netnstest.Run(t, "ip", "-n", n.server, "addr", "add", a.String()+"/24", "dev", vs)
	}
	for _, a := range []netip.Addr{n.ServerV6, n.Server2V6} {
		netnstest.Run(t, "ip", "-n", n.server, "addr", "add", a.String()+"/64", "dev", vs, "nodad")
	}
	netnstest.Run(t, "ip", "-n", n.client, "link", "set", vc, "up")
	netnstest.Run(t, "ip", "-n", n.server, "link", "set", vs, "up")
	return n
}

// ipt runs an iptables command in a namespace.
func (n *testNet) ipt(t *testing.T, ns string, v6 bool, args ...string) string {
	t.Helper()
	cmd := "iptables"
	if v6 {
		cmd = "ip6tables"
	}
	return netnstest.Run(t, append([]string{"ip", "netns", "exec", ns, cmd, "-w", "5"}, args...)...)
}

// save returns iptables-save (or ip6tables-save) of a namespace without its comment lines (they carry a
// timestamp).
func save(t *testing.T, ns string, v6 bool) string {
	t.Helper()
	cmd := "iptables-save"
	if v6 {
		cmd = "ip6tables-save"
	}
	out := netnstest.Run(t, "ip", "netns", "exec", ns, cmd)
	var b strings.Builder
	for _, l := range strings.SplitAfter(out, "\n") {
		if strings.HasPrefix(l, "#") {
			continue
		}
		b.WriteString(l)
	}
	return b.String()
}

var countersRE = regexp.MustCompile(`\[\d+:\d+\]`)

// withoutCounters blanks the chain counters of a save, for comparing rule sets across traffic.
func withoutCounters(s string) string { return countersRE.ReplaceAllString(s, "[-]") }

// warden is a backend child process running in the client namespace.
type warden struct {
	t     *testing.T
	cmd   *exec.Cmd
	stdin io.WriteCloser
	lines chan string
	mu    sync.Mutex
	exit  error
	done  chan struct{}
}

// startWarden starts the backend in ns with the given policy and waits for "ready".
func startWarden(t *testing.T, ns string, cfg childConfig) *warden {
	t.Helper()
	if cfg.FailMode == "" {
		cfg.FailMode = "open"
	}
	j, err := json.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	cmd := netnstest.Child(context.Background(), t, ns, childEnv+"="+string(j))
	cmd.Stderr = &testWriter{t: t, prefix: "warden: "}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	w := &warden{t: t, cmd: cmd, stdin: stdin, lines: make(chan string, 100), done: make(chan struct{})}
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			w.lines <- sc.Text()
		}
		close(w.lines)
		err := cmd.Wait()
		w.mu.Lock()
		w.exit = err
		w.mu.Unlock()
		close(w.done)
	}()
	t.Cleanup(func() {
		select {
		case <-w.done:
		default:
			_ = cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-w.done:
			case <-time.After(10 * time.Second):
				_ = cmd.Process.Kill()
				<-w.done
			}
		}
	})
	if l := w.next(t, 20*time.Second); l != "ready" {
		t.Fatalf("warden did not start: %q", l)
	}
	return w
}

// next returns the child's next stdout line.
func (w *warden) next(t *testing.T, timeout time.Duration) string {
	t.Helper()
	select {
	case l, ok := <-w.lines:
		if !ok {
			<-w.done
			t.Fatalf("warden exited: %v", w.exitErr())
		}
		return l
	case <-time.After(timeout):
		t.Fatal("warden did not answer in time")
	}
	return ""
}

func (w *warden) exitErr() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.exit
}

// call sends a command and returns the reply line.
func (w *warden) call(t *testing.T, cmd string) string {
	t.Helper()
	if _, err := fmt.Fprintln(w.stdin, cmd); err != nil {
		t.Fatalf("sending %q: %v", cmd, err)
	}
	return w.next(t, 10*time.Second)
}

// count returns how many packets the child's policy has seen.
func (w *warden) count(t *testing.T) int {
	t.Helper()
	var n int
	if _, err := fmt.Sscanf(w.call(t, "count"), "count %d", &n); err != nil {
		t.Fatal(err)
	}
	return n
}

// stop sends SIGTERM and checks the child stopped cleanly without leaking goroutines.
func (w *warden) stop(t *testing.T) {
	t.Helper()
	if err := w.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	var got []string
	for l := range w.lines {
		got = append(got, l)
	}
	<-w.done
	if err := w.exitErr(); err != nil {
		t.Fatalf("warden exit: %v; output %q", err, got)
	}
	want := []string{"stopped", "goroutines ok"}
	if len(got) < 2 || got[len(got)-2] != want[0] || got[len(got)-1] != want[1] {
		t.Fatalf("warden stop output %q, want it to end with %q", got, want)
	}
}

// kill ends the child with SIGKILL, as a crash would.
func (w *warden) kill(t *testing.T) {
	t.Helper()
	if err := w.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	for range w.lines {
	}
	<-w.done
}

// testWriter forwards a child's stderr to the test log.
type testWriter struct {
	t      *testing.T
	prefix string
	mu     sync.Mutex
	buf    []byte
}

func (w *testWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf = append(w.buf, p...)
	for {
		i := strings.IndexByte(string(w.buf), '\n')
		if i < 0 {
			break
		}
		w.t.Log(w.prefix + string(w.buf[:i]))
		w.buf = w.buf[i+1:]
	}
	return len(p), nil
}
