package kextproto

import (
	"bytes"
	"errors"
	"io"
	"net/netip"
	"testing"
)

// step is what one Next call produced, for comparing two decodings of the same bytes.
type step struct {
	rec    any
	err    string
	offset int64
}

func decodeAll(t *testing.T, r io.Reader, bufSize, inputLen int) []step {
	t.Helper()
	d := NewDecoder(r, bufSize)
	var steps []step
	for i := 0; ; i++ {
		if i > inputLen+1 {
			t.Fatalf("decoder made %d calls on %d bytes without ending", i, inputLen)
		}
		before := d.Offset()
		rec, err := d.Next()
		if (rec == nil) == (err == nil) {
			t.Fatalf("Next returned record %v and error %v", rec, err)
		}
		if d.Offset() > int64(inputLen) {
			t.Fatalf("consumed %d of %d bytes", d.Offset(), inputLen)
		}
		var re *RecordError
		isRecErr := errors.As(err, &re)
		if err == nil || isRecErr {
			// A record or a skipped record always moves the stream on, by at least a header.
			if d.Offset() < before+HeaderSize {
				t.Fatalf("record at %d consumed only up to %d", before, d.Offset())
			}
		}
		if err == nil {
			steps = append(steps, step{rec: project(rec), offset: d.Offset()})
			continue
		}
		steps = append(steps, step{err: err.Error(), offset: d.Offset()})
		if !isRecErr {
			if err == io.EOF && d.Offset() != int64(inputLen) {
				t.Fatalf("clean EOF after %d of %d bytes", d.Offset(), inputLen)
			}
			return steps
		}
	}
}

// FuzzDecoder checks the decoder's invariants on arbitrary streams: no panic, never more consumed than given,
// a record xor an error, progress on every record, and the same results however the stream is split into reads.
func FuzzDecoder(f *testing.F) {
	f.Add(mustHex(f, "00 11000000 01 7072656669783a2074657374206c6f67"), uint8(3))
	f.Add(mustHex(f, "01 2d000000 0100000000000000 0200000000000000 03 04 01020304 02030405 0500 0600 07 0a000000 0102030405060708090a"), uint8(1))
	f.Add(mustHex(f, "05 3d000000 01 02000000 01020304 0100 02030405 0200 0300000000000000 0400000000000000 01020304 0500 02030405 0600 0700000000000000 0800000000000000"), uint8(9))
	f.Add(mustHex(f, "03 16000000 0100000000000000 02 03 01020304 02030405 0400 0500 09 01000000 00"), uint8(2))
	f.Add(connV4Record(f), uint8(200))
	f.Fuzz(func(t *testing.T, data []byte, chunk uint8) {
		whole := decodeAll(t, bytes.NewReader(data), 0, len(data))
		split := decodeAll(t, &chunkReader{data, int(chunk%16) + 1}, 7, len(data))
		if len(whole) != len(split) {
			t.Fatalf("whole stream gave %d results, split reads %d", len(whole), len(split))
		}
		for i := range whole {
			if whole[i].offset != split[i].offset || whole[i].err != split[i].err {
				t.Fatalf("result %d differs: whole %+v, split %+v", i, whole[i], split[i])
			}
		}
	})
}

// FuzzRecordRoundTrip checks that every record the decoder accepts encodes back to exactly its bytes.
func FuzzRecordRoundTrip(f *testing.F) {
	f.Add(mustHex(f, "02 45000000 0100000000000000 0200000000000000 03 04 0102030405060708090a0b0c0d0e0f10 02030405060708090a0b0c0d0e0f1011 0500 0600 07 0a000000 0102030405060708090a"))
	f.Add(mustHex(f, "04 2e000000 0100000000000000 02 03 0102030405060708090a0b0c0d0e0f10 02030405060708090a0b0c0d0e0f1011 0400 0500"))
	f.Add(mustHex(f, "00 01000000 05"))
	f.Add(mustHex(f, "04 2e000000 0100000000000000 02 03 00000000000000000000ffff01020304 02030405060708090a0b0c0d0e0f1011 0400 0500"))
	f.Fuzz(func(t *testing.T, data []byte) {
		d := NewDecoder(bytes.NewReader(data), 0)
		rec, err := d.Next()
		if err != nil {
			return
		}
		got, err := AppendRecord(nil, rec)
		if err != nil {
			t.Fatalf("re-encoding a decoded %s: %v", rec.Type, err)
		}
		if want := data[:d.Offset()]; !bytes.Equal(got, want) {
			t.Fatalf("round trip of %s:\n got %x\nwant %x", rec.Type, got, want)
		}
	})
}

// FuzzCommandRoundTrip checks encode → decode → encode for commands built from arbitrary values, and
// decode → encode for arbitrary bytes.
func FuzzCommandRoundTrip(f *testing.F) {
	f.Add(uint8(1), uint64(1), uint8(2), uint8(6), []byte{1, 2, 3, 4}, []byte{2, 3, 4, 5}, uint16(1), uint16(443))
	f.Add(uint8(3), uint64(0), uint8(11), uint8(17), bytes.Repeat([]byte{1}, 16), bytes.Repeat([]byte{2}, 16), uint16(53), uint16(53))
	f.Add(uint8(2), uint64(0), uint8(5), uint8(6), append(make([]byte, 10), 0xff, 0xff, 1, 2, 3, 4), []byte{9, 9, 9, 9}, uint16(0), uint16(0))
	f.Fuzz(func(t *testing.T, typ uint8, id uint64, v uint8, proto uint8, la, ra []byte, lp, rp uint16) {
		l, okL := netip.AddrFromSlice(la)
		r, okR := netip.AddrFromSlice(ra)
		if !okL || !okR {
			return
		}
		c := Command{Type: CommandType(typ), ID: id, Verdict: Verdict(v), Protocol: proto,
			Local: netip.AddrPortFrom(l, lp), Remote: netip.AddrPortFrom(r, rp)}
		enc, err := AppendCommand(nil, &c)
		if err != nil {
			if len(enc) != 0 {
				t.Fatalf("failed encode appended %x", enc)
			}
			return
		}
		if !Verdict(enc[len(enc)-1]).Valid() && c.Type != CmdShutdown && c.Type.Size() > 1 {
			t.Fatalf("encoded an invalid verdict: %x", enc)
		}
		dec, n, err := DecodeCommand(enc)
		if err != nil || n != len(enc) || n != dec.Type.Size() {
			t.Fatalf("decoding %x: %+v, %d, %v", enc, dec, n, err)
		}
		again, err := AppendCommand(nil, &dec)
		if err != nil || !bytes.Equal(again, enc) {
			t.Fatalf("re-encoding %+v: %x, %v; want %x", dec, again, err, enc)
		}
		// Also decode → encode on the raw fuzz bytes.
		raw := append(append([]byte{typ}, la...), ra...)
		if dec, n, err := DecodeCommand(raw); err == nil {
			again, err := AppendCommand(nil, &dec)
			if err != nil || !bytes.Equal(again, raw[:n]) {
				t.Fatalf("decode→encode of %x: %x, %v", raw[:n], again, err)
			}
		}
	})
}
