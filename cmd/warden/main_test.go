package main

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// runCLI runs the CLI in-process and returns its exit code and output.
func runCLI(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	root := newRoot()
	var out, errOut bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&errOut)
	root.SetArgs(args)
	err := root.Execute()
	code := exitOK
	if err != nil {
		errOut.WriteString(err.Error())
		code = exitUsage
		if ee, ok := err.(*exitError); ok {
			code = ee.code
		}
	}
	return code, out.String(), errOut.String()
}

func writeConfig(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "warden.yaml")
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestCheckExitCodes(t *testing.T) {
	code, out, _ := runCLI(t, "check", "-c", "../../examples/warden.yaml")
	if code != 0 || !strings.Contains(out, "valid") {
		t.Errorf("example: exit %d, %q", code, out)
	}
	bad := []struct{ yaml, path string }{
		{`rules: [{name: a, action: block, ports: ["70000"]}]`, `rules[0].ports[0]: "70000" is not a port (1-65535)`},
		{"fail_mod: open", "fail_mod: unknown key"},
		{"rules: [{name: a, action: split, direction: inbound}]", "rules[0].direction"},
		{"split_tunnel: {port: 0}", "split_tunnel.port"},
		{"log: {level: loud}", "log.level"},
	}
	for _, b := range bad {
		code, _, errOut := runCLI(t, "check", "-c", writeConfig(t, b.yaml))
		if code != exitUsage || !strings.Contains(errOut, b.path) {
			t.Errorf("%q: exit %d, stderr %q", b.yaml, code, errOut)
		}
	}
	if code, _, _ := runCLI(t, "check", "-c", filepath.Join(t.TempDir(), "missing.yaml")); code != exitUsage {
		t.Errorf("missing file: exit %d", code)
	}
}

func TestExplainJSON(t *testing.T) {
	cfg := writeConfig(t, `
default_action: drop
inbound_default: block
split_tunnel: {interface: eth9}
rules:
  - {name: telnet, action: block, protocol: tcp, ports: [23]}
  - {name: lan, action: split, remote: [192.168.0.0/16]}
  - {name: wg, action: split, remote: ["*.example.org"], via: wg1}
  - {name: curl, action: allow, app: /usr/bin/curl}
  - {name: ssh-in, action: allow, direction: inbound, ports: [22]}
`)
	tests := []struct {
		args []string
		want explainResult
	}{
		{[]string{"--proto", "tcp", "--remote", "1.2.3.4", "--port", "23"}, explainResult{Action: "block", Rule: "telnet", Via: ""}},
		{[]string{"--proto", "udp", "--remote", "192.168.1.1", "--port", "53"}, explainResult{Action: "split", Rule: "lan", Via: "eth9"}},
		{[]string{"--proto", "tcp", "--remote", "www.example.org", "--port", "443"}, explainResult{Action: "split", Rule: "wg", Via: "wg1"}},
		{[]string{"--proto", "tcp", "--remote", "1.2.3.4", "--port", "80", "--app", "/usr/bin/curl"}, explainResult{Action: "allow", Rule: "curl", Via: ""}},
		{[]string{"--proto", "tcp", "--remote", "1.2.3.4", "--port", "80"}, explainResult{Action: "drop", Rule: "", Via: ""}},
		{[]string{"--direction", "inbound", "--proto", "tcp", "--remote", "1.2.3.4", "--port", "22"}, explainResult{Action: "allow", Rule: "ssh-in", Via: ""}},
		{[]string{"--direction", "inbound", "--proto", "tcp", "--port", "80"}, explainResult{Action: "block", Rule: "", Via: ""}},
	}
	for _, tt := range tests {
		args := append([]string{"explain", "-c", cfg, "--json"}, tt.args...)
		code, out, errOut := runCLI(t, args...)
		if code != 0 {
			t.Fatalf("%v: exit %d: %s", tt.args, code, errOut)
		}
		var got explainResult
		if err := json.Unmarshal([]byte(out), &got); err != nil {
			t.Fatalf("%v: output %q: %v", tt.args, out, err)
		}
		if got != tt.want {
			t.Errorf("%v: %+v, want %+v", tt.args, got, tt.want)
		}
		// The JSON has exactly the three documented keys.
		var raw map[string]any
		_ = json.Unmarshal([]byte(out), &raw)
		if len(raw) != 3 {
			t.Errorf("%v: keys %v", tt.args, raw)
		}
	}
	for _, bad := range [][]string{{"--direction", "up"}, {"--proto", "sctp"}, {"--port", "70000"}, {"--remote", "1.2.3.4.5"}, {"--remote", "not a name"}, {"--remote", "*.example.org"}, {"--user", "no-such-user-x"}} {
		if code, _, _ := runCLI(t, append([]string{"explain", "-c", cfg}, bad...)...); code != exitUsage {
			t.Errorf("%v: exit %d, want 2", bad, code)
		}
	}
}

