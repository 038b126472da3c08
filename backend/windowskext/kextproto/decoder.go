package kextproto

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net/netip"
)

// Errors reported for one malformed or unknown record. The decoder has skipped the record when it returns them,
// so the caller may go on calling Next.
var (
	// ErrUnexpectedInfoSize means a record's declared length does not fit its type.
	ErrUnexpectedInfoSize = errors.New("unexpected kext info size")
	// ErrUnknownInfoType means the record's type is not one of kext v2's.
	ErrUnknownInfoType = errors.New("unknown kext info type")
)

// RecordError describes a record the decoder skipped. It wraps ErrUnexpectedInfoSize or ErrUnknownInfoType.
type RecordError struct {
	// Offset is the record's position in the stream.
	Offset int64
	Type   InfoType
	// Length is the declared body length.
	Length uint32
	Reason string
	Err    error
}

// Error implements error.
func (e *RecordError) Error() string {
	return fmt.Sprintf("kext info %s at offset %d (body %d bytes): %s: %v", e.Type, e.Offset, e.Length, e.Reason, e.Err)
}

// Unwrap returns the sentinel error.
func (e *RecordError) Unwrap() error { return e.Err }

// DefaultBufferSize is the read size of a Decoder made with a size of 0: large enough for a burst of infos in
// one ReadFile (the upstream user space reads 1 KiB at a time).
const DefaultBufferSize = 64 << 10

// maxEmptyReads bounds consecutive (0, nil) reads before the decoder gives up with io.ErrNoProgress.
const maxEmptyReads = 100

// Decoder reads info records from the driver's byte stream. Records may be split across reads and several may
// arrive in one read; the decoder reads as much as its buffer holds and splits them.
//
// Each record's declared length is checked against its type before the body is read, and the decoder always
// consumes exactly header plus declared length, so a malformed record never desynchronises the stream: it is
// reported as a *RecordError and skipped.
//
// The returned record and every slice in it (payload, log text, bandwidth entries) are reused: they are valid
// until the next call to Next. A Decoder is not safe for concurrent use.
type Decoder struct {
	r          io.Reader
	buf        []byte
	start, end int   // unread bytes are buf[start:end]
	off        int64 // stream offset of buf[start]
	err        error // sticky error from r
	rec        Record
}

// NewDecoder returns a decoder reading r with a buffer of bufSize bytes (DefaultBufferSize if bufSize <= 0).
// The buffer grows only for a record larger than itself.
func NewDecoder(r io.Reader, bufSize int) *Decoder {
	if bufSize <= 0 {
		bufSize = DefaultBufferSize
	}
	if bufSize < HeaderSize {
		bufSize = HeaderSize
	}
	return &Decoder{r: r, buf: make([]byte, bufSize)}
}

// Offset returns how many bytes of the stream have been consumed: the position of the next record.
func (d *Decoder) Offset() int64 { return d.off }

// Next returns the next record. It returns io.EOF at a clean end of the stream, an error wrapping
// io.ErrUnexpectedEOF when the stream ends inside a record, the reader's error when reading fails (all of
// these end the stream), or a *RecordError for a skipped record (the stream goes on). Exactly one of the
// results is non-nil.
func (d *Decoder) Next() (*Record, error) {
	if err := d.fill(HeaderSize); err != nil {
		if err == io.EOF && d.start == d.end {
			return nil, io.EOF
		}
		return nil, d.streamErr(err)
	}
	typ := InfoType(d.buf[d.start])
	length := binary.LittleEndian.Uint32(d.buf[d.start+1 : d.start+HeaderSize])

	// Decide from the header alone whether the body can be valid, so that a bad length is never used to size
	// a read: a rejected body is discarded in buffer-sized pieces.
	if reason, sentinel := checkLength(typ, length); sentinel != nil {
		e := &RecordError{Offset: d.off, Type: typ, Length: length, Reason: reason, Err: sentinel}
		d.consume(HeaderSize)
		if err := d.discard(uint64(length)); err != nil {
			return nil, d.streamErr(err)
		}
		return nil, e
	}

	total := HeaderSize + int(length)
	if err := d.fill(total); err != nil {
		return nil, d.streamErr(err)
	}
	body := d.buf[d.start+HeaderSize : d.start+total]
	off := d.off
	d.consume(total)
	if reason := d.parse(typ, body); reason != "" {
		return nil, &RecordError{Offset: off, Type: typ, Length: length, Reason: reason, Err: ErrUnexpectedInfoSize}
	}
	return &d.rec, nil
}

