package kextproto

import (
	"encoding/binary"
	"fmt"
	"net/netip"
)

// InfoType is the first byte of every info record the driver sends.
type InfoType uint8

// The info records of kext v2.
const (
	InfoLogLine              InfoType = 0
	InfoConnectionIpv4       InfoType = 1
	InfoConnectionIpv6       InfoType = 2
	InfoConnectionEndEventV4 InfoType = 3
	InfoConnectionEndEventV6 InfoType = 4
	InfoBandwidthStatsV4     InfoType = 5
	InfoBandwidthStatsV6     InfoType = 6
)

var infoNames = [...]string{
	"log-line", "connection-v4", "connection-v6", "connection-end-v4", "connection-end-v6",
	"bandwidth-stats-v4", "bandwidth-stats-v6",
}

// String returns the info type's name.
func (t InfoType) String() string {
	if int(t) < len(infoNames) {
		return infoNames[t]
	}
	return fmt.Sprintf("info(%d)", uint8(t))
}

// IsV6 reports whether records of this type carry IPv6 addresses.
func (t InfoType) IsV6() bool {
	return t == InfoConnectionIpv6 || t == InfoConnectionEndEventV6 || t == InfoBandwidthStatsV6
}

// Wire sizes of the info records.
const (
	// HeaderSize is the size of every record's header: type u8, body length u32.
	HeaderSize = 5

	connV4Fixed     = 35 // body bytes before the payload
	connV6Fixed     = 59
	endV4Size       = 22
	endV6Size       = 46
	bwHeaderSize    = 5
	bwV4EntrySize   = 28
	bwV6EntrySize   = 52
	logHeaderSize   = 1
	maxIPPacketSize = 65535

	// MaxLogLineBody bounds a LogLine body. The driver stops growing a line at about 500 bytes.
	MaxLogLineBody = 1 << 16
	// MaxBandwidthEntries bounds the entries of one bandwidth record (one per live connection of a family
	// and protocol).
	MaxBandwidthEntries = 1 << 20
)

// Log severities of LogLine records.
const (
	SeverityTrace    = 1
	SeverityDebug    = 2
	SeverityInfo     = 3
	SeverityWarning  = 4
	SeverityError    = 5
	SeverityCritical = 6
	SeverityDisabled = 7
)

// Connection is a ConnectionIpv4 or ConnectionIpv6 record: a packet waiting for a verdict.
type Connection struct {
	// ID is the packet id to echo in the Verdict command; it starts at 1, 0 is invalid.
	ID uint64
	// ProcessID is the owning process, 0 when the driver does not know it.
	ProcessID uint64
	// Direction is 0 for outbound; any other value means inbound.
	Direction uint8
	Protocol  uint8
	// Local and Remote are from this host's point of view.
	Local  netip.AddrPort
	Remote netip.AddrPort
	// PayloadLayer is 4 (transport, ALE layer) or 3 (network, IP packet layer).
	PayloadLayer uint8
	// Payload is the packet. From the Decoder it aliases the decoder's buffer: valid until the next call.
	Payload []byte
}

// ConnectionEnd is a ConnectionEndEventV4 or V6 record.
type ConnectionEnd struct {
	ProcessID uint64
	Direction uint8
	Protocol  uint8
	Local     netip.AddrPort
	Remote    netip.AddrPort
}

// LogLine is a line from the driver's log ring buffer.
type LogLine struct {
	Severity uint8
	// Text is UTF-8 without terminator. From the Decoder it aliases the decoder's buffer.
	Text []byte
}

// BandwidthEntry is one connection's byte counts since the previous GetBandwidthStats.
type BandwidthEntry struct {
	Local  netip.AddrPort
	Remote netip.AddrPort
	Tx     uint64
	Rx     uint64
}

// BandwidthStats is a BandwidthStatsV4 or V6 record.
type BandwidthStats struct {
	// Protocol is 6 (TCP) or 17 (UDP).
	Protocol uint8
	// Entries is reused by the Decoder: valid until the next call.
	Entries []BandwidthEntry
}

// Record is one decoded info record. Only the field matching Type is meaningful; from the Decoder, the others
// may hold values of earlier records.
type Record struct {
	Type      InfoType
	Conn      Connection
	End       ConnectionEnd
	Log       LogLine
	Bandwidth BandwidthStats
}

