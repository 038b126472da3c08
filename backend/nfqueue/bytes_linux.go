package nfqueue

import (
	"bytes"
	"errors"
	"os"
	"sync"

	"github.com/ti-mo/conntrack"
	"github.com/warden-fw/warden/backend"
	"golang.org/x/sys/unix"
)

var _ backend.ByteCounter = (*Backend)(nil)

// acctSysctl says whether conntrack counts packets and bytes per connection (in the reading process's network
// namespace). Warden reads the counters when they are kept but does not turn them on: counting costs every
// packet of every connection on the host a little, and that is the administrator's call.
const acctSysctl = "/proc/sys/net/netfilter/nf_conntrack_acct"

// byteCounter holds the conntrack socket the byte counts are read through, dialled on first use.
type byteCounter struct {
	mu   sync.Mutex
	conn *conntrack.Conn
}

// ConnBytes returns the bytes a connection sent and received, from conntrack's accounting, when the kernel
// keeps it (nf_conntrack_acct) and still tracks the connection. Counts include the IP headers.
func (b *Backend) ConnBytes(k backend.ConnKey) (tx, rx uint64, ok bool) {
	if !k.Protocol.HasPorts() || !k.Local.IsValid() || !k.Remote.IsValid() || !accountingOn() {
		return 0, 0, false
	}
	c := &b.bytes
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.conn == nil {
		conn, err := conntrack.Dial(nil)
		if err != nil {
			return 0, 0, false
		}
		c.conn = conn
	}
	f, err := c.conn.Get(flowFor(k))
	if err != nil {
		if !errors.Is(err, unix.ENOENT) {
			// A socket in an unknown state is not reused.
			c.conn.Close()
			c.conn = nil
		}
		return 0, 0, false
	}
	if f.CountersOrig.Packets == 0 {
		return 0, 0, false // no counters: accounting was off when the connection began
	}
	// The original direction is the one of the connection's first packet: ours for an outbound connection.
	if f.TupleOrig.IP.SourceAddress == k.Local.Addr().Unmap() && f.TupleOrig.Proto.SourcePort == k.Local.Port() {
		return f.CountersOrig.Bytes, f.CountersReply.Bytes, true
	}
	return f.CountersReply.Bytes, f.CountersOrig.Bytes, true
}

// close releases the conntrack socket.
func (c *byteCounter) close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.conn != nil {
		c.conn.Close()
		c.conn = nil
	}
}

// accountingOn reports whether conntrack keeps byte counts in this network namespace.
func accountingOn() bool {
	v, err := os.ReadFile(acctSysctl)
	return err == nil && bytes.Equal(bytes.TrimSpace(v), []byte("1"))
}
