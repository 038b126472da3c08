package config

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

const good = `
backend: auto
fail_mode: closed
default_action: block
inbound_default: drop
rules:
  - name: no-telnet
    action: block
    protocol: tcp
    app: /usr/bin/telnet*
    user: root
    remote: [10.0.0.0/8, "2001:db8::/32", example.com, "*.Example.org."]
    ports: [23, "8000-8100"]
    interface: eth0
  - name: split-web
    action: split
    ports: 443
    via: wg0
  - name: ssh-in
    action: allow
    direction: inbound
    ports: [22]
split_tunnel:
  interface: auto
  port: 719
  on_interface_down: direct
metrics:
  listen: 127.0.0.1:9717
log:
  level: debug
  format: json
`

func TestLoadGood(t *testing.T) {
	c, err := LoadBytes([]byte(good), ".yaml", nil)
	if err != nil {
		t.Fatal(err)
	}
	if !c.FailClosed || c.Default != BlockAction || c.InboundDefaultA != DropAction {
		t.Errorf("globals: failClosed=%v default=%v inbound=%v", c.FailClosed, c.Default, c.InboundDefaultA)
	}
	r := c.Rules[0]
	if r.Action != BlockAction || r.Direction != Outbound || r.Protocol != TCP || r.UID != 0 {
		t.Errorf("rule 0 derived fields: %+v", r)
	}
	if diff := cmp.Diff([]string{"example.com", "*.example.org"}, r.Domains); diff != "" {
		t.Errorf("domains (-want +got):\n%s", diff)
	}
	if got := []string{r.Prefixes[0].String(), r.Prefixes[1].String()}; got[0] != "10.0.0.0/8" || got[1] != "2001:db8::/32" {
		t.Errorf("prefixes %v", got)
	}
	if diff := cmp.Diff([]PortRange{{23, 23}, {8000, 8100}}, r.Ports); diff != "" {
		t.Errorf("ports (-want +got):\n%s", diff)
	}
	if s := c.Rules[1]; s.Action != Split || s.Via != "wg0" || len(s.Ports) != 1 || s.Ports[0] != (PortRange{443, 443}) {
		t.Errorf("split rule: %+v", s)
	}
	if c.Rules[2].UID != -1 || c.Rules[2].Direction != Inbound {
		t.Errorf("rule 2: %+v", c.Rules[2])
	}
	if c.SplitTunnel.OnInterfaceDown != "direct" || c.SplitTunnel.MaxSessions != 4096 {
		t.Errorf("split_tunnel: %+v", c.SplitTunnel)
	}
	if c.VerdictTimeout != 3*time.Second || c.Control.Socket != DefaultSocketPath() {
		t.Errorf("defaults: timeout %v socket %q", c.VerdictTimeout, c.Control.Socket)
	}
}

func TestDefaultsOnEmpty(t *testing.T) {
	c, err := LoadBytes(nil, ".yaml", nil)
	if err != nil {
		t.Fatal(err)
	}
	if c.Backend != "auto" || c.FailMode != "open" || c.Default != Allow || c.SplitTunnel.Port != 719 ||
		c.NFQueue.Queues != 2 || c.Log.Level != "info" {
		t.Errorf("defaults: %+v", c)
	}
}

func TestFormats(t *testing.T) {
	toml := "fail_mode = \"closed\"\n[[rules]]\nname = \"x\"\naction = \"drop\"\nports = [53]\n[split_tunnel]\nport = 720\n"
	json := `{"fail_mode": "closed", "rules": [{"name": "x", "action": "drop", "ports": [53]}], "split_tunnel": {"port": 720}}`
	for ext, data := range map[string]string{".toml": toml, ".json": json} {
		c, err := LoadBytes([]byte(data), ext, nil)
		if err != nil {
			t.Fatalf("%s: %v", ext, err)
		}
		if !c.FailClosed || c.SplitTunnel.Port != 720 || c.Rules[0].Action != DropAction || c.Rules[0].Ports[0].Lo != 53 {
			t.Errorf("%s decoded to %+v", ext, c)
		}
	}
	if _, err := LoadBytes([]byte("x"), ".ini", nil); !errors.Is(err, ErrInvalid) {
		t.Errorf("unsupported extension: %v", err)
	}
}

