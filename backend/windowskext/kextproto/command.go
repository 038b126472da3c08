// Package kextproto encodes and decodes the byte protocol spoken by the Portmaster kernel driver (kext v2,
// interface version 2.1.x) over its device handle: commands written by user space (one per WriteFile) and the
// info records the driver hands back through ReadFile.
//
// Everything is little-endian and packed. Addresses are in network byte order, ports are host integers encoded
// little-endian. The package has no OS code, so the codec is tested (and fuzzed) on every platform.
package kextproto

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
)

// CommandType is the first byte of every command.
type CommandType uint8

// The commands of kext v2. There is no command above CmdCleanEndedConnections.
const (
	CmdShutdown              CommandType = 0
	CmdVerdict               CommandType = 1
	CmdUpdateV4              CommandType = 2
	CmdUpdateV6              CommandType = 3
	CmdClearCache            CommandType = 4
	CmdGetLogs               CommandType = 5
	CmdGetBandwidthStats     CommandType = 6
	CmdPrintMemoryStats      CommandType = 7
	CmdCleanEndedConnections CommandType = 8
)

// Total sizes of the commands, type byte included. The driver does not check the write length against these
// (it reinterprets the buffer), so they must be exact.
const (
	SimpleCommandSize = 1
	VerdictSize       = 10
	UpdateV4Size      = 15
	UpdateV6Size      = 39
	// MaxCommandSize is the largest command, for callers that keep a reusable buffer.
	MaxCommandSize = UpdateV6Size
)

var commandNames = [...]string{
	CmdShutdown:              "shutdown",
	CmdVerdict:               "verdict",
	CmdUpdateV4:              "update-v4",
	CmdUpdateV6:              "update-v6",
	CmdClearCache:            "clear-cache",
	CmdGetLogs:               "get-logs",
	CmdGetBandwidthStats:     "get-bandwidth-stats",
	CmdPrintMemoryStats:      "print-memory-stats",
	CmdCleanEndedConnections: "clean-ended-connections",
}

// String returns the command's name.
func (t CommandType) String() string {
	if int(t) < len(commandNames) {
		return commandNames[t]
	}
	return fmt.Sprintf("command(%d)", uint8(t))
}

// Size returns the command's total size in bytes, or 0 for an unknown type.
func (t CommandType) Size() int {
	switch t {
	case CmdShutdown, CmdClearCache, CmdGetLogs, CmdGetBandwidthStats, CmdPrintMemoryStats, CmdCleanEndedConnections:
		return SimpleCommandSize
	case CmdVerdict:
		return VerdictSize
	case CmdUpdateV4:
		return UpdateV4Size
	case CmdUpdateV6:
		return UpdateV6Size
	}
	return 0
}

// Verdict is the driver's verdict byte (the kext's KextVerdict).
type Verdict uint8

// The driver's verdicts. The values are the wire format; RerouteToSplitTun is last so that older senders never
// produce it.
const (
	VerdictUndecided           Verdict = 0
	VerdictUndeterminable      Verdict = 1
	VerdictAccept              Verdict = 2
	VerdictPermanentAccept     Verdict = 3
	VerdictBlock               Verdict = 4
	VerdictPermanentBlock      Verdict = 5
	VerdictDrop                Verdict = 6
	VerdictPermanentDrop       Verdict = 7
	VerdictRerouteToNameserver Verdict = 8
	VerdictRerouteToTunnel     Verdict = 9
	VerdictFailed              Verdict = 10
	VerdictRerouteToSplitTun   Verdict = 11
)

var verdictNames = [...]string{
	"undecided", "undeterminable", "accept", "permanent-accept", "block", "permanent-block", "drop",
	"permanent-drop", "reroute-nameserver", "reroute-tunnel", "failed", "reroute-split-tunnel",
}

// String returns the verdict's name.
func (v Verdict) String() string {
	if int(v) < len(verdictNames) {
		return verdictNames[v]
	}
	return fmt.Sprintf("kext-verdict(%d)", uint8(v))
}

// Valid reports whether the driver knows v. The driver silently discards a packet whose verdict it does not
// know, so an invalid value must never be sent.
func (v Verdict) Valid() bool { return v <= VerdictRerouteToSplitTun }

// Errors of the command codec.
var (
	// ErrInvalidVerdict is returned when asked to encode (or when decoding) a verdict the driver does not know.
	ErrInvalidVerdict = errors.New("invalid kext verdict")
	// ErrAddressFamily is returned when an update's addresses are not both IPv4 or both IPv6.
	ErrAddressFamily = errors.New("local and remote address must be both IPv4 or both IPv6")
	// ErrUnknownCommand is returned when decoding a command type the driver does not know.
	ErrUnknownCommand = errors.New("unknown kext command")
	// ErrShortCommand is returned when a command is shorter than its type requires.
	ErrShortCommand = errors.New("kext command too short")
)

// AppendSimple appends a command that has no body (Shutdown, ClearCache, GetLogs, GetBandwidthStats,
// PrintMemoryStats, CleanEndedConnections).
func AppendSimple(dst []byte, t CommandType) ([]byte, error) {
	if t.Size() != SimpleCommandSize {
		return dst, fmt.Errorf("%s is not a command without body: %w", t, ErrUnknownCommand)
	}
	return append(dst, byte(t)), nil
}

