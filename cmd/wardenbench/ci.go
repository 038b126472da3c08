package main

import (
	"math"
	"math/rand/v2"
	"slices"
)

// How sure a target's verdict is. One run's ratio of medians moves by 0.05-0.1 on a shared 2-CPU host, about
// as far as Warden sits from some targets, so a bare "met" or "missed" says little. Each rate target, and the
// p99 target, therefore carries a 95 % bootstrap interval of its ratio: the repetitions are resampled as pairs
// (each repetition ran both configurations back to back, so a slow moment of the host weighs on both), and the
// ratio of the resampled medians is taken every time. A target whose interval lies wholly on one side of it is
// settled at this run's precision; one whose interval spans it needs more repetitions (or --pool) before it
// says anything.

const (
	// bootstrapResamples: more would not steady the ends. With 8 repetitions the resampled medians take few
	// values, and an end moved by up to 0.08 between seeds on a run with an outlying repetition (AT); pooled
	// runs give many more values and steadier ends.
	bootstrapResamples = 10000
	// minIntervalReps: with fewer pairs the resampled medians take too few values to mean anything.
	minIntervalReps = 5
	// bootstrapSeed is fixed so that the same repetitions always give the same interval (a report, or a
	// pool of reports, can be recomputed exactly).
	bootstrapSeed = 0x5741524445
)

// ratioInterval returns the 95 % percentile bootstrap interval of median(num)/median(den) over paired
// repetitions (num[i] and den[i] ran side by side). ok is false when there are too few pairs, the pairs do not
// match up, or a denominator's median is not positive.
func ratioInterval(num, den []float64) (lo, hi float64, ok bool) {
	n := len(num)
	if n != len(den) || n < minIntervalReps {
		return 0, 0, false
	}
	rng := rand.New(rand.NewPCG(bootstrapSeed, uint64(n)))
	a, b := make([]float64, n), make([]float64, n)
	rs := make([]float64, 0, bootstrapResamples)
	for range bootstrapResamples {
		for j := range n {
			i := rng.IntN(n)
			a[j], b[j] = num[i], den[i]
		}
		if mb := sortedMedian(b); mb > 0 {
			rs = append(rs, sortedMedian(a)/mb)
		}
	}
	if len(rs) < bootstrapResamples/2 {
		return 0, 0, false
	}
	slices.Sort(rs)
	return roundRatio(quantile(rs, 0.025)), roundRatio(quantile(rs, 0.975)), true
}

// sortedMedian sorts xs in place and returns its median.
func sortedMedian(xs []float64) float64 {
	slices.Sort(xs)
	n := len(xs)
	if n%2 == 1 {
		return xs[n/2]
	}
	return (xs[n/2-1] + xs[n/2]) / 2
}

// quantile returns the q-quantile of sorted xs, interpolating between neighbours.
func quantile(sorted []float64, q float64) float64 {
	pos := q * float64(len(sorted)-1)
	i := int(pos)
	if i >= len(sorted)-1 {
		return sorted[len(sorted)-1]
	}
	f := pos - float64(i)
	return sorted[i]*(1-f) + sorted[i+1]*f
}

// roundRatio rounds a ratio as the report prints ratios: to three decimals.
func roundRatio(v float64) float64 { return math.Round(v*1000) / 1000 }