// checkLength validates a declared body length against the type's layout.
func checkLength(t InfoType, n uint32) (string, error) {
	switch t {
	case InfoLogLine:
		if n < logHeaderSize || n > MaxLogLineBody {
			return "log line length out of range", ErrUnexpectedInfoSize
		}
	case InfoConnectionIpv4:
		if n < connV4Fixed || n > connV4Fixed+maxIPPacketSize {
			return "connection length out of range", ErrUnexpectedInfoSize
		}
	case InfoConnectionIpv6:
		if n < connV6Fixed || n > connV6Fixed+maxIPPacketSize {
			return "connection length out of range", ErrUnexpectedInfoSize
		}
	case InfoConnectionEndEventV4:
		if n != endV4Size {
			return "end event length is not 22", ErrUnexpectedInfoSize
		}
	case InfoConnectionEndEventV6:
		if n != endV6Size {
			return "end event length is not 46", ErrUnexpectedInfoSize
		}
	case InfoBandwidthStatsV4, InfoBandwidthStatsV6:
		entry := uint32(bwV4EntrySize)
		if t == InfoBandwidthStatsV6 {
			entry = bwV6EntrySize
		}
		if n < bwHeaderSize || (n-bwHeaderSize)%entry != 0 || (n-bwHeaderSize)/entry > MaxBandwidthEntries {
			return "bandwidth stats length is not a whole number of entries", ErrUnexpectedInfoSize
		}
	default:
		return "skipped", ErrUnknownInfoType
	}
	return "", nil
}

// parse decodes a body whose length checkLength accepted into d.rec. It returns a reason when the body's
// own length fields disagree with the declared length.
func (d *Decoder) parse(t InfoType, b []byte) string {
	r := &d.rec
	r.Type = t
	le := binary.LittleEndian
	switch t {
	case InfoLogLine:
		r.Log = LogLine{Severity: b[0], Text: b[1:]}
	case InfoConnectionIpv4, InfoConnectionIpv6:
		c := &r.Conn
		c.ID = le.Uint64(b[0:8])
		c.ProcessID = le.Uint64(b[8:16])
		c.Direction = b[16]
		c.Protocol = b[17]
		var lport, rport int
		var la, ra netip.Addr
		fixed := connV4Fixed
		if t == InfoConnectionIpv4 {
			la, ra = netip.AddrFrom4([4]byte(b[18:22])), netip.AddrFrom4([4]byte(b[22:26]))
			lport, rport = 26, 28
		} else {
			la, ra = netip.AddrFrom16([16]byte(b[18:34])), netip.AddrFrom16([16]byte(b[34:50]))
			lport, rport = 50, 52
			fixed = connV6Fixed
		}
		c.Local = netip.AddrPortFrom(la, le.Uint16(b[lport:]))
		c.Remote = netip.AddrPortFrom(ra, le.Uint16(b[rport:]))
		c.PayloadLayer = b[fixed-5]
		if n := le.Uint32(b[fixed-4 : fixed]); uint64(n) != uint64(len(b)-fixed) {
			return fmt.Sprintf("payload length %d does not match the %d bytes left", n, len(b)-fixed)
		}
		c.Payload = b[fixed:]
	case InfoConnectionEndEventV4, InfoConnectionEndEventV6:
		e := &r.End
		e.ProcessID = le.Uint64(b[0:8])
		e.Direction = b[8]
		e.Protocol = b[9]
		if t == InfoConnectionEndEventV4 {
			e.Local = netip.AddrPortFrom(netip.AddrFrom4([4]byte(b[10:14])), le.Uint16(b[18:20]))
			e.Remote = netip.AddrPortFrom(netip.AddrFrom4([4]byte(b[14:18])), le.Uint16(b[20:22]))
		} else {
			e.Local = netip.AddrPortFrom(netip.AddrFrom16([16]byte(b[10:26])), le.Uint16(b[42:44]))
			e.Remote = netip.AddrPortFrom(netip.AddrFrom16([16]byte(b[26:42])), le.Uint16(b[44:46]))
		}
	case InfoBandwidthStatsV4, InfoBandwidthStatsV6:
		s := &r.Bandwidth
		s.Protocol = b[0]
		count := le.Uint32(b[1:5])
		size := bwV4EntrySize
		if t == InfoBandwidthStatsV6 {
			size = bwV6EntrySize
		}
		n := (len(b) - bwHeaderSize) / size
		if uint64(count) != uint64(n) {
			return fmt.Sprintf("entry count %d does not match the %d entries' bytes", count, n)
		}
		if cap(s.Entries) < n {
			s.Entries = make([]BandwidthEntry, n)
		}
		s.Entries = s.Entries[:n]
		for i := range s.Entries {
			p := b[bwHeaderSize+i*size : bwHeaderSize+(i+1)*size]
			e := &s.Entries[i]
			if t == InfoBandwidthStatsV4 {
				e.Local = netip.AddrPortFrom(netip.AddrFrom4([4]byte(p[0:4])), le.Uint16(p[4:6]))
				e.Remote = netip.AddrPortFrom(netip.AddrFrom4([4]byte(p[6:10])), le.Uint16(p[10:12]))
				e.Tx, e.Rx = le.Uint64(p[12:20]), le.Uint64(p[20:28])
			} else {
				e.Local = netip.AddrPortFrom(netip.AddrFrom16([16]byte(p[0:16])), le.Uint16(p[16:18]))
				e.Remote = netip.AddrPortFrom(netip.AddrFrom16([16]byte(p[18:34])), le.Uint16(p[34:36]))
				e.Tx, e.Rx = le.Uint64(p[36:44]), le.Uint64(p[44:52])
			}
		}
	}
	return ""
}

