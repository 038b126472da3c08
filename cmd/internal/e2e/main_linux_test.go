package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/warden-fw/warden/backend/netnstest"
	"github.com/warden-fw/warden/cmd/internal/control"
	"github.com/warden-fw/warden/cmd/internal/sandbox"
	"github.com/warden-fw/warden/proxy/splittun"
)

// roleEnv makes the test binary act as an agent (for app rules: its path differs from warden's).
const roleEnv = "WARDEN_E2E_ROLE"

var (
	// wardenBin is the binary under test, built by TestMain (empty when not root).
	wardenBin string
	// buildErr is why it could not be built.
	buildErr error
)

func TestMain(m *testing.M) {
	if os.Getenv(roleEnv) == "agent" {
		if err := sandbox.RunAgent(os.Stdin, os.Stdout); err != nil {
			fmt.Fprintln(os.Stderr, "agent:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(runTests(m))
}

func runTests(m *testing.M) int {
	if os.Geteuid() == 0 {
		dir, err := os.MkdirTemp("", "warden-e2e-bin-")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		defer os.RemoveAll(dir)
		// Traversable by everyone: one test runs the binary as nobody.
		if err := os.Chmod(dir, 0o755); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		wardenBin, buildErr = buildWarden(dir)
	}
	return m.Run()
}

// buildWarden builds ./cmd/warden with the race detector, once per test run.
func buildWarden(dir string) (string, error) {
	goTool, err := exec.LookPath("go")
	if err != nil {
		// `go test` sets GOROOT for its children when the go tool is not on PATH.
		goTool = filepath.Join(os.Getenv("GOROOT"), "bin", "go")
	}
	out := filepath.Join(dir, "warden")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, goTool, "build", "-race", "-o", out, "github.com/warden-fw/warden/cmd/warden")
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build -race ./cmd/warden: %w\n%s", err, b)
	}
	return out, nil
}

// requireRoot skips without root, but fails when CI is set: CI must run these tests. It also fails when the
// daemon under test could not be built.
func requireRoot(t *testing.T) {
	t.Helper()
	netnstest.RequireRoot(t)
	if buildErr != nil {
		t.Fatal(buildErr)
	}
}

// env is one test's world: its own namespaces, servers A and B, a client agent, and at most one daemon at a
// time.
type env struct {
	t      *testing.T
	top    *sandbox.Topology
	dir    string
	cfg    string
	socket string
	a, b   *sandbox.Agent
	client *sandbox.Agent
	d      *sandbox.Daemon
	dlog   *syncBuffer
}

// Ports the servers answer on.
var (
	serverTCP = []uint16{80, 81, 23, 8080}
	serverUDP = []uint16{4000, 5000, 8080}
)

// newEnv builds a fresh topology with serving A and B and a client agent, all removed when the test ends.
func newEnv(t *testing.T) *env {
	t.Helper()
	requireRoot(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	top, err := sandbox.New(ctx, "we2e")
	if err != nil {
		t.Fatal(err)
	}
	// Registered first, so it runs last: after the daemon and the agents have stopped.
	t.Cleanup(func() {
		if err := top.Close(); err != nil {
			t.Errorf("removing namespaces: %v", err)
		}
	})
	e := &env{t: t, top: top, dir: t.TempDir()}
	e.cfg = filepath.Join(e.dir, "warden.yaml")
	e.socket = filepath.Join(e.dir, "run", "warden.sock")
	var addrs []string
	for _, a := range sandbox.ServiceAddrs() {
		addrs = append(addrs, a.String())
	}
	e.a = e.startAgent(top.A, wardenBin, "demo", "agent")
	e.b = e.startAgent(top.B, wardenBin, "demo", "agent")
	for name, ag := range map[string]*sandbox.Agent{"A": e.a, "B": e.b} {
		if _, err := ag.Call(sandbox.Request{Op: "serve", Name: name, Addrs: addrs, TCP: serverTCP, UDP: serverUDP}); err != nil {
			t.Fatal(err)
		}
	}
	e.client = e.startAgent(top.Client, wardenBin, "demo", "agent")
	return e
}

// startAgent starts an agent process inside ns.
func (e *env) startAgent(ns, bin string, args ...string) *sandbox.Agent {
	e.t.Helper()
	cmd := sandbox.Command(context.Background(), ns, bin, args...)
	cmd.Stderr = os.Stderr
	ag, err := sandbox.StartAgent(cmd)
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { _ = ag.Close() })
	return ag
}

// startAppAgent starts the test binary itself as an agent inside the client namespace: its executable path is
// what app rules match.
func (e *env) startAppAgent() (*sandbox.Agent, string) {
	e.t.Helper()
	exe, err := os.Executable()
	if err != nil {
		e.t.Fatal(err)
	}
	cmd := sandbox.Command(context.Background(), e.top.Client, exe, "-test.run=^$")
	cmd.Env = append(os.Environ(), roleEnv+"=agent")
	cmd.Stderr = os.Stderr
	ag, err := sandbox.StartAgent(cmd)
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { _ = ag.Close() })
	return ag, exe
}

