package e2e

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/warden-fw/warden/cmd/internal/sandbox"
)

var nobody = &syscall.Credential{Uid: 65534, Gid: 65534}

// sharedDir returns a fresh directory that every user may traverse (t.TempDir is root-only), removed at the
// end of the test.
func sharedDir(t *testing.T, mode os.FileMode) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "warden-e2e-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	// Chmod, not the umask-filtered MkdirTemp mode.
	if err := os.Chmod(dir, mode); err != nil {
		t.Fatal(err)
	}
	return dir
}

// TestControlSocketRootOnly: a user other than root cannot use the control API (exit 1, a clear message);
// root can.
func TestControlSocketRootOnly(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	// The socket directory is traversable by everyone, so it is the socket's own mode that keeps nobody out.
	e.socket = filepath.Join(sharedDir(t, 0o755), "warden.sock")
	e.writeConfig(noTelnet)
	e.startDaemon()

	fi, err := os.Stat(e.socket)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("control socket mode %v, want 0600", fi.Mode().Perm())
	}
	code, out, errOut := wardenCmd(t, nobody, "status", "--socket", e.socket)
	if code != 1 || !strings.Contains(errOut, "not reachable") || !strings.Contains(errOut, "root-only") {
		t.Errorf("status as nobody: exit %d, stdout %q, stderr %q; want exit 1 saying the socket is root-only", code, out, errOut)
	}
	if code, _, errOut := wardenCmd(t, nobody, "reload", "--socket", e.socket); code != 1 {
		t.Errorf("reload as nobody: exit %d (%s), want 1", code, errOut)
	}
	if code, out, errOut := wardenCmd(t, nil, "status", "--socket", e.socket); code != 0 || !strings.Contains(out, "nfqueue") {
		t.Errorf("status as root: exit %d, %q %q", code, out, errOut)
	}

}

// TestControlPeerCheckRefusesClearly: the daemon's peer-credential check answers a non-root peer with a clear
// refusal even when the socket's mode was loosened by mistake (0666), so the user learns why. The refusal
// races the client's request (the daemon closes without reading it, and the client's write then fails with a
// broken pipe), so the test tries many times.
func TestControlPeerCheckRefusesClearly(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.socket = filepath.Join(sharedDir(t, 0o755), "warden.sock")
	e.writeConfig(noTelnet)
	e.startDaemon()
	if err := os.Chmod(e.socket, 0o666); err != nil {
		t.Fatal(err)
	}
	for i := range 40 {
		code, out, errOut := wardenCmd(t, nobody, "status", "--socket", e.socket)
		if strings.Contains(out, "nfqueue") {
			t.Fatalf("nobody got the status: %q", out)
		}
		if code != 1 || !strings.Contains(errOut, "root only") {
			t.Errorf("attempt %d: status as nobody on a 0666 socket: exit %d, stderr %q; want exit 1 and the daemon's "+
				"refusal (control API is for root only)", i, code, errOut)
		}
	}
}

// TestInsecureSocketDirRefused: a daemon whose control socket directory others can write to refuses to start
// (exit 1), and leaves the firewall as it found it.
func TestInsecureSocketDirRefused(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.socket = filepath.Join(sharedDir(t, 0o777), "warden.sock")
	e.writeConfig(noTelnet)
	thirdPartyRules(t, e.top.Client)
	before := ipt(t, e.top.Client)
	d, log := e.spawnDaemon(e.cfg)
	code, err := d.Wait(30 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if code != 1 || !strings.Contains(log.String(), "insecure") {
		t.Errorf("warden run with a world-writable socket directory: exit %d; want 1 with a message saying it is insecure\n%s", code, log)
	}
	if _, err := os.Lstat(e.socket); err == nil {
		t.Error("the control socket was created")
	}
	if diff := cmp.Diff(before, ipt(t, e.top.Client)); diff != "" {
		t.Errorf("iptables changed by the refused start (-before +after):\n%s", diff)
	}
}

// TestConnsNameProcessWithoutAppRules: with no rule that needs the process, the pipeline never looks it up,
// yet `warden conns` names the process behind a live connection (found when asked), and so does the
// connection log (found when the line is written).
func TestConnsNameProcessWithoutAppRules(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	logPath := filepath.Join(e.dir, "conns.jsonl")
	e.writeConfig(noTelnet + "log:\n  connections: " + logPath + "\n")
	e.startDaemon()
	app, exe := e.startAppAgent()
	dst := hp(sandbox.ServiceV4, 80)
	h := call(t, app, sandbox.Request{Op: "hold", Dst: dst, TimeoutMS: 3000})
	expectServer(t, "held connection", h, "A")
	var found bool
	for _, c := range e.conns() {
		if c.Local != h.Local || c.Remote != dst {
			continue
		}
		found = true
		if c.PID != int32(app.PID()) || c.App != exe {
			t.Errorf("held connection shows process %d %q, want %d %q", c.PID, c.App, app.PID(), exe)
		}
	}
	if !found {
		t.Fatalf("conns has no connection %s -> %s", h.Local, dst)
	}
	lines := waitLog(t, logPath, "the held connection", func(ls []logLine) bool { return len(find(ls, "tcp", h.Local, dst)) > 0 })
	if l := find(lines, "tcp", h.Local, dst)[0]; *l.PID != int32(app.PID()) || l.App != exe {
		t.Errorf("connection log names process %d %q, want %d %q", *l.PID, l.App, app.PID(), exe)
	}
	if st := e.status(); st.Pipeline.ProcessLookups != 0 {
		t.Errorf("the pipeline looked up %d processes although no rule needs one", st.Pipeline.ProcessLookups)
	}
}