func TestVersion(t *testing.T) {
	code, out, _ := runCLI(t, "version")
	if code != 0 || !strings.HasPrefix(out, "warden ") || !strings.Contains(out, "go1.") {
		t.Errorf("version: %d %q", code, out)
	}
}

func TestUnknownCommandIsUsageError(t *testing.T) {
	if code := execute([]string{"frobnicate"}); code != exitUsage {
		t.Errorf("exit %d", code)
	}
}

func TestCleanupIfFailOpenKeepsClosedRules(t *testing.T) {
	cfg := writeConfig(t, "fail_mode: closed\n")
	code, out, errOut := runCLI(t, "cleanup", "--if-fail-open", "-c", cfg, "--socket", filepath.Join(t.TempDir(), "none.sock"))
	if code != 0 || !strings.Contains(out, "fail_mode is closed") {
		t.Errorf("exit %d, out %q, err %q", code, out, errOut)
	}
	code, out, _ = runCLI(t, "cleanup", "--if-fail-open", "-c", filepath.Join(t.TempDir(), "missing.yaml"))
	if code != 0 || !strings.Contains(out, "unknown") {
		t.Errorf("missing config: exit %d, out %q", code, out)
	}
}

// TestCheckRejectsMalformed runs `warden check` on malformed configs: each exits 2 and names the key path.
func TestCheckRejectsMalformed(t *testing.T) {
	cases := []struct{ yaml, path string }{
		{"fail_mod: open", "fail_mod"},
		{"rules: [{name: a, action: block, prots: [1]}]", "rules[0].prots"},
		{"split_tunnel: {interfac: eth0}", "split_tunnel.interfac"},
		{"backend: ebpf", "backend"},
		{"fail_mode: maybe", "fail_mode"},
		{"default_action: split", "default_action"},
		{"inbound_default: reject", "inbound_default"},
		{"rules: [{name: a, action: block}, {name: b, action: block}, {name: c, action: block}, {name: d, action: block, ports: [\"70000\"]}]", `rules[3].ports[0]: "70000" is not a port (1-65535)`},
		{"rules: [{name: a, action: block, ports: [0]}]", "rules[0].ports[0]"},
		{"rules: [{name: a, action: block, ports: [\"9000-8000\"]}]", "rules[0].ports[0]"},
		{"rules: [{action: block}]", "rules[0].name"},
		{"rules: [{name: a, action: block}, {name: a, action: allow}]", "rules[1].name"},
		{"rules: [{name: a}]", "rules[0].action"},
		{"rules: [{name: a, action: block, direction: sideways}]", "rules[0].direction"},
		{"rules: [{name: a, action: block, protocol: sctp}]", "rules[0].protocol"},
		{"rules: [{name: a, action: block, app: bin/curl}]", "rules[0].app"},
		{"rules: [{name: a, action: block, remote: [10.0.0.0/33]}]", "rules[0].remote[0]"},
		{"rules: [{name: a, action: block, remote: [ok.com, \"bad domain.com\"]}]", "rules[0].remote[1]"},
		{"rules: [{name: a, action: block, user: no-such-user-warden}]", "rules[0].user"},
		{"rules: [{name: a, action: split, protocol: icmp}]", "rules[0].protocol"},
		{"rules: [{name: a, action: allow, via: eth1}]", "rules[0].via"},
		{"split_tunnel: {on_interface_down: panic}", "split_tunnel.on_interface_down"},
		{"control: {socket: relative.sock}", "control.socket"},
		{"metrics: {listen: nowhere}", "metrics.listen"},
		{"log: {format: xml}", "log.format"},
		{"verdict_timeout: soon", "verdict_timeout"},
		{"nfqueue: {queues: 0}", "nfqueue.queues"},
		{"nameserver: {upstreams: [dns.example]}", "nameserver.upstreams[0]"},
		{"rules: [oops", "parsing yaml"},
	}
	for _, c := range cases {
		code, _, errOut := runCLI(t, "check", "-c", writeConfig(t, c.yaml))
		if code != exitUsage {
			t.Errorf("%q: exit %d, want 2", c.yaml, code)
		}
		if !strings.Contains(errOut, c.path) {
			t.Errorf("%q: error does not name %q:\n%s", c.yaml, c.path, errOut)
		}
	}
}
