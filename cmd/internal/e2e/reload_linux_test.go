package e2e

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/warden-fw/warden/cmd/internal/control"
	"github.com/warden-fw/warden/cmd/internal/sandbox"
)

const noTelnet = `
rules:
  - name: no-telnet
    action: block
    protocol: tcp
    ports: [23]
`

// useSymlinkedConfig makes e.cfg a symlink to a file in another directory and returns that file. The daemon
// watches the directory of its config path, so writing the target is invisible to the watcher: only an
// explicit reload (the CLI or SIGHUP) picks the change up, which lets a test tell the two apart.
func (e *env) useSymlinkedConfig(body string) string {
	e.t.Helper()
	target := filepath.Join(e.dir, "real", "warden.yaml")
	writeFile(e.t, target, e.configText(body))
	if err := os.Symlink(target, e.cfg); err != nil {
		e.t.Fatal(err)
	}
	return target
}

// TestReloadRejectsBrokenAndCutsLive: `warden reload` of a broken file exits 2, keeps the running policy (a
// blocked destination stays blocked, live connections keep working) and reports the error in status; a good
// file takes effect at once, also on live connections: the one to a newly blocked destination is cut within a
// second while an untouched one keeps working.
func TestReloadRejectsBrokenAndCutsLive(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	target := e.useSymlinkedConfig(noTelnet)
	e.startDaemon()

	telnet := hp(sandbox.ServiceV4, 23)
	expectOutcome(t, "telnet before", call(t, e.client, tcpReq(telnet)), sandbox.Refused)
	h1 := call(t, e.client, sandbox.Request{Op: "hold", Dst: hp(sandbox.ServiceV4, 80)})
	h2 := call(t, e.client, sandbox.Request{Op: "hold", Dst: hp(sandbox.ServiceV4Alt, 80)})
	expectServer(t, "held connection 1", h1, "A")
	expectServer(t, "held connection 2", h2, "A")

	// A broken file: rejected, nothing changes.
	writeFile(t, target, e.configText("rules:\n  - name: no-telnet\n    action: explode\n"))
	code, out, errOut := wardenCmd(t, nil, "reload", "--socket", e.socket, "-c", e.cfg)
	if code != 2 || !strings.Contains(errOut, "rules[0].action") {
		t.Errorf("reload of a broken file: exit %d, stdout %q, stderr %q; want exit 2 naming rules[0].action", code, out, errOut)
	}
	st := e.status()
	if !strings.Contains(st.LastReloadError, "rules[0].action") || st.ReloadFailures != 1 || st.Pipeline.Rules != 1 {
		t.Errorf("status after a rejected reload: last_reload_error %q, reload_failures %d, rules %d",
			st.LastReloadError, st.ReloadFailures, st.Pipeline.Rules)
	}
	if out := e.cli("status"); !strings.Contains(out, "REJECTED") {
		t.Errorf("status text does not show the rejected reload:\n%s", out)
	}
	expectOutcome(t, "telnet after a rejected reload", call(t, e.client, tcpReq(telnet)), sandbox.Refused)
	explain := []string{"explain", "--json", "--proto", "tcp", "--remote", sandbox.ServiceV4.String(), "--port", "23"}
	if out := e.cli(append(explain, "--online")...); !strings.Contains(out, `"rule":"no-telnet"`) {
		t.Errorf("explain --online after a rejected reload: %s; want the running policy's no-telnet", out)
	}
	if code, _, errOut := wardenCmd(t, nil, append(explain, "-c", e.cfg)...); code != 2 || !strings.Contains(errOut, "rules[0].action") {
		t.Errorf("explain from the broken file: exit %d, %q; want 2 naming rules[0].action", code, errOut)
	}
	for _, h := range []sandbox.Response{h1, h2} {
		expectOutcome(t, "held connection after a rejected reload", call(t, e.client, sandbox.Request{Op: "ping", ID: h.ID}), sandbox.Connected)
	}

	// A good file that blocks the first held connection's destination.
	writeFile(t, target, e.configText(noTelnet+`
  - name: cut-192.0.2.10
    action: block
    protocol: tcp
    remote: [192.0.2.10]
    ports: [80]
`))
	out = e.cli("reload")
	if !strings.Contains(out, "reloaded; 1 live connection(s) changed verdict") {
		t.Errorf("reload: %q; want exactly one live connection changed", out)
	}
	start := time.Now()
	r := call(t, e.client, sandbox.Request{Op: "ping", ID: h1.ID, TimeoutMS: 1000})
	if r.Outcome != sandbox.Refused || time.Since(start) > time.Second {
		t.Errorf("the live connection to the newly blocked destination: %s (%s) after %v; want cut within a second",
			r.Outcome, r.Detail, time.Since(start))
	}
	expectOutcome(t, "the untouched live connection", call(t, e.client, sandbox.Request{Op: "ping", ID: h2.ID}), sandbox.Connected)
	expectOutcome(t, "a new connection to the blocked destination", call(t, e.client, tcpReq(hp(sandbox.ServiceV4, 80))), sandbox.Refused)
	expectServer(t, "a new connection elsewhere", call(t, e.client, tcpReq(hp(sandbox.ServiceV4Alt, 80))), "A")
	explain80 := []string{"explain", "--online", "--json", "--proto", "tcp", "--remote", sandbox.ServiceV4.String(), "--port", "80"}
	if out := e.cli(explain80...); !strings.Contains(out, `"rule":"cut-192.0.2.10"`) {
		t.Errorf("explain --online after the reload: %s; want cut-192.0.2.10", out)
	}
	st = e.status()
	if st.LastReloadError != "" || st.Reloads != 1 || st.Pipeline.Rules != 2 {
		t.Errorf("status after a good reload: last_reload_error %q, reloads %d, rules %d", st.LastReloadError, st.Reloads, st.Pipeline.Rules)
	}
}

