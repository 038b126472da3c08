package main

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"os/user"
	"strconv"
	"strings"

	"github.com/spf13/cobra"

	"github.com/warden-fw/warden/backend"
	"github.com/warden-fw/warden/cmd/internal/control"
	"github.com/warden-fw/warden/cmd/internal/daemon"
	"github.com/warden-fw/warden/config"
	"github.com/warden-fw/warden/firewall"
)

// explainResult is the --json output, exactly as interface.md specifies: the control API's answer.
type explainResult = control.ExplainResult

type explainFlags struct {
	direction, proto, remote, app, user, iface string
	port                                       int
	json, online                               bool
}

func newExplainCmd(g *globals) *cobra.Command {
	f := &explainFlags{}
	cmd := &cobra.Command{
		Use:   "explain",
		Short: "Show which rule decides a hypothetical connection",
		Long: "Show which rule decides a hypothetical connection. Omitted flags mean unknown: a rule that restricts\n" +
			"an unknown field does not match. Offline from the config file (-c), or online from the daemon (--online).",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			q, err := f.query()
			if err != nil {
				return withCode(exitUsage, err)
			}
			var res explainResult
			if f.online {
				ctx, cancel := requestContext()
				defer cancel()
				r, err := g.client().Explain(ctx, q)
				if err != nil {
					return withCode(exitFailure, err)
				}
				res = r
			} else {
				cfg, pol, err := loadConfig(g.configPath)
				if err != nil {
					return err
				}
				res = daemon.ExplainMatch(cfg, pol.Decide(&q))
			}
			out := cmd.OutOrStdout()
			if f.json {
				return json.NewEncoder(out).Encode(res)
			}
			who := "the default"
			if res.Rule != "" {
				who = fmt.Sprintf("rule %q", res.Rule)
			}
			fmt.Fprintf(out, "%s (decided by %s)", res.Action, who)
			if res.Via != "" {
				fmt.Fprintf(out, " via %s", res.Via)
			}
			fmt.Fprintln(out)
			return nil
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&f.direction, "direction", "outbound", "outbound | inbound")
	fl.StringVar(&f.proto, "proto", "", "tcp | udp | icmp (empty: unknown)")
	fl.StringVar(&f.remote, "remote", "", "the other end: an IP address or a domain")
	fl.IntVar(&f.port, "port", 0, "the service port (remote port if outbound, local port if inbound)")
	fl.StringVar(&f.app, "app", "", "the executable's path")
	fl.StringVar(&f.user, "user", "", "user name or numeric uid")
	fl.StringVar(&f.iface, "interface", "", "the interface the connection uses")
	fl.BoolVar(&f.json, "json", false, `print {"action": ..., "rule": ..., "via": ...}`)
	fl.BoolVar(&f.online, "online", false, "ask the running daemon instead of reading the config file")
	return cmd
}

func (f *explainFlags) query() (firewall.Query, error) {
	q := firewall.Query{UID: -1, App: f.app, Interface: f.iface}
	switch f.direction {
	case "outbound", "":
		q.Direction = backend.Outbound
	case "inbound":
		q.Direction = backend.Inbound
	default:
		return q, fmt.Errorf("--direction %q: want outbound or inbound", f.direction)
	}
	switch strings.ToLower(f.proto) {
	case "":
	case "tcp":
		q.Protocol = backend.TCP
	case "udp":
		q.Protocol = backend.UDP
	case "icmp":
		q.Protocol = backend.ICMP
	default:
		return q, fmt.Errorf("--proto %q: want tcp, udp or icmp", f.proto)
	}
	if f.remote != "" {
		if a, err := netip.ParseAddr(f.remote); err == nil {
			q.Remote = a.Unmap()
			if q.Protocol == backend.ICMP && a.Is6() && !a.Is4In6() {
				q.Protocol = backend.ICMPv6
			}
		} else if strings.ContainsAny(f.remote, ":/") || strings.Trim(f.remote, "0123456789.") == "" {
			return q, fmt.Errorf("--remote %q: not an IP address or domain", f.remote)
		} else if d, err := config.NormalizeDomain(f.remote); err != nil {
			return q, fmt.Errorf("--remote %q: not an IP address or domain: %v", f.remote, err)
		} else {
			q.Domain = d
		}
	}
	if f.port < 0 || f.port > 65535 {
		return q, fmt.Errorf("--port %d: not a port (0-65535)", f.port)
	}
	q.ServicePort = uint16(f.port)
	if f.user != "" {
		if uid, err := strconv.ParseUint(f.user, 10, 31); err == nil {
			q.UID = int32(uid)
		} else if u, err := user.Lookup(f.user); err == nil {
			uid, err := strconv.ParseUint(u.Uid, 10, 31)
			if err != nil {
				return q, fmt.Errorf("--user %q: no numeric uid", f.user)
			}
			q.UID = int32(uid)
		} else {
			return q, fmt.Errorf("--user %q: not a known user or numeric uid", f.user)
		}
	}
	return q, nil
}