func TestEnvOverrides(t *testing.T) {
	env := []string{"WARDEN_FAIL_MODE=closed", "WARDEN_SPLIT_TUNNEL_PORT=720", "WARDEN_LOG_LEVEL=warn", "HOME=/root"}
	c, err := LoadBytes([]byte("fail_mode: open\n"), ".yaml", env)
	if err != nil {
		t.Fatal(err)
	}
	if !c.FailClosed || c.SplitTunnel.Port != 720 || c.Log.Level != "warn" {
		t.Errorf("env not applied: fail=%v port=%d level=%s", c.FailMode, c.SplitTunnel.Port, c.Log.Level)
	}
	_, err = LoadBytes(nil, ".yaml", []string{"WARDEN_SPLIT_TUNNEL_PORT=70000"})
	assertPaths(t, err, "split_tunnel.port")
}

// TestMalformed checks that each broken config is rejected with an error naming the key path.
func TestMalformed(t *testing.T) {
	tests := []struct {
		name, yaml string
		paths      []string
	}{
		{"unknown top key", "fail_mod: open", []string{"fail_mod"}},
		{"unknown rule key", "rules: [{name: a, action: block, prots: [1]}]", []string{"rules[0].prots"}},
		{"unknown section key", "split_tunnel: {interfac: eth0}", []string{"split_tunnel.interfac"}},
		{"bad backend", "backend: ebpf", []string{"backend"}},
		{"bad fail mode", "fail_mode: maybe", []string{"fail_mode"}},
		{"bad default", "default_action: split", []string{"default_action"}},
		{"bad inbound default", "inbound_default: reject", []string{"inbound_default"}},
		{"port too big", "rules: [{name: a, action: block}, {name: b, action: block}, {name: c, action: block}, {name: d, action: block, ports: [1, \"70000\"]}]", []string{"rules[3].ports[1]"}},
		{"port zero", "rules: [{name: a, action: block, ports: [0]}]", []string{"rules[0].ports[0]"}},
		{"port range reversed", "rules: [{name: a, action: block, ports: [\"9000-8000\"]}]", []string{"rules[0].ports[0]"}},
		{"port word", "rules: [{name: a, action: block, ports: [https]}]", []string{"rules[0].ports[0]"}},
		{"missing name", "rules: [{action: block}]", []string{"rules[0].name"}},
		{"duplicate name", "rules: [{name: a, action: block}, {name: a, action: allow}]", []string{"rules[1].name"}},
		{"missing action", "rules: [{name: a}]", []string{"rules[0].action"}},
		{"bad action", "rules: [{name: a, action: reject}]", []string{"rules[0].action"}},
		{"bad direction", "rules: [{name: a, action: block, direction: sideways}]", []string{"rules[0].direction"}},
		{"bad protocol", "rules: [{name: a, action: block, protocol: sctp}]", []string{"rules[0].protocol"}},
		{"relative app", "rules: [{name: a, action: block, app: bin/curl}]", []string{"rules[0].app"}},
		{"bad cidr", "rules: [{name: a, action: block, remote: [10.0.0.0/33]}]", []string{"rules[0].remote[0]"}},
		{"bad ip", "rules: [{name: a, action: block, remote: [300.1.1.1]}]", []string{"rules[0].remote[0]"}},
		{"bad domain", "rules: [{name: a, action: block, remote: [ok.com, \"bad domain.com\"]}]", []string{"rules[0].remote[1]"}},
		{"unknown user", "rules: [{name: a, action: block, user: no-such-user-warden}]", []string{"rules[0].user"}},
		{"split inbound", "rules: [{name: a, action: split, direction: inbound}]", []string{"rules[0].direction"}},
		{"split icmp", "rules: [{name: a, action: split, protocol: icmp}]", []string{"rules[0].protocol"}},
		{"via without split", "rules: [{name: a, action: allow, via: eth1}]", []string{"rules[0].via"}},
		{"icmp ports", "rules: [{name: a, action: block, protocol: icmp, ports: [1]}]", []string{"rules[0].ports"}},
		{"rules not a list", "rules: {name: a}", []string{"rules"}},
		{"ports a section", "rules: [{name: a, action: block, ports: {a: 1}}]", []string{"rules[0].ports"}},
		{"split port", "split_tunnel: {port: 0}", []string{"split_tunnel.port"}},
		{"split down", "split_tunnel: {on_interface_down: panic}", []string{"split_tunnel.on_interface_down"}},
		{"split mode", "split_tunnel: {mode: tunnel}", []string{"split_tunnel.mode"}},
		{"handoff in route mode", "split_tunnel: {mode: route, kernel_handoff: true}", []string{"split_tunnel.kernel_handoff"}},
		{"bad socket", "control: {socket: relative.sock}", []string{"control.socket"}},
		{"bad metrics", "metrics: {listen: nowhere}", []string{"metrics.listen"}},
		{"bad log level", "log: {level: loud}", []string{"log.level"}},
		{"bad log format", "log: {format: xml}", []string{"log.format"}},
		{"bad duration", "verdict_timeout: soon", []string{"verdict_timeout"}},
		{"bad queues", "nfqueue: {queues: 0}", []string{"nfqueue.queues"}},
		{"section as scalar", "log: verbose", []string{"log"}},
		{"bad nameserver listen", "nameserver: {listen: [localhost]}", []string{"nameserver.listen[0]"}},
		{"bad upstream", "nameserver: {upstreams: [\"1.1.1.1\", dns.example]}", []string{"nameserver.upstreams[1]"}},
		{"bad block response", "nameserver: {block_response: refuse}", []string{"nameserver.block_response"}},
		{"bad enabled", "nameserver: {enabled: maybe}", []string{"nameserver.enabled"}},
		{"several at once", "fail_mode: x\nlog: {level: y}\nrules: [{name: a, action: z}]",
			[]string{"fail_mode", "rules[0].action", "log.level"}},
		// Unknown keys do not hide the other problems: one check lists them all.
		{"unknown keys beside bad values", "bogus: 1\nfail_mode: x\nrules: [{name: a, action: block, portz: [1]}, {name: b, action: alow}]",
			[]string{"bogus", "rules[0].portz", "fail_mode", "rules[1].action"}},
		// A value that cannot be decoded is reported once, not again by the checks of what it would have held.
		{"undecodable rule", "rules: [x]", []string{"rules[0]"}},
		{"undecodable name", "rules: [{name: [1, 2], action: block}]", []string{"rules[0].name"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := LoadBytes([]byte(tt.yaml), ".yaml", nil)
			assertPaths(t, err, tt.paths...)
		})
	}
}