// fill makes at least n bytes available in buf[start:end], compacting or growing the buffer as needed.
func (d *Decoder) fill(n int) error {
	empty := 0
	for d.end-d.start < n {
		if d.err != nil {
			return d.err
		}
		if d.start > 0 && (len(d.buf)-d.start < n || len(d.buf)-d.end < len(d.buf)/2) {
			// Move the unread bytes to the front, so each read gets at least half the buffer: the driver
			// fills a read with as many records as fit.
			d.end = copy(d.buf, d.buf[d.start:d.end])
			d.start = 0
		}
		if len(d.buf) < n {
			nb := make([]byte, max(n, 2*len(d.buf)))
			d.end = copy(nb, d.buf[d.start:d.end])
			d.buf = nb
			d.start = 0
		}
		m, err := d.r.Read(d.buf[d.end:])
		if m < 0 || m > len(d.buf)-d.end {
			d.err = fmt.Errorf("reader returned an invalid count %d", m)
			continue
		}
		d.end += m
		if err != nil {
			d.err = err
		} else if m == 0 {
			if empty++; empty >= maxEmptyReads {
				d.err = io.ErrNoProgress
			}
		}
	}
	return nil
}

// consume marks n buffered bytes as read.
func (d *Decoder) consume(n int) {
	d.start += n
	d.off += int64(n)
	if d.start == d.end {
		d.start, d.end = 0, 0
	}
}

// discard skips n bytes of the stream without keeping them.
func (d *Decoder) discard(n uint64) error {
	for n > 0 {
		if d.start == d.end {
			if err := d.fill(1); err != nil {
				return err
			}
		}
		k := min(uint64(d.end-d.start), n)
		d.consume(int(k))
		n -= k
	}
	return nil
}

// streamErr turns a read error into the error ending the stream.
func (d *Decoder) streamErr(err error) error {
	if err == io.EOF {
		return fmt.Errorf("kext info stream ends inside a record at offset %d: %w", d.off, io.ErrUnexpectedEOF)
	}
	return fmt.Errorf("reading kext info stream: %w", err)
}
