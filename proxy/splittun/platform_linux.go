package splittun

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"syscall"
	"unsafe"

	"github.com/ti-mo/conntrack"
	"golang.org/x/sys/unix"

	"github.com/warden-fw/warden/backend"
	"github.com/warden-fw/warden/backend/nfqueue/marks"
	"github.com/warden-fw/warden/backend/nfqueue/splitroute"
	"github.com/warden-fw/warden/proxy/netif"
)

// soOriginalDst is SO_ORIGINAL_DST (SOL_IP) and IP6T_SO_ORIGINAL_DST (SOL_IPV6); both are 80.
const soOriginalDst = 80

type linuxPlatform struct {
	log *slog.Logger

	mu sync.Mutex // guards ct; one request at a time keeps netlink replies in order
	ct *conntrack.Conn

	rpMu      sync.Mutex              // guards rpRestore
	rpRestore map[string]func() error // interfaces whose rp_filter was loosened, and how to undo it
}

var _ KernelRouter = (*linuxPlatform)(nil)

func (*linuxPlatform) ResetRoutes() error { return splitroute.Cleanup() }

func (*linuxPlatform) RouteIntact(n uint8, failClosed bool) (bool, error) {
	return splitroute.Intact(n, failClosed)
}

func (*linuxPlatform) WatchRoutes(ctx context.Context, notify func()) error {
	return splitroute.WatchPolicy(ctx, notify)
}

// InstallRoute installs the policy route and loosens strict reverse-path filtering on the interface, which
// would otherwise drop the replies (they arrive on ifc for an address the main table routes elsewhere).
func (p *linuxPlatform) InstallRoute(n uint8, ifc *netif.Interface, failClosed bool) error {
	if err := splitroute.Install(n, ifc.Index, failClosed); err != nil {
		return err
	}
	p.rpMu.Lock()
	defer p.rpMu.Unlock()
	if _, done := p.rpRestore[ifc.Name]; done {
		return nil
	}
	restore, err := splitroute.LoosenRPFilter(ifc.Name)
	if err != nil {
		// Not fatal: most distributions default to loose mode, and a sandboxed service may not write /proc/sys.
		p.log.Warn("split tunnel: could not check or loosen reverse-path filtering; with strict rp_filter the "+
			"replies of split connections are dropped (set net.ipv4.conf."+ifc.Name+".rp_filter=2)", "err", err)
		restore = func() error { return nil }
	}
	if p.rpRestore == nil {
		p.rpRestore = make(map[string]func() error)
	}
	p.rpRestore[ifc.Name] = restore
	return nil
}

func (*linuxPlatform) RemoveRoute(n uint8) error { return splitroute.Remove(n) }

// NewPlatform returns the Linux platform: listens on 127.0.0.17 and ::1, confirms TCP destinations with
// SO_ORIGINAL_DST, resolves UDP flows through conntrack, and binds upstreams with SO_BINDTODEVICE plus SO_MARK
// 1709. Without conntrack access, UDP falls back to the redirect table alone (and is logged).
func NewPlatform(log *slog.Logger) (Platform, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	p := &linuxPlatform{log: log}
	ct, err := conntrack.Dial(nil)
	if err != nil {
		log.Warn("split tunnel: no conntrack access; UDP flows sharing a client socket may be confused", "err", err)
	} else {
		p.ct = ct
	}
	return p, nil
}

func (*linuxPlatform) ListenAddrs(port uint16) []netip.AddrPort { return loopbackListenAddrs(port) }

func (*linuxPlatform) OriginalTCP(c *net.TCPConn) (netip.AddrPort, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("original destination: %w", err)
	}
	v6 := false
	if la, ok := c.LocalAddr().(*net.TCPAddr); ok && la.IP.To4() == nil {
		v6 = true
	}
	var sa unix.RawSockaddrInet6 // large enough for sockaddr_in too
	var serr error
	if err := rc.Control(func(fd uintptr) {
		level := unix.SOL_IP
		if v6 {
			level = unix.SOL_IPV6
		}
		l := uint32(unsafe.Sizeof(sa))
		_, _, e := unix.Syscall6(unix.SYS_GETSOCKOPT, fd, uintptr(level), soOriginalDst,
			uintptr(unsafe.Pointer(&sa)), uintptr(unsafe.Pointer(&l)), 0)
		if e != 0 {
			serr = e
		}
	}); err != nil {
		return netip.AddrPort{}, fmt.Errorf("original destination: %w", err)
	}
	if serr != nil {
		return netip.AddrPort{}, fmt.Errorf("getsockopt SO_ORIGINAL_DST: %w", serr)
	}
	return decodeSockaddr(&sa)
}

