package nfqread

import (
	"fmt"

	"github.com/mdlayher/netlink"
)

// Bind binds queue cfg.Queue to the socket c and configures it, each step acknowledged by the kernel. A queue
// another socket holds fails with EBUSY.
func Bind(c *netlink.Conn, cfg Config) error {
	typ, bodies := ConfigMessages(cfg)
	for i, body := range bodies {
		m := netlink.Message{
			Header: netlink.Header{Type: netlink.HeaderType(typ), Flags: netlink.Request | netlink.Acknowledge},
			Data:   body,
		}
		if _, err := c.Execute(m); err != nil {
			return fmt.Errorf("configuring queue %d (step %d): %w", cfg.Queue, i+1, err)
		}
	}
	return nil
}
