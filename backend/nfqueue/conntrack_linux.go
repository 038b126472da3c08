package nfqueue

import (
	"errors"
	"fmt"

	"github.com/ti-mo/conntrack"
	"github.com/warden-fw/warden/backend"
	"github.com/warden-fw/warden/backend/nfqueue/marks"
	"golang.org/x/sys/unix"
)

// flowFor builds the conntrack lookup for a connection. The kernel finds an entry by either of its tuples,
// so the tuple as seen from this host (local → remote) finds both outbound connections (it is their original
// tuple, also after DNAT) and inbound ones (it is their reply tuple).
func flowFor(k backend.ConnKey) conntrack.Flow {
	var f conntrack.Flow
	f.TupleOrig.IP.SourceAddress = k.Local.Addr().Unmap()
	f.TupleOrig.IP.DestinationAddress = k.Remote.Addr().Unmap()
	f.TupleOrig.Proto.Protocol = uint8(k.Protocol)
	f.TupleOrig.Proto.SourcePort = k.Local.Port()
	f.TupleOrig.Proto.DestinationPort = k.Remote.Port()
	// The kernel looks up by the first tuple only, but the library picks the message's address family from
	// both: without a reply tuple an IPv6 delete goes out as IPv4 and fails with EINVAL.
	f.TupleReply.IP.SourceAddress = f.TupleOrig.IP.DestinationAddress
	f.TupleReply.IP.DestinationAddress = f.TupleOrig.IP.SourceAddress
	f.TupleReply.Proto.Protocol = f.TupleOrig.Proto.Protocol
	f.TupleReply.Proto.SourcePort = f.TupleOrig.Proto.DestinationPort
	f.TupleReply.Proto.DestinationPort = f.TupleOrig.Proto.SourcePort
	return f
}

// deleteFlows deletes exactly the conntrack entries of the given connections, so their next packet is queued
// again and meets the new decision. Connections without an entry (already gone) are not an error.
func deleteFlows(changes []backend.ConnChange) error {
	if len(changes) == 0 {
		return nil
	}
	c, err := conntrack.Dial(nil)
	if err != nil {
		return fmt.Errorf("dialing conntrack: %w", err)
	}
	defer c.Close()
	var errs []error
	for _, ch := range changes {
		k := ch.Key
		if !k.Protocol.HasPorts() || !k.Local.IsValid() || !k.Remote.IsValid() {
			// ICMP flows are keyed by id/type the key does not carry; they are short-lived anyway.
			continue
		}
		if err := c.Delete(flowFor(k)); err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("deleting conntrack entry of %s: %w", k, err))
		}
	}
	return errors.Join(errs...)
}

// flushMarked deletes every conntrack entry whose connmark is one of Warden's permanent marks: the decisions
// a previous run (or the current one) made, so that they are asked again.
func flushMarked() error {
	c, err := conntrack.Dial(nil)
	if err != nil {
		return fmt.Errorf("dialing conntrack: %w", err)
	}
	defer c.Close()
	var errs []error
	type markMask struct{ mark, mask uint32 }
	all := []markMask{{marks.SplitRouteBase, marks.SplitRouteMask}, {marks.ForeignPending, 0xffffffff}}
	for _, m := range permanentMarks {
		all = append(all, markMask{m, 0xffffffff})
	}
	for _, mm := range all {
		m := mm.mark
		filter := conntrack.NewFilter().Mark(m).MarkMask(mm.mask)
		if err := c.FlushFilter(filter); err != nil {
			// Kernels before filtered flush: dump and delete one by one.
			flows, derr := c.DumpFilter(filter, nil)
			if derr != nil {
				errs = append(errs, fmt.Errorf("flushing conntrack entries with mark %d: %w", m, errors.Join(err, derr)))
				continue
			}
			for _, f := range flows {
				if err := c.Delete(f); err != nil && !errors.Is(err, unix.ENOENT) {
					errs = append(errs, fmt.Errorf("deleting conntrack entry with mark %d: %w", m, err))
				}
			}
		}
	}
	return errors.Join(errs...)
}
