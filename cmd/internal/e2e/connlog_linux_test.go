package e2e

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/warden-fw/warden/cmd/internal/control"
	"github.com/warden-fw/warden/cmd/internal/sandbox"
)

// logLine is one line of the connection log, with every field it must have.
type logLine struct {
	Time      *time.Time `json:"time"`
	Protocol  *string    `json:"protocol"`
	Direction *string    `json:"direction"`
	Local     *string    `json:"local"`
	Remote    *string    `json:"remote"`
	PID       *int32     `json:"pid"`
	App       string     `json:"app"` // optional: absent when the process is unknown
	UID       *int32     `json:"uid"`
	Verdict   *string    `json:"verdict"`
	Rule      *string    `json:"rule"`
	Source    *string    `json:"source"`
}

// readLog parses the connection log at path; every line must be a complete JSON object with all fields.
func readLog(t *testing.T, path string) []logLine {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		if os.IsNotExist(err) {
			return nil
		}
		t.Fatal(err)
	}
	var out []logLine
	for _, l := range strings.Split(strings.TrimSuffix(string(b), "\n"), "\n") {
		if l == "" {
			continue
		}
		var ll logLine
		dec := json.NewDecoder(strings.NewReader(l))
		if err := dec.Decode(&ll); err != nil {
			t.Fatalf("connection log line %q: %v", l, err)
		}
		if ll.Time == nil || ll.Protocol == nil || ll.Direction == nil || ll.Local == nil || ll.Remote == nil ||
			ll.PID == nil || ll.UID == nil || ll.Verdict == nil || ll.Rule == nil || ll.Source == nil {
			t.Errorf("connection log line lacks a field: %s", l)
			continue
		}
		out = append(out, ll)
	}
	return out
}

// find returns the log lines of the connection local → remote.
func find(lines []logLine, proto, local, remote string) []logLine {
	var out []logLine
	for _, l := range lines {
		if *l.Protocol == proto && *l.Local == local && *l.Remote == remote {
			out = append(out, l)
		}
	}
	return out
}

// waitLog polls the log until cond holds, for at most 10 seconds.
func waitLog(t *testing.T, path, what string, cond func([]logLine) bool) []logLine {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		lines := readLog(t, path)
		if cond(lines) {
			return lines
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(path)
			t.Fatalf("timed out waiting for %s in the connection log:\n%s", what, b)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestConnectionLog: one JSON line per decided connection, with its fields; after the file is moved away and
// the daemon gets SIGHUP, new lines go to a new file at the original path.
func TestConnectionLog(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	logPath := filepath.Join(e.dir, "log", "connections.jsonl")
	if err := os.MkdirAll(filepath.Dir(logPath), 0o700); err != nil {
		t.Fatal(err)
	}
	e.writeConfig(noTelnet + "log:\n  connections: " + logPath + "\n")
	d := e.startDaemon()

	allowed := call(t, e.client, tcpReq(hp(sandbox.ServiceV4, 80)))
	expectServer(t, "allowed", allowed, "A")
	blocked := call(t, e.client, sandbox.Request{Op: "tcp", Dst: hp(sandbox.ServiceV6, 23), Src: "[" + sandbox.ClientAV6.String() + "]:40123"})
	expectOutcome(t, "blocked", blocked, sandbox.Refused)
	blockedLocal := "[" + sandbox.ClientAV6.String() + "]:40123"
	udp := call(t, e.client, udpReq(hp(sandbox.ServiceV4, 4000)))
	expectServer(t, "udp", udp, "A")

	lines := waitLog(t, logPath, "the three connections", func(ls []logLine) bool {
		return len(find(ls, "tcp", allowed.Local, allowed.Peer)) > 0 && len(find(ls, "tcp", blockedLocal, hp(sandbox.ServiceV6, 23))) > 0 &&
			len(find(ls, "udp", udp.Local, udp.Peer)) > 0
	})
	for _, c := range []struct {
		what, proto, local, remote, verdict, rule, source string
	}{
		{"allowed", "tcp", allowed.Local, allowed.Peer, "accept-permanent", "", "default"},
		{"blocked", "tcp", blockedLocal, hp(sandbox.ServiceV6, 23), "block-permanent", "no-telnet", "rule"},
		{"udp", "udp", udp.Local, udp.Peer, "accept-permanent", "", "default"},
	} {
		got := find(lines, c.proto, c.local, c.remote)
		if len(got) != 1 {
			t.Errorf("%s: %d log lines, want exactly 1", c.what, len(got))
			continue
		}
		l := got[0]
		if *l.Direction != "outbound" || *l.Verdict != c.verdict || *l.Rule != c.rule || *l.Source != c.source || *l.UID != 0 ||
			time.Since(*l.Time) > time.Minute {
			t.Errorf("%s: log line %+v; want outbound, verdict %s, rule %q, source %s, uid 0, recent", c.what,
				map[string]any{"direction": *l.Direction, "verdict": *l.Verdict, "rule": *l.Rule, "source": *l.Source,
					"uid": *l.UID, "time": *l.Time}, c.verdict, c.rule, c.source)
		}
	}
	// One line per decided connection: as many lines as the daemon tracks connections, none twice.
	lines = waitLog(t, logPath, "a line for every tracked connection", func(ls []logLine) bool { return len(ls) == len(e.conns()) })
	seen := map[string]bool{}
	for _, l := range lines {
		k := *l.Protocol + " " + *l.Local + " " + *l.Remote + " " + *l.Direction
		if seen[k] {
			t.Errorf("connection logged twice: %s", k)
		}
		seen[k] = true
	}

	// Rotation: move the file away, SIGHUP, and the next connection lands in a new file at the old path.
	rotated := logPath + ".1"
	if err := os.Rename(logPath, rotated); err != nil {
		t.Fatal(err)
	}
	if err := d.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	e.waitStatus("the SIGHUP reload", func(st control.Status) bool { return st.Reloads == 1 })
	after := call(t, e.client, tcpReq(hp(sandbox.ServiceV4Alt, 80)))
	expectServer(t, "after rotation", after, "A")
	waitLog(t, logPath, "the connection made after rotation", func(ls []logLine) bool {
		return len(find(ls, "tcp", after.Local, after.Peer)) == 1
	})
	if old := readLog(t, rotated); len(find(old, "tcp", after.Local, after.Peer)) != 0 {
		t.Error("the connection made after rotation went to the rotated file")
	} else if len(find(old, "tcp", allowed.Local, allowed.Peer)) != 1 {
		t.Error("the rotated file lost its lines")
	}
	if st := e.status(); st.ConnLogDropped != 0 {
		t.Errorf("connection_log_dropped = %d", st.ConnLogDropped)
	}
}
