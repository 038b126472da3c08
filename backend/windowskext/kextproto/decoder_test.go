package kextproto

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"net/netip"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/warden-fw/warden/backend/windowskext/internal/testdata"
)

// infoTypeSequence is the type of every record of kext_info_stream.bin, record #0 first (kext-protocol.md 1.11).
const infoTypeSequence = `
1650130633501545641566612222035366555041261511615132215624012101360435625261505545346224256651626524
3436311445016400042100646052532114201154523413513613530315004644520140613265244044411263012515531524
3423143136205152516606126514402202505110121105166600426304136016634250031142462544352265410000654351
6226621425040511416062545051323060301115141243132341506632223310235134323531130265042655405262223403
5612513506425364663124602341125236424105412610053262652164145634450661566615152034061304051123505116
2454250654263056344242116524461445341314311246151106126320106546362612300600334044432250221361625121
1045256304353106632202412451520255320554006435640252434365336162441006046113102414141101642555604405
2414255012360230340145100322335641001441531362156341002145263436511446341665534434410132524613314224
2012153065230065445241131506145126523164432501341462412561054202461604160263610463363146001601545256
5624346604644453430332632600365221626236141534654532430064305343102602114300433140605346060432300020
6`

var addrCmp = cmp.Options{
	cmp.Comparer(func(a, b netip.AddrPort) bool { return a == b }),
}

func seq(from, n byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = from + byte(i)
	}
	return b
}

func ap4(a, b, c, d byte, port uint16) netip.AddrPort {
	return netip.AddrPortFrom(netip.AddrFrom4([4]byte{a, b, c, d}), port)
}

func ap6(first byte, port uint16) netip.AddrPort {
	return netip.AddrPortFrom(netip.AddrFrom16([16]byte(seq(first, 16))), port)
}

// project copies the part of r that its type makes meaningful, so tests can compare records.
func project(r *Record) any {
	switch r.Type {
	case InfoLogLine:
		return LogLine{Severity: r.Log.Severity, Text: bytes.Clone(r.Log.Text)}
	case InfoConnectionIpv4, InfoConnectionIpv6:
		c := r.Conn
		c.Payload = bytes.Clone(c.Payload)
		return c
	case InfoConnectionEndEventV4, InfoConnectionEndEventV6:
		return r.End
	case InfoBandwidthStatsV4, InfoBandwidthStatsV6:
		return BandwidthStats{Protocol: r.Bandwidth.Protocol, Entries: append([]BandwidthEntry(nil), r.Bandwidth.Entries...)}
	}
	return nil
}

// goldenInfo is what every record of a kind in kext_info_stream.bin decodes to.
var goldenInfo = map[InfoType]any{
	InfoLogLine: LogLine{Severity: SeverityTrace, Text: []byte("prefix: test log")},
	InfoConnectionIpv4: Connection{ID: 1, ProcessID: 2, Direction: 3, Protocol: 4,
		Local: ap4(1, 2, 3, 4, 5), Remote: ap4(2, 3, 4, 5, 6), PayloadLayer: 7, Payload: seq(1, 10)},
	InfoConnectionIpv6: Connection{ID: 1, ProcessID: 2, Direction: 3, Protocol: 4,
		Local: ap6(1, 5), Remote: ap6(2, 6), PayloadLayer: 7, Payload: seq(1, 10)},
	InfoConnectionEndEventV4: ConnectionEnd{ProcessID: 1, Direction: 2, Protocol: 3,
		Local: ap4(1, 2, 3, 4, 4), Remote: ap4(2, 3, 4, 5, 5)},
	InfoConnectionEndEventV6: ConnectionEnd{ProcessID: 1, Direction: 2, Protocol: 3,
		Local: ap6(1, 4), Remote: ap6(2, 5)},
	InfoBandwidthStatsV4: BandwidthStats{Protocol: 1, Entries: []BandwidthEntry{
		{Local: ap4(1, 2, 3, 4, 1), Remote: ap4(2, 3, 4, 5, 2), Tx: 3, Rx: 4},
		{Local: ap4(1, 2, 3, 4, 5), Remote: ap4(2, 3, 4, 5, 6), Tx: 7, Rx: 8},
	}},
	InfoBandwidthStatsV6: BandwidthStats{Protocol: 1, Entries: []BandwidthEntry{
		{Local: ap6(1, 1), Remote: ap6(2, 2), Tx: 3, Rx: 4},
		{Local: ap6(1, 5), Remote: ap6(2, 6), Tx: 7, Rx: 8},
	}},
}

