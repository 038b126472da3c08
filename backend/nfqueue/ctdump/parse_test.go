package ctdump

import (
	"encoding/binary"
	"errors"
	"net/netip"
	"syscall"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/warden-fw/warden/backend/nfqueue/nlwire"
)

// attr builds one netlink attribute (nested when children are given).
func attr(typ uint16, val []byte) []byte { return nlwire.AppendAttr(nil, typ, val) }

func nested(typ uint16, children ...[]byte) []byte {
	var v []byte
	for _, c := range children {
		v = append(v, c...)
	}
	return attr(typ|1<<15, v) // NLA_F_NESTED
}

func be16(v uint16) []byte { return binary.BigEndian.AppendUint16(nil, v) }

func tupleAttr(typ uint16, src, dst netip.AddrPort, proto uint8) []byte {
	srcT, dstT := uint16(ctaIPv4Src), uint16(ctaIPv4Dst)
	if src.Addr().Is6() {
		srcT, dstT = ctaIPv6Src, ctaIPv6Dst
	}
	return nested(typ,
		nested(ctaTupleIP, attr(srcT, src.Addr().AsSlice()), attr(dstT, dst.Addr().AsSlice())),
		nested(ctaTupleProto, attr(ctaProtoNum, []byte{proto}), attr(ctaProtoSrcPort, be16(src.Port())),
			attr(ctaProtoDstPort, be16(dst.Port()))))
}

func nlmsg(typ uint16, body []byte) []byte { return nlwire.AppendMsg(nil, typ, 2, 0, body) } // NLM_F_MULTI

func entry(f Flow) []byte {
	body := []byte{2, 0, 0, 0} // nfgenmsg: AF_INET, v0, res_id
	body = append(body, tupleAttr(ctaTupleOrig, f.Orig.Src, f.Orig.Dst, f.Proto)...)
	body = append(body, tupleAttr(ctaTupleReply, f.Reply.Src, f.Reply.Dst, f.Proto)...)
	body = append(body, attr(3, binary.BigEndian.AppendUint32(nil, 0x18e))...) // CTA_STATUS, skipped
	if f.HasTCPState {
		body = append(body, nested(ctaProtoinfo, nested(ctaProtoinfoTCP, attr(ctaProtoinfoTCPState, []byte{f.TCPState}),
			attr(2, []byte{7})))...)
	}
	return nlmsg(nfnlSubsysCTNetlink<<8|ipctnlMsgCTNew, body)
}

var (
	tcpFlow = Flow{Proto: 6,
		Orig:     Tuple{netip.MustParseAddrPort("10.0.0.1:40000"), netip.MustParseAddrPort("10.0.0.2:80")},
		Reply:    Tuple{netip.MustParseAddrPort("10.0.0.2:80"), netip.MustParseAddrPort("10.0.0.1:40000")},
		TCPState: 3, HasTCPState: true}
	udpNATFlow = Flow{Proto: 17,
		Orig:  Tuple{netip.MustParseAddrPort("[fd00::1]:5353"), netip.MustParseAddrPort("[2001:db8::53]:53")},
		Reply: Tuple{netip.MustParseAddrPort("[::1]:53"), netip.MustParseAddrPort("[fd00::1]:5353")}}
	timeWaitFlow = Flow{Proto: 6,
		Orig:     Tuple{netip.MustParseAddrPort("10.0.0.1:40001"), netip.MustParseAddrPort("10.0.0.2:80")},
		Reply:    Tuple{netip.MustParseAddrPort("10.0.0.2:80"), netip.MustParseAddrPort("10.0.0.1:40001")},
		TCPState: TCPStateTimeWait, HasTCPState: true}
)

func collect(t *testing.T, b []byte) ([]Flow, bool, error) {
	t.Helper()
	var got []Flow
	var fl Flow
	done, err := Parse(b, &fl, func(f *Flow) { got = append(got, *f) })
	return got, done, err
}

