// Package control is Warden's local control API: HTTP+JSON over a root-only Unix socket (a named pipe on
// Windows). The daemon serves it; the CLI's status, conns, explain --online and reload commands use it.
package control

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strconv"
	"time"

	"github.com/warden-fw/warden/backend"
	"github.com/warden-fw/warden/backend/nfqueue/process"
	"github.com/warden-fw/warden/firewall"
	"github.com/warden-fw/warden/proxy/dns"
	"github.com/warden-fw/warden/proxy/splittun"
)

// Status is what `warden status` shows.
type Status struct {
	Version         string          `json:"version"`
	Backend         string          `json:"backend"`
	FailMode        string          `json:"fail_mode"`
	ConfigFile      string          `json:"config_file"`
	ConfigLoadedAt  time.Time       `json:"config_loaded_at"`
	LastReloadError string          `json:"last_reload_error,omitempty"`
	Reloads         uint64          `json:"reloads"`
	ReloadFailures  uint64          `json:"reload_failures"`
	StartedAt       time.Time       `json:"started_at"`
	UptimeSeconds   float64         `json:"uptime_seconds"`
	Pipeline        firewall.Stats  `json:"pipeline"`
	BackendStats    *backend.Stats  `json:"backend_stats,omitempty"`
	SplitTunnel     *splittun.Stats `json:"split_tunnel,omitempty"`
	Nameserver      *dns.Stats      `json:"nameserver,omitempty"`
	// Attribution tells how the Linux process attribution answered (eBPF owner map or /proc).
	Attribution    *process.Stats `json:"attribution,omitempty"`
	ConnLogDropped uint64         `json:"connection_log_dropped"`
}

// ExplainResult is the answer of explain, as interface.md specifies it.
type ExplainResult struct {
	Action string `json:"action"`
	Rule   string `json:"rule"`
	Via    string `json:"via"`
}

// ReloadResult is the answer of a reload.
type ReloadResult struct {
	OK                 bool   `json:"ok"`
	Error              string `json:"error,omitempty"`
	ChangedConnections int    `json:"changed_connections"`
}

// Service is what the daemon offers over the API.
type Service interface {
	Status() Status
	Connections() []firewall.ConnInfo
	Explain(q firewall.Query) ExplainResult
	Reload() (changed int, err error)
}

// Handler serves the API.
func Handler(s Service) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/status", func(w http.ResponseWriter, r *http.Request) { writeJSON(w, http.StatusOK, s.Status()) })
	mux.HandleFunc("GET /v1/conns", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, s.Connections())
	})
	mux.HandleFunc("GET /v1/explain", func(w http.ResponseWriter, r *http.Request) {
		q, err := QueryFromValues(r.URL.Query())
		if err != nil {
			writeJSON(w, http.StatusBadRequest, map[string]string{"error": err.Error()})
			return
		}
		writeJSON(w, http.StatusOK, s.Explain(q))
	})
	mux.HandleFunc("POST /v1/reload", func(w http.ResponseWriter, r *http.Request) {
		n, err := s.Reload()
		if err != nil {
			writeJSON(w, http.StatusUnprocessableEntity, ReloadResult{Error: err.Error()})
			return
		}
		writeJSON(w, http.StatusOK, ReloadResult{OK: true, ChangedConnections: n})
	})
	return mux
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

// QueryValues encodes an explain query for the URL.
func QueryValues(q firewall.Query) url.Values {
	v := url.Values{}
	v.Set("direction", q.Direction.String())
	if q.Protocol != 0 {
		v.Set("proto", strconv.Itoa(int(q.Protocol)))
	}
	if q.Remote.IsValid() {
		v.Set("remote", q.Remote.String())
	}
	if q.Domain != "" {
		v.Set("domain", q.Domain)
	}
	v.Set("port", strconv.Itoa(int(q.ServicePort)))
	if q.App != "" {
		v.Set("app", q.App)
	}
	v.Set("uid", strconv.Itoa(int(q.UID)))
	if q.Interface != "" {
		v.Set("interface", q.Interface)
	}
	return v
}