// chunkReader returns at most n bytes per Read, the way a driver read with a small buffer would.
type chunkReader struct {
	b []byte
	n int
}

func (r *chunkReader) Read(p []byte) (int, error) {
	if len(r.b) == 0 {
		return 0, io.EOF
	}
	k := min(len(p), r.n, len(r.b))
	copy(p, r.b[:k])
	r.b = r.b[k:]
	return k, nil
}

func TestGoldenInfoStream(t *testing.T) {
	data := testdata.Read(t, "kext_info_stream.bin")
	sum := sha256.Sum256(data)
	if len(data) != 58213 || hex.EncodeToString(sum[:]) != "5e4de50c5743803ad41b0547884cae9c31e81a7bb7d5ee208a63666237639ce8" {
		t.Fatalf("golden file has %d bytes, sha256 %x: not the documented file", len(data), sum)
	}
	wantSeq := strings.Join(strings.Fields(infoTypeSequence), "")
	wantCounts := map[InfoType]int{
		InfoLogLine: 136, InfoConnectionIpv4: 161, InfoConnectionIpv6: 141, InfoConnectionEndEventV4: 129,
		InfoConnectionEndEventV6: 154, InfoBandwidthStatsV4: 135, InfoBandwidthStatsV6: 144,
	}

	readers := []struct {
		name string
		r    func() io.Reader
		buf  int
	}{
		{"whole", func() io.Reader { return bytes.NewReader(data) }, 0},
		{"1024-byte-reads", func() io.Reader { return &chunkReader{data, 1024} }, 1024},
		{"7-byte-reads", func() io.Reader { return &chunkReader{data, 7} }, 0},
		{"1-byte-reads", func() io.Reader { return &chunkReader{data, 1} }, 0},
		{"tiny-buffer", func() io.Reader { return bytes.NewReader(data) }, 8},
	}
	for _, rd := range readers {
		t.Run(rd.name, func(t *testing.T) {
			d := NewDecoder(rd.r(), rd.buf)

			rec, err := d.Next()
			if rec != nil || !errors.Is(err, ErrUnexpectedInfoSize) {
				t.Fatalf("record #0: got (%v, %v), want ErrUnexpectedInfoSize", rec, err)
			}
			var re *RecordError
			if !errors.As(err, &re) || re.Offset != 0 || re.Type != InfoConnectionIpv4 || re.Length != 69 {
				t.Fatalf("record #0 error = %#v, want offset 0, type 1, length 69", err)
			}
			if got := d.Offset(); got != 74 {
				t.Fatalf("after record #0 the decoder is at offset %d, want 74", got)
			}

			gotSeq := []byte{'1'} // record #0 was a (malformed) type 1
			counts := map[InfoType]int{}
			for i := 1; ; i++ {
				rec, err := d.Next()
				if err == io.EOF {
					break
				}
				if err != nil {
					t.Fatalf("record #%d at offset %d: %v", i, d.Offset(), err)
				}
				if i > 1000 {
					t.Fatalf("more than 1000 valid records")
				}
				gotSeq = append(gotSeq, '0'+byte(rec.Type))
				counts[rec.Type]++
				if diff := cmp.Diff(goldenInfo[rec.Type], project(rec), addrCmp); diff != "" {
					t.Fatalf("record #%d (%s) mismatch (-want +got):\n%s", i, rec.Type, diff)
				}
			}
			if d.Offset() != int64(len(data)) {
				t.Errorf("consumed %d of %d bytes", d.Offset(), len(data))
			}
			if diff := cmp.Diff(wantCounts, counts); diff != "" {
				t.Errorf("record counts (-want +got):\n%s", diff)
			}
			if string(gotSeq) != wantSeq {
				t.Errorf("type sequence differs:\n got %s\nwant %s", gotSeq, wantSeq)
			}
		})
	}
}