// TestReloadOnSIGHUPAndFileChange: SIGHUP reloads, and so does a change of the config file on disk (replaced by
// rename, as editors and config management do, or written in place).
func TestReloadOnSIGHUPAndFileChange(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	target := e.useSymlinkedConfig(noTelnet)
	d := e.startDaemon()
	port81 := hp(sandbox.ServiceV4, 81)
	expectServer(t, "port 81 before", call(t, e.client, tcpReq(port81)), "A")

	// SIGHUP: the target changed where the watcher cannot see it, so only the signal can reload it.
	block81 := noTelnet + "  - name: no-81\n    action: block\n    protocol: tcp\n    ports: [81]\n"
	writeFile(t, target, e.configText(block81))
	if err := d.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	e.waitStatus("the SIGHUP reload", func(st control.Status) bool { return st.Reloads == 1 && st.Pipeline.Rules == 2 })
	expectOutcome(t, "port 81 after SIGHUP", call(t, e.client, tcpReq(port81)), sandbox.Refused)

	// The config path itself replaced (rename over it, in the watched directory).
	block82 := block81 + "  - name: no-8080\n    action: block\n    protocol: tcp\n    ports: [8080]\n"
	writeFile(t, e.cfg, e.configText(block82))
	e.waitStatus("the reload after the file was replaced", func(st control.Status) bool { return st.Reloads == 2 && st.Pipeline.Rules == 3 })
	expectOutcome(t, "port 8080 after the file changed", call(t, e.client, tcpReq(hp(sandbox.ServiceV4, 8080))), sandbox.Refused)

	// Written in place.
	if err := os.WriteFile(e.cfg, []byte(e.configText(noTelnet)), 0o600); err != nil {
		t.Fatal(err)
	}
	st := e.waitStatus("the reload after the file was written", func(st control.Status) bool { return st.Pipeline.Rules == 1 })
	if st.LastReloadError != "" {
		t.Errorf("last_reload_error %q", st.LastReloadError)
	}
	expectServer(t, "port 81 after the rule went away", call(t, e.client, tcpReq(port81)), "A")
}
