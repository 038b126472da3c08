package netnstest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// RequireRoot skips the test unless it runs as root and every one of tools is on PATH. When the environment
// variable CI is set it fails instead: CI runs as root with the tools installed, so a skip there would hide a
// broken setup behind a green run.
func RequireRoot(t testing.TB, tools ...string) {
	t.Helper()
	var missing []string
	if os.Geteuid() != 0 {
		missing = append(missing, "root")
	}
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			missing = append(missing, tool)
		}
	}
	if len(missing) == 0 {
		return
	}
	msg := "kernel test needs " + strings.Join(missing, " and ")
	if os.Getenv("CI") != "" {
		t.Fatal(msg + ", and CI is set: CI must run it")
	}
	t.Skip(msg)
}

// Run runs the command args[0] with the arguments args[1:] and returns its combined output. It fails the test
// with that output when the command fails, which is what tells why an ip or iptables call went wrong.
func Run(t testing.TB, args ...string) string {
	t.Helper()
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// Suffix returns eight random hexadecimal digits to end namespace and link names with, so that tests running
// in parallel, or next to a leftover of an earlier run, never share a name.
func Suffix() string {
	var b [4]byte
	// crypto/rand.Read never returns an error: it crashes the program if the system cannot supply randomness.
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// Create makes the network namespace name and deletes it when the test and its subtests end, even when the test
// fails. Cleanups registered after Create run before the deletion, so processes started in the namespace can
// be stopped first. A failed deletion is reported as a test error: it leaves a namespace on the host.
//
// The namespace is bare: its loopback is down. NewNS makes one with the loopback up.
func Create(t testing.TB, name string) {
	t.Helper()
	Run(t, "ip", "netns", "add", name)
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
			t.Errorf("ip netns del %s: %v: %s", name, err, out)
		}
	})
}

// NewNS is Create followed by bringing the namespace's loopback up, which most tests need for 127.0.0.1 and ::1.
func NewNS(t testing.TB, name string) {
	t.Helper()
	Create(t, name)
	Run(t, "ip", "-n", name, "link", "set", "lo", "up")
}

// Veth creates a veth pair with end dev1 in namespace ns1 and end dev2 in namespace ns2 (which may be ns1). The
// ends are left down and without addresses; the caller's topology decides those. Both ends go away with their
// namespaces.
func Veth(t testing.TB, ns1, dev1, ns2, dev2 string) {
	t.Helper()
	Run(t, "ip", "-n", ns1, "link", "add", dev1, "type", "veth", "peer", "name", dev2, "netns", ns2)
}

// InNS runs f on an OS thread moved into network namespace ns, so sockets f creates live there (a socket stays in
// the namespace it was created in). Only that thread moves: f must not rely on other goroutines, and anything
// that opens netlink sockets from goroutines of its own belongs in a child process under `ip netns exec`.
// The thread is never handed back to the scheduler: its goroutine exits still locked, which makes the runtime
// discard it rather than let other goroutines run in the wrong namespace.
func InNS(t testing.TB, ns string, f func()) {
	t.Helper()
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		fd, err := unix.Open("/run/netns/"+ns, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			done <- err
			return
		}
		defer unix.Close(fd)
		if err := unix.Setns(fd, unix.CLONE_NEWNET); err != nil {
			done <- err
			return
		}
		f()
		done <- nil
	}()
	if err := <-done; err != nil {
		t.Fatalf("entering namespace %s: %v", ns, err)
	}
}

// Child returns a command that runs this test binary again inside namespace ns, with env ("KEY=value") added to
// the environment: the package's TestMain (or the named test) recognises the variable and plays the child's
// part. args are the test binary's flags; without any it runs no test (-test.run=^$), leaving the work to
// TestMain. Each package keeps its own child protocol; only the command line is shared.
func Child(ctx context.Context, t testing.TB, ns, env string, args ...string) *exec.Cmd {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatalf("finding the test binary: %v", err)
	}
	if len(args) == 0 {
		args = []string{"-test.run=^$"}
	}
	cmd := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", ns, self}, args...)...)
	cmd.Env = append(os.Environ(), env)
	return cmd
}