func mustHex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(strings.ReplaceAll(s, " ", ""))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestDecodeMalformed(t *testing.T) {
	endV4 := "03 16000000 0100000000000000 02 03 01020304 02030405 0400 0500"
	tests := []struct {
		name    string
		stream  string
		want    []error // per Next call, nil for a record
		wantEnd error
	}{
		{"end event too short", "03 15000000" + strings.Repeat("00", 0x15) + endV4, []error{ErrUnexpectedInfoSize, nil}, io.EOF},
		{"log line without severity", "00 00000000" + endV4, []error{ErrUnexpectedInfoSize, nil}, io.EOF},
		{"empty log text is valid", "00 01000000 04" + endV4, []error{nil, nil}, io.EOF},
		{"unknown type skipped", "09 03000000 aabbcc" + endV4, []error{ErrUnknownInfoType, nil}, io.EOF},
		{"connection shorter than its fixed part", "01 10000000" + strings.Repeat("00", 16) + endV4, []error{ErrUnexpectedInfoSize, nil}, io.EOF},
		{"payload length beyond body", "01 24000000" + strings.Repeat("00", 31) + "02000000" + "aa" + endV4, []error{ErrUnexpectedInfoSize, nil}, io.EOF},
		{"payload length short of body", "01 24000000" + strings.Repeat("00", 31) + "00000000" + "aa" + endV4, []error{ErrUnexpectedInfoSize, nil}, io.EOF},
		{"bandwidth count mismatch", "05 21000000 06 02000000" + strings.Repeat("00", 28) + endV4, []error{ErrUnexpectedInfoSize, nil}, io.EOF},
		{"bandwidth partial entry", "05 22000000 06 01000000" + strings.Repeat("00", 29) + endV4, []error{ErrUnexpectedInfoSize, nil}, io.EOF},
		{"huge length skipped to the end", "03 ffffff7f 0000", []error{}, io.ErrUnexpectedEOF},
		{"truncated header", endV4 + "0316", []error{nil}, io.ErrUnexpectedEOF},
		{"truncated body", endV4 + "03 16000000 01", []error{nil}, io.ErrUnexpectedEOF},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := NewDecoder(bytes.NewReader(mustHex(t, tt.stream)), 16)
			for i, want := range tt.want {
				rec, err := d.Next()
				if (rec == nil) == (err == nil) {
					t.Fatalf("call %d: record %v and error %v", i, rec, err)
				}
				if want == nil && err != nil || want != nil && !errors.Is(err, want) {
					t.Fatalf("call %d: error %v, want %v", i, err, want)
				}
			}
			if _, err := d.Next(); !errors.Is(err, tt.wantEnd) {
				t.Fatalf("end: %v, want %v", err, tt.wantEnd)
			}
		})
	}
}

// errReader fails after its data.
type errReader struct {
	b   []byte
	err error
}

func (r *errReader) Read(p []byte) (int, error) {
	if len(r.b) == 0 {
		return 0, r.err
	}
	n := copy(p, r.b)
	r.b = r.b[n:]
	return n, nil
}

func TestDecodeReaderError(t *testing.T) {
	boom := errors.New("device gone")
	d := NewDecoder(&errReader{mustHex(t, "03 16000000 01"), boom}, 0)
	if _, err := d.Next(); !errors.Is(err, boom) {
		t.Fatalf("Next = %v, want the reader's error", err)
	}
	d = NewDecoder(&errReader{nil, nil}, 0)
	if _, err := d.Next(); !errors.Is(err, io.ErrNoProgress) {
		t.Fatalf("Next on a reader that never returns data = %v, want io.ErrNoProgress", err)
	}
}

