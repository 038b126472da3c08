package splitroute

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net"
	"os"
	"strconv"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/warden-fw/warden/backend/nfqueue/marks"
	"github.com/warden-fw/warden/backend/rtnlwatch"
)

// families are the address families every route is installed for.
var families = []int{netlink.FAMILY_V4, netlink.FAMILY_V6}

func defaultDst(family int) *net.IPNet {
	if family == netlink.FAMILY_V6 {
		return &net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}
	}
	return &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}
}

func checkRoute(n uint8) error {
	if n < 1 || n > marks.SplitRoutes {
		return fmt.Errorf("split route %d out of range 1..%d", n, marks.SplitRoutes)
	}
	return nil
}

// Install makes route n carry marked packets out of the link with index ifindex, for IPv4 and IPv6: the
// route's table gets a default route through the link (via the gateway of the link's default route in the
// main table, or on-link when it has none) and an ip rule sends the route's mark to that table. With
// failClosed the table also holds an unreachable default of the lowest priority, so that while the link's
// route is gone (the link went down) the packets fail instead of falling through to the main table. Install
// replaces whatever route n had before, in place (a replaced route never leaves the table empty, so no packet
// slips through to the main table meanwhile); it is idempotent.
func Install(n uint8, ifindex int, failClosed bool) error {
	if err := checkRoute(n); err != nil {
		return err
	}
	table := int(marks.SplitRoute(n))
	var errs []error
	for _, fam := range families {
		if fam == netlink.FAMILY_V6 && ipv6Off() {
			continue
		}
		r := netlink.Route{LinkIndex: ifindex, Table: table, Dst: defaultDst(fam), Family: fam, Scope: netlink.SCOPE_LINK}
		if gw := gatewayOf(fam, ifindex); gw != nil {
			r.Gw, r.Scope = gw, netlink.SCOPE_UNIVERSE
		}
		if err := netlink.RouteReplace(&r); err != nil {
			errs = append(errs, fmt.Errorf("split route %d: default route (family %d) through link %d: %w", n, fam, ifindex, err))
		}
		if failClosed {
			u := netlink.Route{Table: table, Dst: defaultDst(fam), Family: fam, Type: unix.RTN_UNREACHABLE, Priority: math.MaxUint32}
			if err := netlink.RouteReplace(&u); err != nil {
				errs = append(errs, fmt.Errorf("split route %d: unreachable default (family %d): %w", n, fam, err))
			}
		}
		// Whatever else the table holds is from before: another link, or the unreachable route of a
		// fail-closed install when this one is not.
		if err := pruneTable(fam, table, ifindex, failClosed); err != nil {
			errs = append(errs, err)
		}
		if err := addRule(fam, n); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// pruneTable deletes the routes of one family in table other than the default through ifindex and, with
// keepUnreachable, the unreachable default.
func pruneTable(fam, table, ifindex int, keepUnreachable bool) error {
	routes, err := netlink.RouteListFiltered(fam, &netlink.Route{Table: table}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return fmt.Errorf("listing routes of table %d: %w", table, err)
	}
	var errs []error
	for i := range routes {
		r := &routes[i]
		switch {
		case r.Type == unix.RTN_UNREACHABLE && keepUnreachable:
			continue
		case r.Type != unix.RTN_UNREACHABLE && r.LinkIndex == ifindex:
			continue
		}
		if err := netlink.RouteDel(r); err != nil && !errors.Is(err, unix.ESRCH) {
			errs = append(errs, fmt.Errorf("deleting a stale route of table %d: %w", table, err))
		}
	}
	return errors.Join(errs...)
}

// gatewayOf returns the gateway of the link's best default route in the main table, or nil.
func gatewayOf(fam, ifindex int) net.IP {
	routes, err := netlink.RouteListFiltered(fam, &netlink.Route{Table: unix.RT_TABLE_MAIN, LinkIndex: ifindex},
		netlink.RT_FILTER_TABLE|netlink.RT_FILTER_OIF)
	if err != nil {
		return nil
	}
	var best *netlink.Route
	for i := range routes {
		r := &routes[i]
		if r.Gw == nil || (r.Dst != nil && !isDefault(r.Dst)) {
			continue
		}
		if best == nil || r.Priority < best.Priority {
			best = r
		}
	}
	if best == nil {
		return nil
	}
	return best.Gw
}

func isDefault(n *net.IPNet) bool {
	ones, _ := n.Mask.Size()
	return ones == 0
}

func rule(fam int, n uint8) *netlink.Rule {
	m := marks.SplitRoute(n)
	r := netlink.NewRule()
	r.Family = fam
	r.Mark = m
	mask := uint32(math.MaxUint32)
	r.Mask = &mask
	r.Table = int(m)
	r.Priority = int(m)
	return r
}

func addRule(fam int, n uint8) error {
	if err := netlink.RuleAdd(rule(fam, n)); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("split route %d: ip rule (family %d): %w", n, fam, err)
	}
	return nil
}

// Intact reports whether route n's ip rules are in place for every family and, with failClosed, its
// unreachable defaults: the parts whose loss lets the route's packets fall through to the main table, out of
// the default interface. (The default route through the link is the kernel's to remove when the link goes
// down; the proxy follows the link's state for that.)
func Intact(n uint8, failClosed bool) (bool, error) {
	if err := checkRoute(n); err != nil {
		return false, err
	}
	m := marks.SplitRoute(n)
	for _, fam := range families {
		if fam == netlink.FAMILY_V6 && ipv6Off() {
			continue
		}
		rules, err := netlink.RuleListFiltered(fam, rule(fam, n), netlink.RT_FILTER_TABLE)
		if err != nil {
			return false, fmt.Errorf("split route %d: listing ip rules (family %d): %w", n, fam, err)
		}
		found := false
		for i := range rules {
			if rules[i].Mark == m && rules[i].Table == int(m) {
				found = true
			}
		}
		if !found {
			return false, nil
		}
		if !failClosed {
			continue
		}
		routes, err := netlink.RouteListFiltered(fam, &netlink.Route{Table: int(m)}, netlink.RT_FILTER_TABLE)
		if err != nil {
			return false, fmt.Errorf("split route %d: listing table %d (family %d): %w", n, m, fam, err)
		}
		found = false
		for i := range routes {
			if routes[i].Type == unix.RTN_UNREACHABLE {
				found = true
			}
		}
		if !found {
			return false, nil
		}
	}
	return true, nil
}

// WatchPolicy calls notify after every change to the ip rules or routes (IPv4 and IPv6) of the calling
// thread's network namespace, until ctx ends: the route guard then checks at once instead of at its next
// tick.
func WatchPolicy(ctx context.Context, notify func()) error {
	return rtnlwatch.Watch(ctx, unix.RTMGRP_IPV4_RULE|rtnlwatch.GroupIPv6Rule|unix.RTMGRP_IPV4_ROUTE|
		unix.RTMGRP_IPV6_ROUTE, notify)
}

// flushTable deletes every route of one family in table.
func flushTable(fam, table int) error {
	routes, err := netlink.RouteListFiltered(fam, &netlink.Route{Table: table}, netlink.RT_FILTER_TABLE)
	if err != nil {
		if fam == netlink.FAMILY_V6 && ipv6Off() {
			return nil
		}
		return fmt.Errorf("listing routes of table %d: %w", table, err)
	}
	var errs []error
	for i := range routes {
		if err := netlink.RouteDel(&routes[i]); err != nil && !errors.Is(err, unix.ESRCH) {
			errs = append(errs, fmt.Errorf("deleting a route of table %d: %w", table, err))
		}
	}
	return errors.Join(errs...)
}

// Remove deletes route n's ip rules and table contents. It is idempotent.
func Remove(n uint8) error {
	if err := checkRoute(n); err != nil {
		return err
	}
	var errs []error
	for _, fam := range families {
		for range 4 { // duplicates a crashed run may have left; bounded
			if err := netlink.RuleDel(rule(fam, n)); err != nil {
				if !errors.Is(err, unix.ENOENT) && !(fam == netlink.FAMILY_V6 && ipv6Off()) {
					errs = append(errs, fmt.Errorf("split route %d: deleting ip rule (family %d): %w", n, fam, err))
				}
				break
			}
		}
		if err := flushTable(fam, int(marks.SplitRoute(n))); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Cleanup removes every route's rules and tables: what a crashed run may have left.
func Cleanup() error {
	var errs []error
	for n := uint8(1); n <= marks.SplitRoutes; n++ {
		errs = append(errs, Remove(n))
	}
	return errors.Join(errs...)
}

func ipv6Off() bool {
	_, err := os.Stat("/proc/sys/net/ipv6")
	return err != nil
}

// LoosenRPFilter makes reverse-path filtering on the link loose (2) when it is strict (1) there, and returns
// a function that puts the old value back. Replies of a kernel-routed split connection arrive on the split
// interface for an address the main table routes elsewhere; strict filtering would drop them. The effective
// value is the maximum of "all" and the link's own, so raising the link's alone suffices.
func LoosenRPFilter(dev string) (restore func() error, err error) {
	read := func(name string) (int, error) {
		b, err := os.ReadFile("/proc/sys/net/ipv4/conf/" + name + "/rp_filter")
		if err != nil {
			return 0, err
		}
		return strconv.Atoi(strings.TrimSpace(string(b)))
	}
	if strings.ContainsAny(dev, "/.") || dev == "" {
		return nil, fmt.Errorf("rp_filter: bad interface name %q", dev)
	}
	all, err := read("all")
	if err != nil {
		return nil, fmt.Errorf("rp_filter: %w", err)
	}
	own, err := read(dev)
	if err != nil {
		return nil, fmt.Errorf("rp_filter: %w", err)
	}
	if max(all, own) != 1 {
		return func() error { return nil }, nil
	}
	path := "/proc/sys/net/ipv4/conf/" + dev + "/rp_filter"
	if err := os.WriteFile(path, []byte("2"), 0); err != nil {
		return nil, fmt.Errorf("rp_filter: loosening %s: %w", dev, err)
	}
	return func() error {
		if err := os.WriteFile(path, []byte(strconv.Itoa(own)), 0); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("rp_filter: restoring %s: %w", dev, err)
		}
		return nil
	}, nil
}
