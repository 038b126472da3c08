package nfqread

import (
	"encoding/binary"

	"github.com/warden-fw/warden/backend/nfqueue/nlwire"
)

// Config is what Bind sets on a queue.
type Config struct {
	Queue uint16
	// CopyRange is how many bytes of each packet the kernel copies to user space.
	CopyRange uint32
	// MaxQueueLen bounds the packets waiting for a verdict; beyond it the kernel drops (or, with the fail-open
	// flag, accepts) them.
	MaxQueueLen uint32
	// Flags are NFQA_CFG_F_* flags (fail open, GSO, UID/GID, ...), all set with their mask.
	Flags uint32
}

// Config attributes and commands (linux/netfilter/nfnetlink_queue.h).
const (
	attrCfgCmd     = 1
	attrCfgParams  = 2
	attrCfgMaxLen  = 3
	attrCfgMask    = 4
	attrCfgFlags   = 5
	cfgCmdBind     = 1
	copyModePacket = 2
)

// ConfigMessages returns the bodies (nfgenmsg and attributes, without the netlink header) of the config
// messages that bind queue cfg.Queue to the socket and set its parameters, in the order they must be sent,
// and the netlink message type they are sent with. The queue takes both address families (AF_UNSPEC).
func ConfigMessages(cfg Config) (msgType uint16, bodies [][]byte) {
	be, ne := binary.BigEndian, binary.NativeEndian
	hdr := func() []byte {
		b := make([]byte, nlwire.NfgenHdrLen, 64)
		be.PutUint16(b[2:], cfg.Queue) // family AF_UNSPEC, version 0, resource id = queue
		return b
	}
	attr := func(b []byte, typ uint16, v []byte) []byte {
		var h [4]byte
		ne.PutUint16(h[0:], uint16(4+len(v)))
		ne.PutUint16(h[2:], typ)
		b = append(append(b, h[:]...), v...)
		for len(b)%4 != 0 {
			b = append(b, 0)
		}
		return b
	}
	u32 := func(v uint32) []byte { return be.AppendUint32(nil, v) }

	// struct nfqnl_msg_config_cmd {__u8 command; __u8 _pad; __be16 pf;}
	bind := attr(hdr(), attrCfgCmd, []byte{cfgCmdBind, 0, 0, 0})
	// struct nfqnl_msg_config_params {__be32 copy_range; __u8 copy_mode;} (packed: 5 bytes)
	params := attr(hdr(), attrCfgParams, append(u32(cfg.CopyRange), copyModePacket))
	opts := attr(hdr(), attrCfgMaxLen, u32(cfg.MaxQueueLen))
	if cfg.Flags != 0 {
		opts = attr(opts, attrCfgMask, u32(cfg.Flags))
		opts = attr(opts, attrCfgFlags, u32(cfg.Flags))
	}
	return nfnlSubsysQ<<8 | nfqnlMsgConf, [][]byte{bind, params, opts}
}
