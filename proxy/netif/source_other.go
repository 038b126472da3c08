//go:build !linux && !windows

package netif

import (
	"fmt"
	"net"
	"net/netip"
	"runtime"

	"github.com/warden-fw/warden/backend"
)

// SystemSource returns the Source for this host. Off Linux it knows links and addresses (the standard library's
// view) but not routes, so "auto" resolves to an error wrapping backend.ErrUnsupported until an OS-specific
// route source is added.
func SystemSource() Source { return stdSource{} }

type stdSource struct{}

func (stdSource) Links() ([]Link, error) {
	ifs, err := net.Interfaces()
	if err != nil {
		return nil, fmt.Errorf("listing interfaces: %w", err)
	}
	out := make([]Link, 0, len(ifs))
	for _, ifc := range ifs {
		l := Link{
			Index:        ifc.Index,
			Name:         ifc.Name,
			MAC:          ifc.HardwareAddr,
			Up:           ifc.Flags&net.FlagUp != 0 && ifc.Flags&net.FlagRunning != 0,
			Loopback:     ifc.Flags&net.FlagLoopback != 0,
			PointToPoint: ifc.Flags&net.FlagPointToPoint != 0,
		}
		addrs, err := ifc.Addrs()
		if err == nil {
			for _, a := range addrs {
				if n, ok := a.(*net.IPNet); ok {
					if ip, ok := netip.AddrFromSlice(n.IP); ok {
						ones, _ := n.Mask.Size()
						l.Addrs = append(l.Addrs, Addr{Prefix: netip.PrefixFrom(ip.Unmap(), ones)})
					}
				}
			}
		}
		out = append(out, l)
	}
	return out, nil
}

func (stdSource) DefaultRoutes() ([]Route, error) {
	return nil, fmt.Errorf("default routes on %s: %w", runtime.GOOS, backend.ErrUnsupported)
}
