package nfqueue

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// nf_tables netlink constants (linux/netfilter/nfnetlink.h, nf_tables.h).
const (
	nfnlSubsysNFTables = 10
	nftMsgGetGen       = 16
	nftaGenID          = 1
)

// genWatcher reads the nf_tables ruleset generation, which the kernel bumps on every committed change. The
// watcher compares it once per interval and only lists the chains (several iptables executions) when it
// moved, which keeps continuous watching nearly free.
type genWatcher struct {
	c *netlink.Conn
}

func dialGenWatcher() (*genWatcher, error) {
	c, err := netlink.Dial(unix.NETLINK_NETFILTER, nil)
	if err != nil {
		return nil, fmt.Errorf("dialing netfilter netlink: %w", err)
	}
	return &genWatcher{c: c}, nil
}

// generation returns the current ruleset generation.
func (g *genWatcher) generation() (uint32, error) {
	req := netlink.Message{
		Header: netlink.Header{
			Type:  netlink.HeaderType(nfnlSubsysNFTables<<8 | nftMsgGetGen),
			Flags: netlink.Request,
		},
		// struct nfgenmsg: family, version, resource id.
		Data: []byte{unix.AF_UNSPEC, unix.NFNETLINK_V0, 0, 0},
	}
	msgs, err := g.c.Execute(req)
	if err != nil {
		return 0, fmt.Errorf("reading nf_tables generation: %w", err)
	}
	for _, m := range msgs {
		if len(m.Data) < 4 {
			continue
		}
		ad, err := netlink.NewAttributeDecoder(m.Data[4:])
		if err != nil {
			return 0, fmt.Errorf("decoding nf_tables generation: %w", err)
		}
		for ad.Next() {
			if ad.Type() == nftaGenID && len(ad.Bytes()) == 4 {
				return binary.BigEndian.Uint32(ad.Bytes()), nil
			}
		}
	}
	return 0, errors.New("nf_tables generation: no NFTA_GEN_ID in reply")
}

func (g *genWatcher) Close() error { return g.c.Close() }