func TestRecordRoundTrip(t *testing.T) {
	recs := []Record{
		{Type: InfoLogLine, Log: LogLine{Severity: SeverityWarning, Text: []byte("kext.rs:12 hello")}},
		{Type: InfoConnectionIpv4, Conn: Connection{ID: 1 << 40, ProcessID: 4242, Direction: 1, Protocol: 6,
			Local: ap4(10, 0, 0, 1, 5000), Remote: ap4(1, 2, 3, 4, 443), PayloadLayer: 4}},
		{Type: InfoConnectionIpv6, Conn: Connection{ID: 7, ProcessID: 0, Protocol: 17,
			Local: ap6(0x20, 5353), Remote: ap6(0x30, 53), PayloadLayer: 3, Payload: seq(0x60, 40)}},
		{Type: InfoConnectionEndEventV6, End: ConnectionEnd{ProcessID: 9, Protocol: 6, Local: ap6(1, 1), Remote: ap6(2, 2)}},
		{Type: InfoBandwidthStatsV4, Bandwidth: BandwidthStats{Protocol: 17}},
	}
	var stream []byte
	for i := range recs {
		var err error
		if stream, err = AppendRecord(stream, &recs[i]); err != nil {
			t.Fatal(err)
		}
	}
	d := NewDecoder(&chunkReader{stream, 3}, 0)
	for i := range recs {
		got, err := d.Next()
		if err != nil {
			t.Fatalf("record %d: %v", i, err)
		}
		want := project(&recs[i])
		if c, ok := want.(Connection); ok && c.Payload == nil {
			c.Payload = []byte{}
			want = c
		}
		if diff := cmp.Diff(want, project(got), addrCmp); diff != "" {
			t.Errorf("record %d (-want +got):\n%s", i, diff)
		}
	}
	if _, err := d.Next(); err != io.EOF {
		t.Fatalf("end: %v", err)
	}

	bad := Record{Type: InfoConnectionIpv4, Conn: Connection{Local: ap6(1, 1), Remote: ap4(1, 2, 3, 4, 1)}}
	if _, err := AppendRecord(nil, &bad); !errors.Is(err, ErrAddressFamily) {
		t.Errorf("v6 address in a v4 record: %v, want ErrAddressFamily", err)
	}
}

// loopReader serves the same bytes forever.
type loopReader struct {
	b   []byte
	off int
}

func (r *loopReader) Read(p []byte) (int, error) {
	n := 0
	for n < len(p) {
		k := copy(p[n:], r.b[r.off:])
		n += k
		r.off = (r.off + k) % len(r.b)
	}
	return n, nil
}

func connV4Record(tb testing.TB) []byte {
	r := Record{Type: InfoConnectionIpv4, Conn: Connection{ID: 1, ProcessID: 2, Protocol: 6,
		Local: ap4(10, 0, 0, 1, 5000), Remote: ap4(1, 2, 3, 4, 443), PayloadLayer: 4, Payload: seq(0, 60)}}
	b, err := AppendRecord(nil, &r)
	if err != nil {
		tb.Fatal(err)
	}
	return b
}

func TestDecodeNoAllocs(t *testing.T) {
	d := NewDecoder(&loopReader{b: connV4Record(t)}, 0)
	allocs := testing.AllocsPerRun(1000, func() {
		if _, err := d.Next(); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Fatalf("decoding a connection record allocates %.1f times", allocs)
	}
}

func BenchmarkDecodeConnectionV4(b *testing.B) {
	rec := connV4Record(b)
	d := NewDecoder(&loopReader{b: rec}, 0)
	b.SetBytes(int64(len(rec)))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := d.Next(); err != nil {
			b.Fatal(err)
		}
	}
}
