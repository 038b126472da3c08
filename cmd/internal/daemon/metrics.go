package daemon

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/warden-fw/warden/proxy/splittun"

	"github.com/warden-fw/warden/backend"
	"github.com/warden-fw/warden/config"
	"github.com/warden-fw/warden/firewall"
)

// metrics holds what is observed as it happens (latency, reloads); everything else is read from the
// components' own counters when Prometheus scrapes, so the hot path pays nothing extra for metrics.
type metrics struct {
	reg     *prometheus.Registry
	latency prometheus.Histogram
	reloads *prometheus.CounterVec
	decided *prometheus.CounterVec
	// decidedBy caches decided's counters by (decision, source), read without a lock: WithLabelValues would
	// format the decision (an allocation), hash both labels and take a read lock for every new connection.
	// The set is small and stops growing after the first connections, so a miss copies the map.
	decidedBy atomic.Pointer[map[decidedKey]prometheus.Counter]
	decidedMu sync.Mutex // serialises misses
	srv       *http.Server
	listener  net.Listener
}

type decidedKey struct {
	decision backend.Decision
	source   string
}

func newMetrics() *metrics {
	m := &metrics{
		reg: prometheus.NewRegistry(),
		latency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "warden_decision_latency_seconds", Help: "Time from a new connection's first packet to its verdict.",
			Buckets: prometheus.ExponentialBuckets(1e-6, 4, 12),
		}),
		reloads: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "warden_config_reloads_total", Help: "Config reloads by result (ok, rejected).",
		}, []string{"result"}),
		decided: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "warden_connections_decided_total", Help: "Newly decided connections by verdict and deciding source.",
		}, []string{"verdict", "source"}),
	}
	m.reg.MustRegister(m.latency, m.reloads, m.decided)
	m.decidedBy.Store(&map[decidedKey]prometheus.Counter{})
	return m
}

func (m *metrics) observeDecision(c *firewall.Conn, took time.Duration) {
	m.latency.Observe(took.Seconds())
	_, _, source := c.Rule()
	m.decidedCounter(c.Decision(), source).Inc()
}

func (m *metrics) decidedCounter(d backend.Decision, source string) prometheus.Counter {
	k := decidedKey{d, source}
	if c, ok := (*m.decidedBy.Load())[k]; ok {
		return c
	}
	m.decidedMu.Lock()
	defer m.decidedMu.Unlock()
	cur := *m.decidedBy.Load()
	if c, ok := cur[k]; ok {
		return c
	}
	next := maps.Clone(cur)
	c := m.decided.WithLabelValues(d.String(), source)
	next[k] = c
	m.decidedBy.Store(&next)
	return c
}

// collector exports the pipeline's, backend's and proxy's counters at scrape time.
type collector struct{ d *Daemon }

var (
	descPackets     = prometheus.NewDesc("warden_packets_total", "Packets handed to the pipeline by the backend.", nil, nil)
	descVerdicts    = prometheus.NewDesc("warden_verdicts_total", "Verdicts applied, by verdict.", []string{"verdict"}, nil)
	descFailures    = prometheus.NewDesc("warden_decision_failures_total", "Packets answered with the fail-mode verdict because deciding failed.", nil, nil)
	descConns       = prometheus.NewDesc("warden_tracked_connections", "Connections in the connection table.", nil, nil)
	descEnded       = prometheus.NewDesc("warden_connections_ended_total", "Tracked connections forgotten because the kernel stopped tracking them.", nil, nil)
	descOverruns    = prometheus.NewDesc("warden_queue_overruns_total", "Packets the kernel could not queue to Warden.", nil, nil)
	descTimeouts    = prometheus.NewDesc("warden_verdict_timeouts_total", "Packets answered with the fail-mode verdict after the verdict timeout.", nil, nil)
	descQueued      = prometheus.NewDesc("warden_packets_queued_total", "Packets received from the kernel.", nil, nil)
	descProxyActive = prometheus.NewDesc("warden_proxy_sessions", "Active split-tunnel proxy sessions.", []string{"protocol"}, nil)
	descProxyTotal  = prometheus.NewDesc("warden_proxy_sessions_total", "Split-tunnel proxy sessions since start.", []string{"protocol"}, nil)
	descProxyBytes  = prometheus.NewDesc("warden_proxy_bytes_total", "Bytes relayed by the split-tunnel proxy.", []string{"protocol", "direction"}, nil)
	descSplitRouted = prometheus.NewDesc("warden_split_routed_total", "Split connections (tcp) and flows (udp) carried by kernel routing.", []string{"protocol"}, nil)
	descHandedOff   = prometheus.NewDesc("warden_split_handed_off_total", "Proxied TCP connections whose downloads went into the application's socket in the kernel (split_tunnel.kernel_handoff).", nil, nil)
	descGathers     = prometheus.NewDesc("warden_split_bulk_gathers_total", "Times a proxied TCP direction started gathering a bulk flow (the relay then wakes once per large piece).", nil, nil)
	descIfaceUp     = prometheus.NewDesc("warden_split_interface_up", "Whether the split-tunnel interface is up.", nil, nil)
)