// writeConfig writes the config file, adding the control socket unless body sets one.
func (e *env) writeConfig(body string) {
	e.t.Helper()
	writeFile(e.t, e.cfg, e.configText(body))
}

func (e *env) configText(body string) string {
	if !strings.Contains(body, "control:") {
		body += "\ncontrol:\n  socket: " + e.socket + "\n"
	}
	return body
}

func writeFile(t *testing.T, path, body string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		t.Fatal(err)
	}
	// Write and rename: a watcher never sees a half-written file.
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// syncBuffer collects a child's output safely.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// startDaemon runs `warden run -c e.cfg` inside the client namespace and waits until its control API answers.
// When the test ends the daemon is stopped (SIGTERM, then SIGKILL); its output is logged if the test failed.
func (e *env) startDaemon() *sandbox.Daemon {
	e.t.Helper()
	d, log := e.spawnDaemon(e.cfg)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := d.WaitReady(ctx); err != nil {
		e.t.Fatalf("%v\nwarden run output:\n%s", err, log)
	}
	e.d, e.dlog = d, log
	return d
}

// spawnDaemon starts `warden run -c cfg` without waiting for it.
func (e *env) spawnDaemon(cfg string) (*sandbox.Daemon, *syncBuffer) {
	e.t.Helper()
	log := &syncBuffer{}
	cmd := sandbox.Command(context.Background(), e.top.Client, wardenBin, "run", "-c", cfg)
	cmd.Stdout, cmd.Stderr = log, log
	d, err := sandbox.StartDaemon(cmd, e.socket)
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() {
		if _, err := d.Stop(10 * time.Second); err != nil {
			e.t.Errorf("stopping the daemon: %v", err)
		}
		if e.t.Failed() {
			e.t.Logf("warden run (pid %d) output:\n%s", d.PID(), log)
		}
	})
	return d, log
}

// wardenCmd runs the warden CLI from the host's namespace (the control socket is a file, reachable from
// anywhere) and returns its exit code and output.
func wardenCmd(t *testing.T, cred *syscall.Credential, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, wardenBin, args...)
	if cred != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	}
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	if err != nil {
		if _, ok := err.(*exec.ExitError); !ok {
			t.Fatalf("warden %s: %v", strings.Join(args, " "), err)
		}
	}
	return cmd.ProcessState.ExitCode(), o.String(), e.String()
}

// cli runs a warden command against this env's daemon and config and fails the test on a non-zero exit.
func (e *env) cli(args ...string) string {
	e.t.Helper()
	args = append(args, "--socket", e.socket, "-c", e.cfg)
	code, out, errOut := wardenCmd(e.t, nil, args...)
	if code != 0 {
		e.t.Fatalf("warden %s: exit %d\n%s%s", strings.Join(args, " "), code, out, errOut)
	}
	return out
}

// status is `warden status --json`.
func (e *env) status() control.Status {
	e.t.Helper()
	var st control.Status
	if err := json.Unmarshal([]byte(e.cli("status", "--json")), &st); err != nil {
		e.t.Fatal(err)
	}
	return st
}

// connInfo is one entry of `warden conns --json`.
type connInfo struct {
	Protocol  string `json:"protocol"`
	Direction string `json:"direction"`
	Local     string `json:"local"`
	Remote    string `json:"remote"`
	PID       int32  `json:"pid"`
	App       string `json:"app"`
	UID       int32  `json:"uid"`
	Verdict   string `json:"verdict"`
	Rule      string `json:"rule"`
	Source    string `json:"source"`
}

