package main

import (
	"bytes"
	"math"
	"math/rand/v2"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// noisyPairs returns n paired rates: a shared per-repetition factor (the host's mood) and independent noise of
// the given spread on each side, the numerator truly ratio times the denominator.
func noisyPairs(seed uint64, n int, ratio, spread float64) (num, den []float64) {
	r := rand.New(rand.NewPCG(seed, 7))
	for range n {
		host := 1 + 0.1*r.NormFloat64()
		den = append(den, 10000*host*(1+spread*r.NormFloat64()))
		num = append(num, 10000*ratio*host*(1+spread*r.NormFloat64()))
	}
	return num, den
}

func TestRatioIntervalExactPairs(t *testing.T) {
	// Every Warden repetition is exactly half its bare partner: whatever is resampled, the ratio is 0.5.
	den := []float64{900, 1200, 1000, 1100, 950, 1300}
	num := make([]float64, len(den))
	for i, d := range den {
		num[i] = d / 2
	}
	lo, hi, ok := ratioInterval(num, den)
	if !ok || lo != 0.5 || hi != 0.5 {
		t.Errorf("interval %v-%v (ok %v), want exactly 0.5-0.5", lo, hi, ok)
	}
}

func TestRatioIntervalCoversAndNarrows(t *testing.T) {
	const truth = 0.88
	numFew, denFew := noisyPairs(1, 8, truth, 0.08)
	numMany, denMany := noisyPairs(1, 64, truth, 0.08)
	loF, hiF, ok1 := ratioInterval(numFew, denFew)
	loM, hiM, ok2 := ratioInterval(numMany, denMany)
	if !ok1 || !ok2 {
		t.Fatal("no interval")
	}
	for _, iv := range [][2]float64{{loF, hiF}, {loM, hiM}} {
		if iv[0] > truth || iv[1] < truth || iv[0] >= iv[1] {
			t.Errorf("interval %v does not contain the true ratio %v", iv, truth)
		}
	}
	point := median(numMany) / median(denMany)
	if loM > point || hiM < point {
		t.Errorf("interval %v-%v does not contain its own estimate %v", loM, hiM, point)
	}
	// Eight times the repetitions: about a third of the width (1/sqrt(8)); at least clearly narrower.
	if wF, wM := hiF-loF, hiM-loM; wM > 0.6*wF {
		t.Errorf("64 repetitions give width %.3f, 8 give %.3f: pooling should narrow it", wM, wF)
	}
	// The same repetitions, the same interval: a report can be recomputed exactly.
	if lo, hi, _ := ratioInterval(numMany, denMany); lo != loM || hi != hiM {
		t.Errorf("second computation %v-%v, first %v-%v", lo, hi, loM, hiM)
	}
}

func TestRatioIntervalRefuses(t *testing.T) {
	for name, c := range map[string][2][]float64{
		"too few pairs":      {{1, 2, 3, 4}, {1, 2, 3, 4}},
		"unpaired":           {{1, 2, 3, 4, 5, 6}, {1, 2, 3, 4, 5}},
		"no denominator yet": {{1, 2, 3, 4, 5}, {0, 0, 0, 0, 0}},
	} {
		if lo, hi, ok := ratioInterval(c[0], c[1]); ok {
			t.Errorf("%s: interval %v-%v, want none", name, lo, hi)
		}
	}
}

func TestTargetsCarryTheirInterval(t *testing.T) {
	c := newCollector()
	// TCP: Warden at 0.8 of bare with little noise, a clear miss. UDP: at 0.9 with much noise, undecided.
	tcpW, tcpB := noisyPairs(2, 8, 0.8, 0.01)
	udpW, udpB := noisyPairs(3, 8, 0.9, 0.1)
	for i := range 8 {
		c.add(wlTCPConnect, cfgBare, "conn/s", sample{value: tcpB[i]})
		c.add(wlTCPConnect, cfgWarden, "conn/s", sample{value: tcpW[i]})
		c.add(wlUDPFlows, cfgBare, "flows/s", sample{value: udpB[i]})
		c.add(wlUDPFlows, cfgWarden, "flows/s", sample{value: udpW[i]})
		c.add(wlLatency, cfgBare, "us (p50)", sample{value: 50, p50: 50, p99: 100})
		c.add(wlLatency, cfgWarden, "us (p50)", sample{value: 60, p50: 60, p99: 120})
	}
	rep := &Report{Results: c.results()}
	rep.Ratios, rep.Targets = ratios(rep.Results)
	byName := map[string]Target{}
	for _, tg := range rep.Targets {
		byName[tg.Ratio] = tg
	}
	tcp, udp, p99 := byName["warden_vs_bare_tcp_connect"], byName["warden_vs_bare_udp_flows"], byName["warden_vs_bare_connect_p99"]
	if len(tcp.Interval) != 2 || !tcp.Settled || tcp.Met || tcp.Interval[1] >= 0.9 {
		t.Errorf("TCP at 0.8: %+v; want a settled miss with its interval below 0.9", tcp)
	}
	if len(udp.Interval) != 2 || udp.Settled || udp.Interval[0] > 0.9 || udp.Interval[1] < 0.9 {
		t.Errorf("UDP at 0.9 with 10%% noise: %+v; want an interval spanning 0.9, unsettled", udp)
	}
	// Every repetition's p99 is 120 against 100: the interval is that ratio alone, below the 1.5 allowed.
	if !cmp.Equal(p99.Interval, []float64{1.2, 1.2}) || !p99.Settled || !p99.Met {
		t.Errorf("p99 at 1.2 in every repetition: %+v; want the interval 1.2-1.2, a settled pass", p99)
	}
	var buf bytes.Buffer
	writeTable(&buf, rep)
	lines := map[string]string{}
	for _, l := range strings.Split(buf.String(), "\n") {
		if f := strings.Fields(l); len(f) > 0 {
			lines[f[0]] = l
		}
	}
	// Fields: name, value, ">=", target, met, interval, per repetition.
	if f := strings.Fields(lines["warden_vs_bare_tcp_connect"]); len(f) < 6 || f[4] != "NO" ||
		f[5] != fmtNum(tcp.Interval[0])+"-"+fmtNum(tcp.Interval[1]) {
		t.Errorf("TCP line %q: want MET NO and its interval", lines["warden_vs_bare_tcp_connect"])
	}
	if f := strings.Fields(lines["warden_vs_bare_udp_flows"]); len(f) < 5 || f[4] != "NO?" {
		t.Errorf("UDP line %q: want its verdict marked unsettled with ?", lines["warden_vs_bare_udp_flows"])
	}
	if math.IsNaN(tcp.Interval[0]) || math.IsNaN(udp.Interval[1]) {
		t.Error("NaN in an interval")
	}
}