func TestParse(t *testing.T) {
	datagram := append(append(entry(tcpFlow), entry(udpNATFlow)...), entry(timeWaitFlow)...)
	got, done, err := collect(t, datagram)
	if err != nil || done {
		t.Fatalf("Parse: done %v, err %v", done, err)
	}
	if d := cmp.Diff([]Flow{tcpFlow, udpNATFlow, timeWaitFlow}, got, cmp.Comparer(func(a, b netip.AddrPort) bool { return a == b })); d != "" {
		t.Errorf("flows (-want +got):\n%s", d)
	}
	if got[0].Ended() || got[1].Ended() || !got[2].Ended() {
		t.Errorf("Ended: %v %v %v, want false false true", got[0].Ended(), got[1].Ended(), got[2].Ended())
	}

	got, done, err = collect(t, append(entry(tcpFlow), nlmsg(nlwire.TypeDone, []byte{0, 0, 0, 0})...))
	if err != nil || !done || len(got) != 1 {
		t.Errorf("with NLMSG_DONE: %d flows, done %v, err %v; want 1, true, nil", len(got), done, err)
	}
}

func TestParseSkipsEntriesWithoutTuples(t *testing.T) {
	body := []byte{2, 0, 0, 0}
	body = append(body, tupleAttr(ctaTupleOrig, tcpFlow.Orig.Src, tcpFlow.Orig.Dst, 6)...) // no reply tuple
	got, _, err := collect(t, append(nlmsg(nfnlSubsysCTNetlink<<8|ipctnlMsgCTNew, body), entry(tcpFlow)...))
	if err != nil || len(got) != 1 || got[0] != tcpFlow {
		t.Errorf("got %+v, %v; want only the complete entry", got, err)
	}
}

func TestParseErrors(t *testing.T) {
	errMsg := nlmsg(nlwire.TypeError, binary.NativeEndian.AppendUint32(nil, uint32(0x100000000-int64(syscall.EPERM))))
	if _, _, err := collect(t, errMsg); !errors.Is(err, ErrKernel) || !errors.Is(err, syscall.EPERM) {
		t.Errorf("kernel error: %v, want ErrKernel wrapping EPERM", err)
	}
	ack := nlmsg(nlwire.TypeError, make([]byte, 4))
	if _, _, err := collect(t, ack); err != nil {
		t.Errorf("acknowledgement (error 0): %v", err)
	}
	whole := entry(tcpFlow)
	for _, cut := range []int{1, nlwire.HdrLen - 1, nlwire.HdrLen + 2} {
		if _, _, err := collect(t, whole[:cut]); !errors.Is(err, ErrTruncated) {
			t.Errorf("cut at %d: %v, want ErrTruncated", cut, err)
		}
	}
	// A length that claims more than the datagram holds.
	bad := append([]byte(nil), whole...)
	binary.NativeEndian.PutUint32(bad[0:4], uint32(len(bad)+4))
	if _, _, err := collect(t, bad); !errors.Is(err, ErrTruncated) {
		t.Errorf("overlong message: %v, want ErrTruncated", err)
	}
}

func TestParseDoesNotAllocate(t *testing.T) {
	datagram := append(entry(tcpFlow), entry(udpNATFlow)...)
	n := 0
	var fl Flow
	allocs := testing.AllocsPerRun(100, func() {
		if _, err := Parse(datagram, &fl, func(*Flow) { n++ }); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 || n == 0 {
		t.Errorf("Parse: %v allocations per datagram (%d flows seen), want 0", allocs, n)
	}
}

// FuzzParse: no input panics, and every flow handed out has both tuples.
func FuzzParse(f *testing.F) {
	f.Add(append(entry(tcpFlow), entry(udpNATFlow)...))
	f.Add(entry(timeWaitFlow))
	f.Add(nlmsg(nlwire.TypeDone, []byte{0, 0, 0, 0}))
	f.Fuzz(func(t *testing.T, b []byte) {
		var scratch Flow
		_, _ = Parse(b, &scratch, func(fl *Flow) {
			if !fl.Orig.Src.IsValid() || !fl.Orig.Dst.IsValid() || !fl.Reply.Src.IsValid() || !fl.Reply.Dst.IsValid() {
				t.Fatalf("flow without complete tuples: %+v", fl)
			}
		})
	})
}