func assertPaths(t *testing.T, err error, paths ...string) {
	t.Helper()
	if err == nil {
		t.Fatalf("config accepted, want errors at %v", paths)
	}
	if !errors.Is(err, ErrInvalid) {
		t.Errorf("error does not wrap ErrInvalid: %v", err)
	}
	var es Errors
	if !errors.As(err, &es) {
		t.Fatalf("error carries no field list: %v", err)
	}
	got := map[string]bool{}
	for _, e := range es {
		got[e.Path] = true
	}
	for _, p := range paths {
		if !got[p] {
			t.Errorf("no error at %s; got:\n%v", p, err)
		}
	}
	if len(es) != len(paths) {
		t.Errorf("got %d errors, want %d:\n%v", len(es), len(paths), err)
	}
}

func TestPortErrorMessage(t *testing.T) {
	_, err := LoadBytes([]byte(`rules: [{name: a, action: block, ports: ["70000"]}]`), ".yaml", nil)
	if err == nil || !strings.Contains(err.Error(), `rules[0].ports[0]: "70000" is not a port (1-65535)`) {
		t.Errorf("message: %v", err)
	}
}

func TestLoadFileAndExample(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "w.yaml")
	if err := os.WriteFile(p, []byte(good), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := Load(p)
	if err != nil {
		t.Fatal(err)
	}
	if c.File != p || c.LoadedAt.IsZero() {
		t.Errorf("file metadata: %q %v", c.File, c.LoadedAt)
	}
	if _, err := Load(filepath.Join(dir, "missing.yaml")); err == nil || errors.Is(err, ErrInvalid) {
		t.Errorf("missing file: %v", err)
	}
	if _, err := Load("../examples/warden.yaml"); err != nil {
		t.Errorf("examples/warden.yaml: %v", err)
	}
}

func TestKeysDocumented(t *testing.T) {
	for _, k := range Keys() {
		if k.Doc == "" && !strings.HasSuffix(k.Path, "]") {
			// Sections have no doc of their own; every leaf must.
			t.Errorf("key %s has no doc tag", k.Path)
		}
	}
}

func TestSocketFromBrokenFile(t *testing.T) {
	p := filepath.Join(t.TempDir(), "w.yaml")
	if err := os.WriteFile(p, []byte("control: {socket: /x/w.sock}\nbogus: 1\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if got := SocketFromFile(p); got != "/x/w.sock" {
		t.Errorf("SocketFromFile = %q", got)
	}
	if got := SocketFromFile(filepath.Join(t.TempDir(), "none.yaml")); got != DefaultSocketPath() {
		t.Errorf("missing file: %q", got)
	}
}
