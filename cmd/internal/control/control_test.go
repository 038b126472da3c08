package control

import (
	"context"
	"errors"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"testing"

	"github.com/warden-fw/warden/backend"
	"github.com/warden-fw/warden/firewall"
)

type fakeService struct {
	reloadErr error
	lastQuery firewall.Query
}

func (f *fakeService) Status() Status { return Status{Backend: "fake", FailMode: "closed"} }
func (f *fakeService) Connections() []firewall.ConnInfo {
	return []firewall.ConnInfo{{Protocol: "tcp", Local: "10.0.0.1:1", Remote: "10.0.0.2:80", Verdict: "accept-permanent"}}
}
func (f *fakeService) Explain(q firewall.Query) ExplainResult {
	f.lastQuery = q
	return ExplainResult{Action: "block", Rule: "r"}
}
func (f *fakeService) Reload() (int, error) { return 3, f.reloadErr }

func serve(t *testing.T, s Service) string {
	t.Helper()
	dir := t.TempDir()
	path := filepath.Join(dir, "w.sock")
	ln, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: Handler(s)}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { srv.Close() })
	return path
}

func TestRoundTrip(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("the control socket only answers root")
	}
	fs := &fakeService{}
	c := NewClient(serve(t, fs))
	ctx := context.Background()
	st, err := c.Status(ctx)
	if err != nil || st.Backend != "fake" || st.FailMode != "closed" {
		t.Fatalf("status %+v %v", st, err)
	}
	cs, err := c.Connections(ctx)
	if err != nil || len(cs) != 1 || cs[0].Remote != "10.0.0.2:80" {
		t.Fatalf("conns %+v %v", cs, err)
	}
	q := firewall.Query{Direction: backend.Inbound, Protocol: backend.UDP, Remote: netip.MustParseAddr("2001:db8::1"),
		ServicePort: 53, App: "/usr/bin/x y", UID: 7, Interface: "eth0", Domain: "a.example"}
	r, err := c.Explain(ctx, q)
	if err != nil || r.Action != "block" || fs.lastQuery != q {
		t.Fatalf("explain %+v %v; server saw %+v", r, err, fs.lastQuery)
	}
	rr, err := c.Reload(ctx)
	if err != nil || !rr.OK || rr.ChangedConnections != 3 {
		t.Fatalf("reload %+v %v", rr, err)
	}
	fs.reloadErr = errors.New("rules[0].action: bad")
	rr, err = c.Reload(ctx)
	if err != nil || rr.OK || rr.Error != "rules[0].action: bad" {
		t.Fatalf("rejected reload %+v %v", rr, err)
	}
}

func TestUnreachable(t *testing.T) {
	_, err := NewClient(filepath.Join(t.TempDir(), "none.sock")).Status(context.Background())
	if !errors.Is(err, ErrUnreachable) {
		t.Fatalf("err %v", err)
	}
}

func TestQueryValuesRejectsGarbage(t *testing.T) {
	for _, v := range []map[string][]string{
		{"direction": {"up"}}, {"proto": {"300"}}, {"remote": {"nope"}}, {"port": {"70000"}}, {"uid": {"-5"}},
	} {
		if _, err := QueryFromValues(v); err == nil {
			t.Errorf("%v accepted", v)
		}
	}
}