// decodeSockaddr reads a sockaddr_in or sockaddr_in6 as the kernel filled it (port in network byte order).
func decodeSockaddr(sa *unix.RawSockaddrInet6) (netip.AddrPort, error) {
	port := uint16(sa.Port>>8) | uint16(sa.Port&0xff)<<8
	switch sa.Family {
	case unix.AF_INET:
		in4 := (*unix.RawSockaddrInet4)(unsafe.Pointer(sa))
		return netip.AddrPortFrom(netip.AddrFrom4(in4.Addr), port), nil
	case unix.AF_INET6:
		return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr).Unmap(), port), nil
	}
	return netip.AddrPort{}, fmt.Errorf("original destination: unexpected address family %d", sa.Family)
}

func (p *linuxPlatform) OriginalFlow(proto backend.Protocol, from, to netip.AddrPort) (netip.AddrPort, netip.AddrPort, error) {
	var ipProto uint8
	switch proto {
	case backend.TCP:
		ipProto = unix.IPPROTO_TCP
	case backend.UDP:
		ipProto = unix.IPPROTO_UDP
	default:
		return netip.AddrPort{}, netip.AddrPort{}, fmt.Errorf("conntrack lookup of %v: %w", proto, backend.ErrUnsupported)
	}
	if p.ct == nil {
		return netip.AddrPort{}, netip.AddrPort{}, fmt.Errorf("conntrack lookup: %w", backend.ErrUnsupported)
	}
	// The proxy sees the flow after DNAT; conntrack's reply tuple is exactly that, reversed.
	q := conntrack.Flow{TupleReply: conntrack.Tuple{
		IP:    conntrack.IPTuple{SourceAddress: to.Addr(), DestinationAddress: from.Addr()},
		Proto: conntrack.ProtoTuple{Protocol: ipProto, SourcePort: to.Port(), DestinationPort: from.Port()},
	}}
	p.mu.Lock()
	f, err := p.ct.Get(q)
	p.mu.Unlock()
	if err != nil {
		return netip.AddrPort{}, netip.AddrPort{}, fmt.Errorf("conntrack lookup of %s -> %s: %w", from, to, err)
	}
	o := f.TupleOrig
	client := netip.AddrPortFrom(o.IP.SourceAddress.Unmap(), o.Proto.SourcePort)
	orig := netip.AddrPortFrom(o.IP.DestinationAddress.Unmap(), o.Proto.DestinationPort)
	return client, orig, nil
}

func (p *linuxPlatform) ForgetUDP(client, original netip.AddrPort) error {
	if p.ct == nil {
		return nil
	}
	f := conntrack.Flow{TupleOrig: conntrack.Tuple{
		IP:    conntrack.IPTuple{SourceAddress: client.Addr(), DestinationAddress: original.Addr()},
		Proto: conntrack.ProtoTuple{Protocol: unix.IPPROTO_UDP, SourcePort: client.Port(), DestinationPort: original.Port()},
	}}
	// The kernel finds the entry by the original tuple alone, but the library takes the message's address
	// family from the reply tuple too: without one an IPv6 delete goes out as IPv4 and fails with EINVAL.
	f.TupleReply = conntrack.Tuple{
		IP:    conntrack.IPTuple{SourceAddress: original.Addr(), DestinationAddress: client.Addr()},
		Proto: conntrack.ProtoTuple{Protocol: unix.IPPROTO_UDP, SourcePort: original.Port(), DestinationPort: client.Port()},
	}
	p.mu.Lock()
	err := p.ct.Delete(f)
	p.mu.Unlock()
	if err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("deleting conntrack entry %s -> %s: %w", client, original, err)
	}
	return nil
}

func (*linuxPlatform) UpstreamControl(ifc *netif.Interface) func(network, address string, c syscall.RawConn) error {
	var dev string
	if ifc != nil {
		dev = ifc.Name
	}
	return func(network, address string, c syscall.RawConn) error {
		if err := marks.ControlOwnSocket(network, address, c); err != nil {
			return err
		}
		if dev == "" {
			return nil
		}
		var serr error
		if err := c.Control(func(fd uintptr) { serr = unix.BindToDevice(int(fd), dev) }); err != nil {
			return err
		}
		if serr != nil {
			return fmt.Errorf("binding upstream socket to %s: %w", dev, serr)
		}
		return nil
	}
}

func (p *linuxPlatform) Close() error {
	p.rpMu.Lock()
	var errs []error
	for _, restore := range p.rpRestore {
		errs = append(errs, restore())
	}
	p.rpRestore = nil
	p.rpMu.Unlock()
	if err := errors.Join(errs...); err != nil {
		p.log.Warn("split tunnel: restoring rp_filter", "err", err)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.ct == nil {
		return nil
	}
	err := p.ct.Close()
	p.ct = nil
	return err
}

// loopbackListenAddrs are the addresses the redirect rules point at, the targets of the Linux DNAT rules.
func loopbackListenAddrs(port uint16) []netip.AddrPort {
	return []netip.AddrPort{
		netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 17}), port),
		netip.AddrPortFrom(netip.IPv6Loopback(), port),
	}
}