// AppendVerdict appends a Verdict command answering the pending packet id.
func AppendVerdict(dst []byte, id uint64, v Verdict) ([]byte, error) {
	if !v.Valid() {
		return dst, fmt.Errorf("verdict %d: %w", uint8(v), ErrInvalidVerdict)
	}
	dst = append(dst, byte(CmdVerdict))
	dst = binary.LittleEndian.AppendUint64(dst, id)
	return append(dst, byte(v)), nil
}

// AppendUpdate appends an UpdateV4 or UpdateV6 command, chosen by the address family, which overwrites the
// driver's cached verdict of a live connection. IPv4-mapped IPv6 addresses are encoded in their 4-byte form:
// the driver's v4 cache would never match them otherwise. The driver looks a connection up by protocol, local
// port and remote address and port; it does not compare the local address.
func AppendUpdate(dst []byte, protocol uint8, local, remote netip.AddrPort, v Verdict) ([]byte, error) {
	if !v.Valid() {
		return dst, fmt.Errorf("verdict %d: %w", uint8(v), ErrInvalidVerdict)
	}
	la, ra := local.Addr().Unmap(), remote.Addr().Unmap()
	switch {
	case la.Is4() && ra.Is4():
		dst = append(dst, byte(CmdUpdateV4), protocol)
		l4, r4 := la.As4(), ra.As4()
		dst = append(dst, l4[:]...)
		dst = binary.LittleEndian.AppendUint16(dst, local.Port())
		dst = append(dst, r4[:]...)
		dst = binary.LittleEndian.AppendUint16(dst, remote.Port())
	case la.Is6() && ra.Is6():
		dst = append(dst, byte(CmdUpdateV6), protocol)
		l6, r6 := la.As16(), ra.As16()
		dst = append(dst, l6[:]...)
		dst = binary.LittleEndian.AppendUint16(dst, local.Port())
		dst = append(dst, r6[:]...)
		dst = binary.LittleEndian.AppendUint16(dst, remote.Port())
	default:
		return dst, fmt.Errorf("update %s -> %s: %w", local, remote, ErrAddressFamily)
	}
	return append(dst, byte(v)), nil
}

// Command is a decoded command. Only the fields of its type are set.
type Command struct {
	Type CommandType
	// ID is the packet id of a Verdict command.
	ID uint64
	// Verdict is the verdict of a Verdict or Update command.
	Verdict Verdict
	// Protocol, Local and Remote identify the connection of an Update command.
	Protocol uint8
	Local    netip.AddrPort
	Remote   netip.AddrPort
}

// AppendCommand appends any command.
func AppendCommand(dst []byte, c *Command) ([]byte, error) {
	switch c.Type {
	case CmdVerdict:
		return AppendVerdict(dst, c.ID, c.Verdict)
	case CmdUpdateV4, CmdUpdateV6:
		la, ra := c.Local.Addr().Unmap(), c.Remote.Addr().Unmap()
		if (c.Type == CmdUpdateV4) != (la.Is4() && ra.Is4()) {
			return dst, fmt.Errorf("%s with %s -> %s: %w", c.Type, c.Local, c.Remote, ErrAddressFamily)
		}
		return AppendUpdate(dst, c.Protocol, c.Local, c.Remote, c.Verdict)
	}
	return AppendSimple(dst, c.Type)
}

// DecodeCommand decodes the command at the start of b and returns it with its size. This is what the driver
// does with a written buffer (the emulator and the tests use it), but stricter: unknown types, short input and
// unknown verdict values are errors. Trailing bytes are left to the caller.
func DecodeCommand(b []byte) (Command, int, error) {
	if len(b) == 0 {
		return Command{}, 0, ErrShortCommand
	}
	t := CommandType(b[0])
	size := t.Size()
	if size == 0 {
		return Command{}, 0, fmt.Errorf("type %d: %w", b[0], ErrUnknownCommand)
	}
	if len(b) < size {
		return Command{}, 0, fmt.Errorf("%s: %d of %d bytes: %w", t, len(b), size, ErrShortCommand)
	}
	c := Command{Type: t}
	switch t {
	case CmdVerdict:
		c.ID = binary.LittleEndian.Uint64(b[1:9])
		c.Verdict = Verdict(b[9])
	case CmdUpdateV4:
		c.Protocol = b[1]
		c.Local = netip.AddrPortFrom(netip.AddrFrom4([4]byte(b[2:6])), binary.LittleEndian.Uint16(b[6:8]))
		c.Remote = netip.AddrPortFrom(netip.AddrFrom4([4]byte(b[8:12])), binary.LittleEndian.Uint16(b[12:14]))
		c.Verdict = Verdict(b[14])
	case CmdUpdateV6:
		c.Protocol = b[1]
		c.Local = netip.AddrPortFrom(netip.AddrFrom16([16]byte(b[2:18])), binary.LittleEndian.Uint16(b[18:20]))
		c.Remote = netip.AddrPortFrom(netip.AddrFrom16([16]byte(b[20:36])), binary.LittleEndian.Uint16(b[36:38]))
		c.Verdict = Verdict(b[38])
	}
	if (t == CmdVerdict || t == CmdUpdateV4 || t == CmdUpdateV6) && !c.Verdict.Valid() {
		return c, size, fmt.Errorf("%s: verdict %d: %w", t, uint8(c.Verdict), ErrInvalidVerdict)
	}
	return c, size, nil
}