func (c collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descPackets, descVerdicts, descFailures, descConns, descEnded,
		descOverruns, descTimeouts, descQueued, descProxyActive, descProxyTotal, descProxyBytes, descIfaceUp, descSplitRouted, descHandedOff, descGathers} {
		ch <- d
	}
}

func (c collector) Collect(ch chan<- prometheus.Metric) {
	st := c.d.pipeline.Stats()
	ch <- prometheus.MustNewConstMetric(descPackets, prometheus.CounterValue, float64(st.Packets))
	for v, n := range st.Verdicts {
		ch <- prometheus.MustNewConstMetric(descVerdicts, prometheus.CounterValue, float64(n), v)
	}
	ch <- prometheus.MustNewConstMetric(descFailures, prometheus.CounterValue, float64(st.Failures))
	ch <- prometheus.MustNewConstMetric(descConns, prometheus.GaugeValue, float64(st.Connections))
	ch <- prometheus.MustNewConstMetric(descEnded, prometheus.CounterValue, float64(st.Ended))
	if sr, ok := c.d.backend.(backend.StatsReporter); ok {
		bs := sr.Stats()
		ch <- prometheus.MustNewConstMetric(descOverruns, prometheus.CounterValue, float64(bs.QueueOverruns))
		ch <- prometheus.MustNewConstMetric(descTimeouts, prometheus.CounterValue, float64(bs.VerdictTimeouts))
		ch <- prometheus.MustNewConstMetric(descQueued, prometheus.CounterValue, float64(bs.Packets))
	}
	if c.d.proxy != nil {
		ps := c.d.proxy.Stats()
		for proto, s := range map[string]splittun.ProtoStats{"tcp": ps.TCP, "udp": ps.UDP} {
			ch <- prometheus.MustNewConstMetric(descProxyActive, prometheus.GaugeValue, float64(s.Active), proto)
			ch <- prometheus.MustNewConstMetric(descProxyTotal, prometheus.CounterValue, float64(s.Total), proto)
			ch <- prometheus.MustNewConstMetric(descProxyBytes, prometheus.CounterValue, float64(s.BytesOut), proto, "out")
			ch <- prometheus.MustNewConstMetric(descProxyBytes, prometheus.CounterValue, float64(s.BytesIn), proto, "in")
			ch <- prometheus.MustNewConstMetric(descSplitRouted, prometheus.CounterValue, float64(s.Routed), proto)
		}
		ch <- prometheus.MustNewConstMetric(descHandedOff, prometheus.CounterValue, float64(ps.TCP.HandedOff))
		ch <- prometheus.MustNewConstMetric(descGathers, prometheus.CounterValue, float64(ps.TCP.BulkGathers))
		up := 0.0
		if ps.Interface.Up {
			up = 1
		}
		ch <- prometheus.MustNewConstMetric(descIfaceUp, prometheus.GaugeValue, up)
	}
}

func (d *Daemon) startMetrics(cfg *config.Config) error {
	if cfg.Metrics.Listen == "" {
		return nil
	}
	d.metrics.reg.MustRegister(collector{d})
	ln, err := net.Listen("tcp", cfg.Metrics.Listen)
	if err != nil {
		return fmt.Errorf("metrics listener: %w", err)
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(d.metrics.reg, promhttp.HandlerOpts{}))
	d.metrics.srv = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	d.metrics.listener = ln
	go func() {
		if err := d.metrics.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			d.log.Error("metrics server", "err", err)
		}
	}()
	d.closers = append(d.closers, func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		return d.metrics.srv.Shutdown(ctx)
	})
	d.log.Info("metrics listening", "addr", ln.Addr().String())
	return nil
}
