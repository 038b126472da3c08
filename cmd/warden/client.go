package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/warden-fw/warden/cmd/internal/control"
	"github.com/warden-fw/warden/config"
)

// socketPath picks the control endpoint: --socket, else control.socket from the config if it loads, else
// the default.
func (g *globals) controlPath() string {
	if g.socketPath != "" {
		return g.socketPath
	}
	// The config may be the broken one a reload is about to reject: read only the socket key from it.
	return config.SocketFromFile(g.configPath)
}

func (g *globals) client() *control.Client { return control.NewClient(g.controlPath()) }

func requestContext() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), 30*time.Second)
}

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func newStatusCmd(g *globals) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show the running daemon's state and counters",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, cancel := requestContext()
			defer cancel()
			s, err := g.client().Status(ctx)
			if err != nil {
				return withCode(exitFailure, err)
			}
			out := cmd.OutOrStdout()
			if asJSON {
				return printJSON(out, s)
			}
			tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
			fmt.Fprintf(tw, "backend\t%s\n", s.Backend)
			fmt.Fprintf(tw, "fail mode\t%s\n", s.FailMode)
			fmt.Fprintf(tw, "config\t%s (loaded %s)\n", s.ConfigFile, s.ConfigLoadedAt.Format(time.RFC3339))
			if s.LastReloadError != "" {
				// One line: the list of problems follows its heading's colon, then one problem after another.
				msg := strings.ReplaceAll(strings.ReplaceAll(s.LastReloadError, ":\n", ": "), "\n", "; ")
				fmt.Fprintf(tw, "last reload\tREJECTED: %s\n", msg)
			}
			fmt.Fprintf(tw, "uptime\t%s\n", (time.Duration(s.UptimeSeconds) * time.Second).String())
			fmt.Fprintf(tw, "rules\t%d\n", s.Pipeline.Rules)
			fmt.Fprintf(tw, "packets seen\t%d\n", s.Pipeline.Packets)
			fmt.Fprintf(tw, "connections tracked\t%d\n", s.Pipeline.Connections)
			fmt.Fprintf(tw, "connections ended\t%d (the kernel stopped tracking them; %d evicted from a full table)\n",
				s.Pipeline.Ended, s.Pipeline.Evicted)
			kinds := make([]string, 0, len(s.Pipeline.Verdicts))
			for k := range s.Pipeline.Verdicts {
				kinds = append(kinds, k)
			}
			sort.Strings(kinds)
			for _, k := range kinds {
				fmt.Fprintf(tw, "verdicts %s\t%d\n", k, s.Pipeline.Verdicts[k])
			}
			fmt.Fprintf(tw, "decision failures\t%d\n", s.Pipeline.Failures)
			if b := s.BackendStats; b != nil {
				fmt.Fprintf(tw, "queue drops (overruns)\t%d\n", b.QueueOverruns)
				fmt.Fprintf(tw, "verdict timeouts\t%d\n", b.VerdictTimeouts)
			}
			if st := s.SplitTunnel; st != nil {
				state, detail := "down", st.Interface.Interface.Name
				if st.Interface.Up {
					state = "up"
				}
				if st.Interface.Err != "" {
					detail = st.Interface.Err
				}
				fmt.Fprintf(tw, "split tunnel\t%s → %s (%s; when down: %s; mode %s: %d tcp, %d udp routed, %d tcp, %d udp relayed)\n",
					st.Interface.Spec, detail, state, st.OnInterfaceDown, st.Mode, st.TCP.Routed, st.UDP.Routed, st.TCP.Total, st.UDP.Total)
				if st.TCP.HandedOff > 0 {
					fmt.Fprintf(tw, "kernel handoff	%d tcp downloads into the application's socket (%d waits for a full window)\n",
						st.TCP.HandedOff, st.TCP.HandoffWaits)
				}
				if st.TCP.BulkGathers > 0 {
					fmt.Fprintf(tw, "bulk gathering\t%d times a relayed tcp direction gathered a bulk flow\n", st.TCP.BulkGathers)
				}
			}
			if a := s.Attribution; a != nil {
				src := "/proc only"
				if a.EBPF {
					src = "eBPF owner map"
				}
				switch {
				case a.SocketStorage:
					src = fmt.Sprintf("eBPF socket storage, events mirrored in memory (%d sockets, %d lookups answered there, %d events, %d resets)",
						a.MirrorSockets, a.MirrorAnswers, a.MirrorEvents, a.MirrorResets)
				case a.Mirror:
					src = fmt.Sprintf("eBPF maps mirrored in memory (%d sockets, %d lookups without bpf(2), %d resets)",
						a.MirrorSockets, a.MirrorAnswers, a.MirrorResets)
				case a.TupleMap:
					src = "eBPF owner and tuple maps"
				}
				fmt.Fprintf(tw, "process attribution\t%s: %d from the programs' records (%d without a system call, %d without sock_diag, %d on the packet's goroutine), %d from /proc, %d not recorded, %d stale\n",
					src, a.MapAnswers, a.MapFast, a.TupleAnswers, a.Immediate, a.ProcAnswers, a.MapMisses, a.MapStale)
			}
			if ns := s.Nameserver; ns != nil {
				fmt.Fprintf(tw, "nameserver\t%s: %d queries, %d cached, %d blocked, %d failed\n",
					strings.Join(ns.Listen, " "), ns.Queries, ns.CacheHits, ns.Blocked, ns.ServFails)
			}
			return tw.Flush()
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

func newConnsCmd(g *globals) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "conns",
		Short: "List live connections with their verdicts",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, cancel := requestContext()
			defer cancel()
			cs, err := g.client().Connections(ctx)
			if err != nil {
				return withCode(exitFailure, err)
			}
			sort.Slice(cs, func(i, j int) bool { return cs[i].Created < cs[j].Created })
			out := cmd.OutOrStdout()
			if asJSON {
				return printJSON(out, cs)
			}
			tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "PROTO\tDIR\tLOCAL\tREMOTE\tPID\tPROCESS\tUID\tVERDICT\tRULE\tBYTES TX/RX")
			for _, c := range cs {
				pid, uid, app, rule := "-", "-", c.App, c.Rule
				if c.PID >= 0 {
					pid = fmt.Sprint(c.PID)
				}
				if c.UID >= 0 {
					uid = fmt.Sprint(c.UID)
				}
				if app == "" {
					app = "-"
				}
				if rule == "" {
					rule = "(" + c.Source + ")"
				}
				remote := c.Remote
				if c.Domain != "" {
					remote += " (" + c.Domain + ")"
				}
				bytes := "-" // the backend does not count them (Linux: conntrack accounting is off)
				if c.BytesTx != nil && c.BytesRx != nil {
					bytes = fmt.Sprintf("%d/%d", *c.BytesTx, *c.BytesRx)
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", c.Protocol, c.Direction, c.Local, remote,
					pid, app, uid, c.Verdict, rule, bytes)
			}
			return tw.Flush()
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

func newReloadCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "reload",
		Short: "Ask the daemon to reload its config (like SIGHUP)",
		Long:  "Ask the daemon to reload its config. If the new config is invalid it is rejected, the error is printed\nand the running config stays (exit 2).",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, cancel := requestContext()
			defer cancel()
			r, err := g.client().Reload(ctx)
			if err != nil {
				return withCode(exitFailure, err)
			}
			if !r.OK {
				return withCode(exitUsage, fmt.Errorf("reload rejected, the running config stays:\n%s", r.Error))
			}
			fmt.Fprintf(cmd.OutOrStdout(), "reloaded; %d live connection(s) changed verdict\n", r.ChangedConnections)
			return nil
		},
	}
}
