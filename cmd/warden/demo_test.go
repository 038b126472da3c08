//go:build linux

package main

import (
	"bufio"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/warden-fw/warden/cmd/internal/sandbox"
)

// execMainEnv makes the test binary behave as the warden binary: the demo re-executes itself (os.Executable)
// for its agents and its daemon, and under `go test` that is this binary.
const execMainEnv = "WARDEN_TEST_EXEC_MAIN"

func init() {
	if os.Getenv(execMainEnv) == "1" {
		os.Exit(execute(os.Args[1:]))
	}
}

func requireRootForDemo(t *testing.T) {
	t.Helper()
	if runtime.GOOS != "linux" {
		t.Skip("the demo needs Linux network namespaces")
	}
	if os.Geteuid() != 0 {
		if os.Getenv("CI") != "" {
			t.Fatal("the demo test needs root, and CI is set")
		}
		t.Skip("the demo test needs root (network namespaces)")
	}
}

// hostState is what the demo must leave as it found it.
type hostState struct {
	iptables   string
	namespaces []string
}

func snapshotHost(t *testing.T) hostState {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	// Reading the host's rules only; nothing here writes them.
	ipt, err := sandbox.IPTablesSave(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	out, err := exec.CommandContext(ctx, "ip", "netns", "list").Output()
	if err != nil {
		t.Fatal(err)
	}
	var ns []string
	for _, l := range strings.Split(string(out), "\n") {
		if f := strings.Fields(l); len(f) > 0 && strings.HasPrefix(f[0], "wdemo-") {
			ns = append(ns, f[0])
		}
	}
	return hostState{iptables: ipt, namespaces: ns}
}

// processesOf lists the processes (other than this one) running the executable exe.
func processesOf(t *testing.T, exe string) []int {
	t.Helper()
	ents, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		if target, err := os.Readlink(filepath.Join("/proc", e.Name(), "exe")); err == nil && target == exe {
			pids = append(pids, pid)
		}
	}
	return pids
}

var demoNamespaceRE = regexp.MustCompile(`wdemo-[abc]-[0-9a-f]{6}`)

// checkLeftovers fails if the demo left a namespace, a process or a changed host firewall behind.
func checkLeftovers(t *testing.T, exe, output string, before hostState) {
	t.Helper()
	after := snapshotHost(t)
	if diff := cmp.Diff(before.iptables, after.iptables); diff != "" {
		t.Errorf("the host's iptables changed (-before +after):\n%s", diff)
	}
	if diff := cmp.Diff(before.namespaces, after.namespaces); diff != "" {
		t.Errorf("namespaces left behind (-before +after):\n%s", diff)
	}
	used := demoNamespaceRE.FindAllString(output, -1)
	if len(used) == 0 {
		t.Errorf("the demo did not name its namespaces:\n%s", output)
	}
	for _, ns := range used {
		if _, err := os.Stat(filepath.Join("/run/netns", ns)); err == nil {
			t.Errorf("namespace %s is still there", ns)
		}
	}
	if pids := processesOf(t, exe); len(pids) > 0 {
		t.Errorf("processes left behind: %v", pids)
		for _, p := range pids {
			_ = syscall.Kill(p, syscall.SIGKILL) // ours: they run this very test binary
		}
	}
}

func demoCommand(ctx context.Context, t *testing.T, args ...string) (*exec.Cmd, string) {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.CommandContext(ctx, exe, args...)
	cmd.Env = append(os.Environ(), execMainEnv+"=1")
	return cmd, exe
}

// TestDemo: `warden demo` runs to completion well within a minute, every probe behaves as its policy says,
// and it leaves no namespace, no process and no change to the host's firewall behind.
func TestDemo(t *testing.T) {
	requireRootForDemo(t)
	before := snapshotHost(t)
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	cmd, exe := demoCommand(ctx, t, "demo", "--quick")
	start := time.Now()
	out, err := cmd.CombinedOutput()
	took := time.Since(start)
	output := string(out)
	if err != nil {
		t.Errorf("warden demo: %v\n%s", err, output)
	}
	if took > 40*time.Second {
		t.Errorf("warden demo took %v; it must stay well under a minute", took)
	}
	rows := regexp.MustCompile(`(?m)^\d+ .* ok$`).FindAllString(output, -1)
	if len(rows) != 11 || strings.Contains(output, "UNEXPECTED") {
		t.Errorf("want 11 probes, all as expected; got %d ok rows:\n%s", len(rows), output)
	}
	for _, want := range []string{"connected to A", "refused at once", "no answer (timed out)", "connected to B (split)",
		"connected to client", "reroute-split", "verdicts block", "stopped cleanly (SIGTERM, exit 0)", "removed namespaces"} {
		if !strings.Contains(output, want) {
			t.Errorf("the demo's output lacks %q", want)
		}
	}
	checkLeftovers(t, exe, output, before)
	t.Logf("warden demo took %v", took.Round(time.Millisecond))
}

// TestDemoInterrupted: Ctrl-C in the middle of the demo still tears everything down.
func TestDemoInterrupted(t *testing.T) {
	requireRootForDemo(t)
	before := snapshotHost(t)
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	cmd, exe := demoCommand(ctx, t, "demo")
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var output strings.Builder
	sc := bufio.NewScanner(stdout)
	interrupted := false
	for sc.Scan() {
		output.WriteString(sc.Text() + "\n")
		// Interrupt while the daemon runs and probes are under way.
		if !interrupted && strings.HasPrefix(sc.Text(), "3 ") {
			if err := cmd.Process.Signal(syscall.SIGINT); err != nil {
				t.Fatal(err)
			}
			interrupted = true
		}
	}
	err = cmd.Wait()
	if !interrupted {
		t.Fatalf("never reached the third probe:\n%s", output.String())
	}
	if code := cmd.ProcessState.ExitCode(); code != exitFailure {
		t.Errorf("interrupted demo: exit %d (%v), want %d\n%s", code, err, exitFailure, output.String())
	}
	if !strings.Contains(output.String(), "removed namespaces") {
		t.Errorf("no teardown reported:\n%s", output.String())
	}
	checkLeftovers(t, exe, output.String(), before)
}

// TestDemoNeedsRoot: without root the demo explains why and exits 1.
func TestDemoNeedsRoot(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("Linux only")
	}
	old := demoGeteuid
	demoGeteuid = func() int { return 65534 }
	defer func() { demoGeteuid = old }()
	code, out, errOut := runCLI(t, "demo")
	if code != exitFailure || !strings.Contains(errOut, "needs root") || !strings.Contains(errOut, "sudo warden demo") {
		t.Errorf("demo as non-root: exit %d, stdout %q, stderr %q", code, out, errOut)
	}
}