func (e *env) conns() []connInfo {
	e.t.Helper()
	var cs []connInfo
	if err := json.Unmarshal([]byte(e.cli("conns", "--json")), &cs); err != nil {
		e.t.Fatal(err)
	}
	return cs
}

// split returns status.split_tunnel.
func (e *env) split(st control.Status) *splittun.Stats {
	e.t.Helper()
	if st.SplitTunnel == nil {
		e.t.Fatal("status has no split_tunnel section")
	}
	return st.SplitTunnel
}

// waitStatus polls status until cond holds, for at most 10 seconds.
func (e *env) waitStatus(what string, cond func(control.Status) bool) control.Status {
	e.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		st := e.status()
		if cond(st) {
			return st
		}
		if time.Now().After(deadline) {
			b, _ := json.MarshalIndent(st, "", "  ")
			e.t.Fatalf("timed out waiting for %s; status:\n%s", what, b)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// call sends one request to an agent and fails the test if the agent could not do it (network outcomes are in
// the response, not errors).
func call(t *testing.T, ag *sandbox.Agent, req sandbox.Request) sandbox.Response {
	t.Helper()
	r, err := ag.Call(req)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// expectServer fails unless r connected to the named server.
func expectServer(t *testing.T, what string, r sandbox.Response, server string) {
	t.Helper()
	if r.Outcome != sandbox.Connected || r.Server != server {
		t.Errorf("%s: outcome %q, server %q (%s); want connected to %s", what, r.Outcome, r.Server, r.Detail, server)
	}
}

// expectOutcome fails unless r had the given outcome.
func expectOutcome(t *testing.T, what string, r sandbox.Response, outcome string) {
	t.Helper()
	if r.Outcome != outcome {
		t.Errorf("%s: outcome %q, server %q (%s); want %s", what, r.Outcome, r.Server, r.Detail, outcome)
	}
}

func tcpReq(dst string) sandbox.Request {
	return sandbox.Request{Op: "tcp", Dst: dst, Payload: "ping", TimeoutMS: 3000}
}

func udpReq(dst string) sandbox.Request {
	return sandbox.Request{Op: "udp", Dst: dst, Connect: true, Payload: "hello", TimeoutMS: 3000}
}

// ipt returns the namespace's iptables-save and ip6tables-save.
func ipt(t *testing.T, ns string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	s, err := sandbox.IPTablesSave(ctx, ns)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// thirdPartyRules puts rules of "other software" into the filter, mangle and nat tables of ns (IPv4 and IPv6),
// so the tables exist before a "before" snapshot (iptables-nft leaves an empty table behind once created) and
// so a test can check that Warden leaves them in place and in order. None of them affects the tests' traffic.
func thirdPartyRules(t *testing.T, ns string) {
	t.Helper()
	for _, v := range []struct{ tool, dst, to string }{
		{"iptables", "192.0.2.99", "127.0.0.1:9996"},
		{"ip6tables", "2001:db8:5::99", "[::1]:9996"},
	} {
		for _, r := range [][]string{
			{"-t", "filter", "-N", "THIRD-PARTY"},
			{"-t", "filter", "-A", "THIRD-PARTY", "-p", "tcp", "--dport", "9999", "-j", "RETURN"},
			{"-t", "filter", "-A", "INPUT", "-p", "tcp", "--dport", "9999", "-j", "ACCEPT"},
			{"-t", "filter", "-A", "OUTPUT", "-j", "THIRD-PARTY"},
			{"-t", "filter", "-A", "OUTPUT", "-d", v.dst, "-p", "udp", "--dport", "9998", "-j", "DROP"},
			{"-t", "mangle", "-A", "OUTPUT", "-d", v.dst, "-p", "udp", "--dport", "9998", "-j", "MARK", "--set-mark", "0x42"},
			{"-t", "mangle", "-A", "PREROUTING", "-d", v.dst, "-j", "RETURN"},
			{"-t", "nat", "-A", "OUTPUT", "-d", v.dst, "-p", "tcp", "--dport", "9997", "-j", "DNAT", "--to-destination", v.to},
		} {
			args := append([]string{"netns", "exec", ns, v.tool}, r...)
			if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
				t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
			}
		}
	}
}
