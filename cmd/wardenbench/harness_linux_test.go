package main

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"
)

// requireRoot skips without root, but fails under CI, where the harness must be exercised.
func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if os.Getenv("CI") != "" {
		t.Fatal("the harness test needs root (network namespaces, iptables, NFQUEUE), and CI is set")
	}
	t.Skip("the harness test needs root (network namespaces, iptables, NFQUEUE)")
}

// ourNamespaces lists the namespaces a harness with this PID would create.
func ourNamespaces(t *testing.T, pid int) []string {
	t.Helper()
	out, err := exec.Command("ip", "netns", "list").Output()
	if err != nil {
		t.Fatal(err)
	}
	var ns []string
	for l := range strings.SplitSeq(string(out), "\n") {
		if name, _, _ := strings.Cut(strings.TrimSpace(l), " "); strings.HasPrefix(name, fmt.Sprintf("%s%d-", nsPrefix, pid)) {
			ns = append(ns, name)
		}
	}
	return ns
}

// TestHarnessQuick runs the whole harness in a tiny mode, in this process (children re-execute the test
// binary), against Warden's daemon package built in, and checks the report and that nothing is left behind.
func TestHarnessQuick(t *testing.T) {
	requireRoot(t)
	out := filepath.Join(t.TempDir(), "r.json")
	o, err := parseFlags([]string{"--quick", "--workloads", "tcp_connect", "--duration", "300ms", "--rules", "200",
		"--warden", "builtin", "--out", out}, os.Stderr)
	if err != nil {
		t.Fatal(err)
	}
	var stdout, stderr bytes.Buffer
	t.Cleanup(func() {
		for _, ns := range ourNamespaces(t, os.Getpid()) {
			_ = exec.Command("ip", "netns", "del", ns).Run()
		}
	})
	err = runBench(o, &stdout, &stderr)
	if err != nil {
		t.Fatalf("runBench: %v\n%s", err, stderr.String())
	}
	rep := checkShape(t, out, []string{cfgKernel, cfgBare, cfgWarden}, []string{"warden_vs_bare_tcp_connect"})
	if len(rep.Results) != 3 {
		t.Errorf("%d results, want 3 (tcp_connect in three configurations)", len(rep.Results))
	}
	for _, want := range []string{"tcp_connect", "bare_nfqueue", "warden_vs_bare_tcp_connect"} {
		if !strings.Contains(stdout.String(), want) {
			t.Errorf("table lacks %q:\n%s", want, stdout.String())
		}
	}
	if ns := ourNamespaces(t, os.Getpid()); len(ns) != 0 {
		t.Errorf("namespaces left behind: %v", ns)
	}
	t.Logf("\n%s", stdout.String())
}

// TestHarnessInterrupt starts the command, interrupts it (as Ctrl-C does) while it measures, and checks that
// it removed its namespaces on the way out.
func TestHarnessInterrupt(t *testing.T) {
	requireRoot(t)
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe)
	cmd.Env = append(os.Environ(), mainArgsEnv+"=--quick --workloads tcp_connect --duration 10s --warden builtin --rules 100")
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pid := cmd.Process.Pid
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		for _, ns := range ourNamespaces(t, pid) {
			_ = exec.Command("ip", "netns", "del", ns).Run()
		}
	})
	// Wait until it is measuring: the first workload has started.
	sc := bufio.NewScanner(stderr)
	var log strings.Builder
	measuring := false
	for sc.Scan() {
		log.WriteString(sc.Text() + "\n")
		if strings.Contains(sc.Text(), "repetition 1: kernel") {
			measuring = true
			break
		}
	}
	if !measuring {
		t.Fatalf("the harness never started measuring:\n%s", log.String())
	}
	if n := len(ourNamespaces(t, pid)); n != 3 {
		t.Fatalf("%d namespaces while running, want 3", n)
	}
	if err := cmd.Process.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		for sc.Scan() {
			log.WriteString(sc.Text() + "\n")
		}
		done <- cmd.Wait()
	}()
	select {
	case err := <-done:
		if err == nil {
			t.Error("an interrupted run exited 0")
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("the harness did not stop within 30s of SIGINT:\n%s", log.String())
	}
	if ns := ourNamespaces(t, pid); len(ns) != 0 {
		t.Errorf("namespaces left behind after SIGINT: %v\n%s", ns, log.String())
	}
}

// TestProcessCPU checks the firewall process's CPU time reading on this process: it grows while this test
// spins, by no more than the CPUs could give in the time, and a missing process reads as -1.
func TestProcessCPU(t *testing.T) {
	pid := os.Getpid()
	before := processCPU(pid)
	if before < 0 {
		t.Fatal("no CPU time for this process")
	}
	// Spin until 100 ms of CPU time show (/proc counts in 10 ms ticks), for at most 10 s on a busy machine.
	start := time.Now()
	var grown time.Duration
	for grown < 100*time.Millisecond && time.Since(start) < 10*time.Second {
		for t0 := time.Now(); time.Since(t0) < 10*time.Millisecond; {
		}
		grown = processCPU(pid) - before
	}
	elapsed := time.Since(start)
	if grown < 100*time.Millisecond {
		t.Errorf("CPU time grew by %v while spinning for %v", grown, elapsed)
	}
	if limit := elapsed*time.Duration(runtime.NumCPU()) + 20*time.Millisecond; grown > limit {
		t.Errorf("CPU time grew by %v in %v on %d CPUs", grown, elapsed, runtime.NumCPU())
	}
	if got := processCPU(0); got != -1 {
		t.Errorf("processCPU(0) = %v, want -1", got)
	}
	if got := processCPU(1 << 30); got != -1 {
		t.Errorf("processCPU of no process = %v, want -1", got)
	}
}
