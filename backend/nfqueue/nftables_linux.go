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
	nftMsgGetRule      = 7
	nftMsgGetGen       = 16

	nftaGenID = 1

	nftaRuleTable       = 1
	nftaRuleChain       = 2
	nftaRuleExpressions = 4

	nftaListElem = 1

	nftaExprName = 1
	nftaExprData = 2

	nftaImmediateData = 2
	nftaDataVerdict   = 2
	nftaVerdictCode   = 1
	nftaVerdictChain  = 2

	nftJump = 0xfffffffd // NFT_JUMP, -3 as a big-endian u32

	nfprotoIPv4 = 2  // NFPROTO_IPV4
	nfprotoIPv6 = 10 // NFPROTO_IPV6
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

// nfnlgrpNFTables is NFNLGRP_NFTABLES, the netlink group on which the kernel announces every committed
// nf_tables change (linux/netfilter/nfnetlink.h).
const nfnlgrpNFTables = 7

// notifyChanges subscribes to the kernel's announcements of nf_tables changes (any program's, in this
// network namespace) and signals wake, without blocking, after each; the watcher then checks at once
// instead of at its next tick. A lost announcement (the socket's buffer overran) signals too. The returned
// function ends the subscription. An error means the watcher must poll.
func notifyChanges(wake chan<- struct{}) (stop func(), err error) {
	c, err := netlink.Dial(unix.NETLINK_NETFILTER, &netlink.Config{Groups: 1 << (nfnlgrpNFTables - 1)})
	if err != nil {
		return nil, fmt.Errorf("subscribing to nf_tables changes: %w", err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			_, err := c.Receive()
			if err != nil && !errors.Is(err, unix.ENOBUFS) {
				return // closed, or broken: the ticker still checks
			}
			select {
			case wake <- struct{}{}:
			default:
			}
		}
	}()
	return func() {
		c.Close()
		<-done
	}, nil
}

// Reading a chain's rules from nf_tables directly. Checking with iptables that the jumps are still first takes
// one iptables process per chain and family (12 with IPv6), each of which reads the whole rule set: about
// 130 ms of CPU, at the watcher's first check and after every change another program makes. One netlink dump
// per chain answers the same question in well under a millisecond. It only answers "all in place"; anything
// else goes to enforceFirst, which lists with iptables and repairs.

// chainJumps returns, for each rule of chain in table (nf_tables family nfproto), in order, the chain it
// jumps to when it is a plain jump (`-j CHAIN`, or `-m connmark ... -j CHAIN`: an immediate jump and nothing
// but counters and connmark matches), and "" for any other rule.
func (g *genWatcher) chainJumps(nfproto uint8, table, chain string) ([]string, error) {
	ae := netlink.NewAttributeEncoder()
	ae.String(nftaRuleTable, table)
	ae.String(nftaRuleChain, chain)
	attrs, err := ae.Encode()
	if err != nil {
		return nil, err
	}
	msgs, err := g.c.Execute(netlink.Message{
		Header: netlink.Header{
			Type:  netlink.HeaderType(nfnlSubsysNFTables<<8 | nftMsgGetRule),
			Flags: netlink.Request | netlink.Dump,
		},
		Data: append([]byte{nfproto, unix.NFNETLINK_V0, 0, 0}, attrs...),
	})
	if err != nil {
		return nil, fmt.Errorf("dumping nf_tables %s %s: %w", table, chain, err)
	}
	jumps := make([]string, 0, len(msgs))
	for _, m := range msgs {
		if len(m.Data) < 4 {
			return nil, errors.New("short nf_tables rule message")
		}
		target, err := plainJump(m.Data[4:])
		if err != nil {
			return nil, fmt.Errorf("decoding a rule of %s %s: %w", table, chain, err)
		}
		jumps = append(jumps, target)
	}
	return jumps, nil
}