// AppendRecord appends r in the driver's wire format. It is the driver's side of the protocol, used by the
// emulator and the tests.
func AppendRecord(dst []byte, r *Record) ([]byte, error) {
	v6 := r.Type.IsV6()
	var body int
	switch r.Type {
	case InfoLogLine:
		body = logHeaderSize + len(r.Log.Text)
	case InfoConnectionIpv4, InfoConnectionIpv6:
		if err := checkFamily(r.Conn.Local, r.Conn.Remote, v6); err != nil {
			return dst, err
		}
		body = connV4Fixed
		if v6 {
			body = connV6Fixed
		}
		body += len(r.Conn.Payload)
	case InfoConnectionEndEventV4, InfoConnectionEndEventV6:
		if err := checkFamily(r.End.Local, r.End.Remote, v6); err != nil {
			return dst, err
		}
		body = endV4Size
		if v6 {
			body = endV6Size
		}
	case InfoBandwidthStatsV4, InfoBandwidthStatsV6:
		for i := range r.Bandwidth.Entries {
			e := &r.Bandwidth.Entries[i]
			if err := checkFamily(e.Local, e.Remote, v6); err != nil {
				return dst, err
			}
		}
		entry := bwV4EntrySize
		if v6 {
			entry = bwV6EntrySize
		}
		body = bwHeaderSize + entry*len(r.Bandwidth.Entries)
	default:
		return dst, fmt.Errorf("type %d: %w", uint8(r.Type), ErrUnknownInfoType)
	}
	dst = append(dst, byte(r.Type))
	dst = binary.LittleEndian.AppendUint32(dst, uint32(body))
	switch r.Type {
	case InfoLogLine:
		dst = append(dst, r.Log.Severity)
		dst = append(dst, r.Log.Text...)
	case InfoConnectionIpv4, InfoConnectionIpv6:
		c := &r.Conn
		dst = binary.LittleEndian.AppendUint64(dst, c.ID)
		dst = binary.LittleEndian.AppendUint64(dst, c.ProcessID)
		dst = append(dst, c.Direction, c.Protocol)
		dst = appendAddr(dst, c.Local.Addr(), v6)
		dst = appendAddr(dst, c.Remote.Addr(), v6)
		dst = binary.LittleEndian.AppendUint16(dst, c.Local.Port())
		dst = binary.LittleEndian.AppendUint16(dst, c.Remote.Port())
		dst = append(dst, c.PayloadLayer)
		dst = binary.LittleEndian.AppendUint32(dst, uint32(len(c.Payload)))
		dst = append(dst, c.Payload...)
	case InfoConnectionEndEventV4, InfoConnectionEndEventV6:
		e := &r.End
		dst = binary.LittleEndian.AppendUint64(dst, e.ProcessID)
		dst = append(dst, e.Direction, e.Protocol)
		dst = appendAddr(dst, e.Local.Addr(), v6)
		dst = appendAddr(dst, e.Remote.Addr(), v6)
		dst = binary.LittleEndian.AppendUint16(dst, e.Local.Port())
		dst = binary.LittleEndian.AppendUint16(dst, e.Remote.Port())
	case InfoBandwidthStatsV4, InfoBandwidthStatsV6:
		s := &r.Bandwidth
		dst = append(dst, s.Protocol)
		dst = binary.LittleEndian.AppendUint32(dst, uint32(len(s.Entries)))
		for i := range s.Entries {
			e := &s.Entries[i]
			dst = appendAddr(dst, e.Local.Addr(), v6)
			dst = binary.LittleEndian.AppendUint16(dst, e.Local.Port())
			dst = appendAddr(dst, e.Remote.Addr(), v6)
			dst = binary.LittleEndian.AppendUint16(dst, e.Remote.Port())
			dst = binary.LittleEndian.AppendUint64(dst, e.Tx)
			dst = binary.LittleEndian.AppendUint64(dst, e.Rx)
		}
	}
	return dst, nil
}

// checkFamily reports whether the addresses fit a record of the family: 16-byte addresses (IPv4-mapped ones
// included, the driver may send those) for v6, IPv4 in either form for v4.
func checkFamily(local, remote netip.AddrPort, v6 bool) error {
	la, ra := local.Addr(), remote.Addr()
	if v6 {
		if la.Is6() && ra.Is6() {
			return nil
		}
	} else if la.Unmap().Is4() && ra.Unmap().Is4() {
		return nil
	}
	return fmt.Errorf("%s -> %s in a v6=%t record: %w", local, remote, v6, ErrAddressFamily)
}

func appendAddr(dst []byte, a netip.Addr, v6 bool) []byte {
	if v6 {
		b := a.As16()
		return append(dst, b[:]...)
	}
	b := a.Unmap().As4()
	return append(dst, b[:]...)
}