// QueryFromValues decodes QueryValues' output, validating every field.
func QueryFromValues(v url.Values) (firewall.Query, error) {
	q := firewall.Query{UID: -1, App: v.Get("app"), Interface: v.Get("interface"), Domain: v.Get("domain")}
	switch v.Get("direction") {
	case "", "outbound":
	case "inbound":
		q.Direction = backend.Inbound
	default:
		return q, fmt.Errorf("bad direction %q", v.Get("direction"))
	}
	if s := v.Get("proto"); s != "" {
		n, err := strconv.ParseUint(s, 10, 8)
		if err != nil {
			return q, fmt.Errorf("bad proto %q", s)
		}
		q.Protocol = backend.Protocol(n)
	}
	if s := v.Get("remote"); s != "" {
		a, err := netip.ParseAddr(s)
		if err != nil {
			return q, fmt.Errorf("bad remote %q", s)
		}
		q.Remote = a.Unmap()
	}
	if s := v.Get("port"); s != "" {
		n, err := strconv.ParseUint(s, 10, 16)
		if err != nil {
			return q, fmt.Errorf("bad port %q", s)
		}
		q.ServicePort = uint16(n)
	}
	if s := v.Get("uid"); s != "" {
		n, err := strconv.ParseInt(s, 10, 32)
		if err != nil || n < -1 {
			return q, fmt.Errorf("bad uid %q", s)
		}
		q.UID = int32(n)
	}
	return q, nil
}

// ErrUnreachable means no daemon answered on the control endpoint.
var ErrUnreachable = errors.New("the warden daemon is not reachable")

// Client talks to a running daemon.
type Client struct {
	path string
	http *http.Client
}

// NewClient returns a client for the control endpoint at path.
func NewClient(path string) *Client {
	return &Client{path: path, http: &http.Client{
		Timeout: 30 * time.Second,
		Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return dial(ctx, path)
		}},
	}}
}

func (c *Client) do(ctx context.Context, method, path string, out any) error {
	req, err := http.NewRequestWithContext(ctx, method, "http://warden"+path, nil)
	if err != nil {
		return err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("%w at %s: %v", ErrUnreachable, c.path, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return fmt.Errorf("reading answer: %w", err)
	}
	if resp.StatusCode == http.StatusForbidden {
		return fmt.Errorf("%w: %s", ErrUnreachable, bytes.TrimSpace(body))
	}
	if err := json.Unmarshal(body, out); err != nil {
		return fmt.Errorf("decoding answer (HTTP %d): %w", resp.StatusCode, err)
	}
	if resp.StatusCode >= 400 && resp.StatusCode != http.StatusUnprocessableEntity {
		var e struct{ Error string }
		_ = json.Unmarshal(body, &e)
		return fmt.Errorf("daemon: %s", e.Error)
	}
	return nil
}

// Status asks for the daemon's status.
func (c *Client) Status(ctx context.Context) (Status, error) {
	var s Status
	return s, c.do(ctx, http.MethodGet, "/v1/status", &s)
}

// Connections asks for the live connections.
func (c *Client) Connections(ctx context.Context) ([]firewall.ConnInfo, error) {
	var cs []firewall.ConnInfo
	return cs, c.do(ctx, http.MethodGet, "/v1/conns", &cs)
}

// Explain asks the daemon which rule decides q.
func (c *Client) Explain(ctx context.Context, q firewall.Query) (ExplainResult, error) {
	var r ExplainResult
	return r, c.do(ctx, http.MethodGet, "/v1/explain?"+QueryValues(q).Encode(), &r)
}

// Reload asks the daemon to reload its config. A rejected config is reported in the result, not as err.
func (c *Client) Reload(ctx context.Context) (ReloadResult, error) {
	var r ReloadResult
	return r, c.do(ctx, http.MethodPost, "/v1/reload", &r)
}