// plainJump decodes one rule's attributes: the chain it jumps to if it is a plain jump, else "".
func plainJump(b []byte) (string, error) {
	ad, err := netlink.NewAttributeDecoder(b)
	if err != nil {
		return "", err
	}
	target := ""
	for ad.Next() {
		if ad.Type() != nftaRuleExpressions {
			continue
		}
		ad.Nested(func(list *netlink.AttributeDecoder) error {
			for list.Next() {
				if list.Type() != nftaListElem {
					continue
				}
				var name string
				var data []byte
				list.Nested(func(e *netlink.AttributeDecoder) error {
					for e.Next() {
						switch e.Type() {
						case nftaExprName:
							name = e.String()
						case nftaExprData:
							data = e.Bytes()
						}
					}
					return nil
				})
				switch name {
				case "counter":
				case "match":
					// Our jumps skip packets by connmark (see jumpRule.Unless); iptables-nft renders `-m connmark`
					// as an xtables match. Which mark is ours to choose: this only asks where the jump is.
					if m, err := matchName(data); err != nil || m != "connmark" {
						return errNotPlain
					}
				case "immediate":
					if target != "" {
						return errNotPlain
					}
					t, err := immediateJump(data)
					if err != nil {
						return err
					}
					if t == "" {
						return errNotPlain
					}
					target = t
				default:
					return errNotPlain
				}
			}
			return nil
		})
	}
	if err := ad.Err(); err != nil {
		if errors.Is(err, errNotPlain) {
			return "", nil
		}
		return "", err
	}
	return target, nil
}

var errNotPlain = errors.New("not a plain jump")

// nftaMatchName is NFTA_MATCH_NAME, the xtables match's name in a compat match expression.
const nftaMatchName = 1

// matchName decodes a compat match expression's data: the xtables match's name.
func matchName(b []byte) (string, error) {
	ad, err := netlink.NewAttributeDecoder(b)
	if err != nil {
		return "", err
	}
	name := ""
	for ad.Next() {
		if ad.Type() == nftaMatchName {
			name = ad.String()
		}
	}
	return name, ad.Err()
}

// immediateJump decodes an immediate expression's data: the chain of a jump verdict, else "".
func immediateJump(b []byte) (string, error) {
	ad, err := netlink.NewAttributeDecoder(b)
	if err != nil {
		return "", err
	}
	var code uint32
	var chain string
	for ad.Next() {
		if ad.Type() != nftaImmediateData {
			continue
		}
		ad.Nested(func(d *netlink.AttributeDecoder) error {
			for d.Next() {
				if d.Type() != nftaDataVerdict {
					continue
				}
				d.Nested(func(v *netlink.AttributeDecoder) error {
					for v.Next() {
						switch v.Type() {
						case nftaVerdictCode:
							if len(v.Bytes()) == 4 {
								code = binary.BigEndian.Uint32(v.Bytes())
							}
						case nftaVerdictChain:
							chain = v.String()
						}
					}
					return nil
				})
			}
			return nil
		})
	}
	if err := ad.Err(); err != nil {
		return "", err
	}
	if code != nftJump {
		return "", nil
	}
	return chain, nil
}

// jumpsFirst reports whether every jump is the first rule of its chain and the only plain jump there to its
// target, reading the chains through g. False means "look closer" (enforceFirst), not that a jump is gone.
func (fw *firewall) jumpsFirst(g *genWatcher) (bool, error) {
	fw.mu.Lock()
	defer fw.mu.Unlock()
	for _, f := range fw.fams {
		proto := uint8(nfprotoIPv4)
		if f.name == "ipv6" {
			proto = nfprotoIPv6
		}
		// Our own chains hold their rules (see enforceChains); a chain that is gone fails the dump.
		for _, c := range f.chains {
			rules, err := g.chainJumps(proto, c.Table, c.Chain)
			if err != nil {
				return false, err
			}
			if len(rules) != len(c.Rules) {
				return false, nil
			}
		}
		for _, j := range f.jumps {
			jumps, err := g.chainJumps(proto, j.Table, j.Builtin)
			if err != nil {
				return false, err
			}
			if len(jumps) == 0 || jumps[0] != j.Target {
				return false, nil
			}
			for _, t := range jumps[1:] {
				if t == j.Target {
					return false, nil
				}
			}
		}
	}
	return true, nil
}
