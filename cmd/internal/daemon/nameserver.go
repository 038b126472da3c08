package daemon

import (
	"context"
	"fmt"
	"net/netip"

	"github.com/warden-fw/warden/config"
	"github.com/warden-fw/warden/firewall"
	"github.com/warden-fw/warden/proxy/dns"
)

// startNameserver starts the local nameserver. A failure is fatal only when some rule names domains (they
// would silently never match); otherwise the daemon runs on without DNS rerouting and says so.
func (d *Daemon) startNameserver(ctx context.Context, cfg *config.Config, pol *firewall.Policy) error {
	if !cfg.Nameserver.Enabled {
		if pol.NeedsDomain {
			d.log.Warn("domain rules will not match on live traffic: nameserver.enabled is false")
		}
		return nil
	}
	nc := dns.Config{
		Listen: cfg.Nameserver.Listen, Upstreams: cfg.Nameserver.Upstreams,
		BlockResponse: cfg.Nameserver.BlockResponse, CacheSize: cfg.Nameserver.CacheSize,
		Timeout: cfg.Nameserver.Timeout, Control: ownSocketControl(),
	}
	srv, err := dns.New(nc, pol, d.log)
	if err == nil {
		err = srv.Start(ctx)
	}
	if err != nil {
		if pol.NeedsDomain {
			return fmt.Errorf("nameserver (needed by domain rules): %w", err)
		}
		d.log.Warn("nameserver unavailable; applications' DNS is not rerouted", "err", err)
		return nil
	}
	d.dns = srv
	d.closers = append(d.closers, srv.Close)
	for _, l := range cfg.Nameserver.Listen {
		if ap, err := netip.ParseAddrPort(l); err == nil {
			d.nsAddrs = append(d.nsAddrs, ap)
		}
	}
	return nil // the server logs where it listens
}
