package netif

import (
	"context"
	"fmt"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/warden-fw/warden/backend/rtnlwatch"
)

// SystemSource returns the Source for this host: rtnetlink in the network namespace of the calling thread when
// it runs. Run it in the namespace it should observe (a child process, in tests).
func SystemSource() Source { return netlinkSource{} }

type netlinkSource struct{}

var _ Watcher = netlinkSource{}

func (netlinkSource) Links() ([]Link, error) {
	nls, err := netlink.LinkList()
	if err != nil {
		return nil, fmt.Errorf("netlink link list: %w", err)
	}
	addrs, err := netlink.AddrList(nil, netlink.FAMILY_ALL)
	if err != nil {
		return nil, fmt.Errorf("netlink address list: %w", err)
	}
	byIndex := make(map[int][]Addr)
	for _, a := range addrs {
		if a.IPNet == nil {
			continue
		}
		ip, ok := netip.AddrFromSlice(a.IP)
		if !ok {
			continue
		}
		ones, _ := a.Mask.Size()
		byIndex[a.LinkIndex] = append(byIndex[a.LinkIndex], Addr{
			Prefix:   netip.PrefixFrom(ip.Unmap(), ones),
			Unusable: a.Flags&(unix.IFA_F_TENTATIVE|unix.IFA_F_DEPRECATED|unix.IFA_F_DADFAILED) != 0,
		})
	}
	out := make([]Link, 0, len(nls))
	for _, nl := range nls {
		at := nl.Attrs()
		out = append(out, Link{
			Index: at.Index,
			Name:  at.Name,
			Kind:  nl.Type(),
			Encap: at.EncapType,
			MAC:   at.HardwareAddr,
			// IFF_RUNNING is the carrier: a veth whose peer is down, or an unplugged cable, is not usable.
			Up:           at.RawFlags&unix.IFF_UP != 0 && at.RawFlags&unix.IFF_RUNNING != 0,
			Loopback:     at.RawFlags&unix.IFF_LOOPBACK != 0,
			PointToPoint: at.RawFlags&unix.IFF_POINTOPOINT != 0,
			Addrs:        byIndex[at.Index],
		})
	}
	return out, nil
}

func (netlinkSource) DefaultRoutes() ([]Route, error) {
	// Every table, not only main: a physical NIC's default route may sit in a policy table.
	rs, err := netlink.RouteListFiltered(netlink.FAMILY_ALL, &netlink.Route{Table: unix.RT_TABLE_UNSPEC},
		netlink.RT_FILTER_TABLE)
	if err != nil {
		return nil, fmt.Errorf("netlink route list: %w", err)
	}
	var out []Route
	for _, r := range rs {
		if r.Type != unix.RTN_UNICAST || r.Table == unix.RT_TABLE_LOCAL {
			continue
		}
		if r.Dst != nil {
			if ones, _ := r.Dst.Mask.Size(); ones != 0 {
				continue
			}
		}
		v6 := r.Family == unix.AF_INET6
		if r.LinkIndex != 0 {
			out = append(out, Route{LinkIndex: r.LinkIndex, Metric: r.Priority, V6: v6, Table: r.Table})
		}
		for _, nh := range r.MultiPath {
			out = append(out, Route{LinkIndex: nh.LinkIndex, Metric: r.Priority, V6: v6, Table: r.Table})
		}
	}
	return out, nil
}

// Watch subscribes to rtnetlink's link, address and route groups and calls notify for every message. It only
// needs to know that something changed; the Resolver re-reads the full state.
func (netlinkSource) Watch(ctx context.Context, notify func()) error {
	return rtnlwatch.Watch(ctx, unix.RTMGRP_LINK|unix.RTMGRP_IPV4_IFADDR|unix.RTMGRP_IPV6_IFADDR|
		unix.RTMGRP_IPV4_ROUTE|unix.RTMGRP_IPV6_ROUTE, notify)
}
