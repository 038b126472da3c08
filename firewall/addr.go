package firewall

import (
	"math/bits"
	"net/netip"
	"sort"
)

// u128 is an address as a 128-bit number, so IPv4 and IPv6 share one ordered representation. IPv4
// addresses use only the low 32 bits; the two families never share a structure, so they cannot collide.
type u128 struct{ hi, lo uint64 }

func addrKey(a netip.Addr) u128 {
	if a.Is4() {
		b := a.As4()
		return u128{lo: uint64(b[0])<<24 | uint64(b[1])<<16 | uint64(b[2])<<8 | uint64(b[3])}
	}
	b := a.As16()
	var k u128
	for i := 0; i < 8; i++ {
		k.hi = k.hi<<8 | uint64(b[i])
		k.lo = k.lo<<8 | uint64(b[8+i])
	}
	return k
}

func (a u128) less(b u128) bool { return a.hi < b.hi || a.hi == b.hi && a.lo < b.lo }

func (a u128) lessEq(b u128) bool { return !b.less(a) }

// addOne returns a+1 and whether it overflowed.
func (a u128) addOne() (u128, bool) {
	lo, c := bits.Add64(a.lo, 1, 0)
	hi, c2 := bits.Add64(a.hi, 0, c)
	return u128{hi, lo}, c2 != 0
}

// prefixRange returns the first and last address of a masked prefix.
func prefixRange(p netip.Prefix) (lo, hi u128) {
	lo = addrKey(p.Addr())
	hostBits := p.Addr().BitLen() - p.Bits()
	hi = lo
	switch {
	case hostBits >= 128:
		hi = u128{^uint64(0), ^uint64(0)}
	case hostBits >= 64:
		hi.lo = ^uint64(0)
		hi.hi |= (uint64(1) << (hostBits - 64)) - 1
	case hostBits > 0:
		hi.lo |= (uint64(1) << hostBits) - 1
	}
	return lo, hi
}

// addrRanges is a sorted set of disjoint inclusive address ranges of one family, for rules with long remote
// lists: membership costs a binary search instead of a scan.
type addrRanges struct{ lo, hi []u128 }

func newAddrRanges(ps []netip.Prefix) addrRanges {
	type rng struct{ lo, hi u128 }
	rs := make([]rng, 0, len(ps))
	for _, p := range ps {
		lo, hi := prefixRange(p)
		rs = append(rs, rng{lo, hi})
	}
	sort.Slice(rs, func(i, j int) bool { return rs[i].lo.less(rs[j].lo) })
	var out addrRanges
	for _, r := range rs {
		n := len(out.lo)
		if n > 0 {
			next, overflow := out.hi[n-1].addOne()
			if overflow || r.lo.lessEq(next) {
				if out.hi[n-1].less(r.hi) {
					out.hi[n-1] = r.hi
				}
				continue
			}
		}
		out.lo = append(out.lo, r.lo)
		out.hi = append(out.hi, r.hi)
	}
	return out
}

func (s *addrRanges) contains(k u128) bool {
	// Find the last range starting at or before k.
	i := sort.Search(len(s.lo), func(i int) bool { return k.less(s.lo[i]) }) - 1
	return i >= 0 && k.lessEq(s.hi[i])
}

// prefixTree indexes the rules of one family by remote prefix. Prefixes form a laminar family (two
// prefixes are nested or disjoint), so the address space splits into segments each of which has one
// deepest covering prefix; a lookup is one binary search plus a walk up the (short) parent chain. Unlike
// flattening every covering rule into every segment, a wide prefix costs one node, not one entry per segment.
type prefixTree struct {
	segStart []u128 // sorted segment starts
	// seg4 is the IPv4 form of segStart and segNode together: a quarter of the memory, and the node sits next
	// to the start the search ends on, so a lookup touches fewer cache lines.
	seg4    []seg4
	segNode []int32 // deepest node covering the segment, -1 for none
	nodes   []prefixNode
	// bucket narrows the binary search: segments starting in the address block b (the top bucketBits bits)
	// are segStart[bucket[b]:bucket[b+1]]. With a few segments per bucket a lookup touches a small table and
	// one or two cache lines of segments instead of walking ~log2(n) far-apart ones.
	bucket     []uint32
	bucketBits uint
}

type prefixNode struct {
	parent int32
	rules  []int32 // ascending rule indices
}

func buildPrefixTree(entries map[netip.Prefix][]int32) *prefixTree {
	if len(entries) == 0 {
		return nil
	}
	v4 := true
	type item struct {
		lo, hi u128
		bits   int
		rules  []int32
	}
	items := make([]item, 0, len(entries))
	for p, rs := range entries {
		v4 = v4 && p.Addr().Is4()
		lo, hi := prefixRange(p)
		items = append(items, item{lo, hi, p.Bits(), rs})
	}
	// Start ascending; at equal starts the wider prefix first, so parents precede children.
	sort.Slice(items, func(i, j int) bool {
		if items[i].lo != items[j].lo {
			return items[i].lo.less(items[j].lo)
		}
		return items[i].bits < items[j].bits
	})
	t := &prefixTree{nodes: make([]prefixNode, len(items))}
	emit := func(at u128, node int32) {
		n := len(t.segStart)
		if n > 0 && t.segStart[n-1] == at {
			t.segNode[n-1] = node // a later emit at the same address is the deeper (or the resumed) one
			return
		}
		t.segStart = append(t.segStart, at)
		t.segNode = append(t.segNode, node)
	}
	var stack []int32
	pop := func() {
		top := stack[len(stack)-1]
		stack = stack[:len(stack)-1]
		parent := int32(-1)
		if len(stack) > 0 {
			parent = stack[len(stack)-1]
		}
		if next, overflow := items[top].hi.addOne(); !overflow {
			emit(next, parent)
		}
	}
	for i := range items {
		for len(stack) > 0 && items[stack[len(stack)-1]].hi.less(items[i].lo) {
			pop()
		}
		parent := int32(-1)
		if len(stack) > 0 {
			parent = stack[len(stack)-1]
		}
		t.nodes[i] = prefixNode{parent: parent, rules: items[i].rules}
		stack = append(stack, int32(i))
		emit(items[i].lo, int32(i))
	}
	for len(stack) > 0 {
		pop()
	}
	if v4 {
		t.seg4 = make([]seg4, 0, len(t.segStart))
		for _, s := range t.segStart {
			if s.lo > 0xffffffff {
				break // the end of 255.255.255.255/x: nothing follows in IPv4
			}
			t.seg4 = append(t.seg4, seg4{start: uint32(s.lo), node: t.segNode[len(t.seg4)]})
		}
		t.segNode = nil
		t.segStart = nil
	}
	t.buildBuckets(v4)
	return t
}

type seg4 struct {
	start uint32
	node  int32
}

// buildBuckets adds the bucket index when there are enough segments for it to pay off.
func (t *prefixTree) buildBuckets(v4 bool) {
	n := len(t.segNode)
	if t.seg4 != nil {
		n = len(t.seg4)
	}
	if n < 512 {
		return
	}
	bits := uint(8)
	for bits < 16 && (n>>bits) > 8 {
		bits++
	}
	t.bucketBits = bits
	t.bucket = make([]uint32, (1<<bits)+1)
	seg := 0
	for b := 0; b <= 1<<bits; b++ {
		for seg < n && t.bucketOf(t.start(seg), v4) < uint64(b) {
			seg++
		}
		t.bucket[b] = uint32(seg)
	}
}

func (t *prefixTree) start(i int) u128 {
	if t.seg4 != nil {
		return u128{lo: uint64(t.seg4[i].start)}
	}
	return t.segStart[i]
}

func (t *prefixTree) bucketOf(k u128, v4 bool) uint64 {
	if v4 {
		return k.lo >> (32 - t.bucketBits)
	}
	return k.hi >> (64 - t.bucketBits)
}

// lookup returns the deepest node covering k, or -1.
func (t *prefixTree) lookup(k u128) int32 {
	if t == nil {
		return -1
	}
	if t.seg4 != nil {
		k4 := uint32(k.lo)
		lo, hi := 0, len(t.seg4)
		if t.bucket != nil {
			b := k.lo >> (32 - t.bucketBits)
			lo, hi = int(t.bucket[b]), int(t.bucket[b+1])
		}
		for lo < hi {
			m := int(uint(lo+hi) >> 1)
			if k4 < t.seg4[m].start {
				hi = m
			} else {
				lo = m + 1
			}
		}
		if lo == 0 {
			return -1
		}
		return t.seg4[lo-1].node
	}
	lo, hi := 0, len(t.segStart)
	if t.bucket != nil {
		b := k.hi >> (64 - t.bucketBits)
		lo, hi = int(t.bucket[b]), int(t.bucket[b+1])
	}
	for lo < hi {
		m := int(uint(lo+hi) >> 1)
		if k.less(t.segStart[m]) {
			hi = m
		} else {
			lo = m + 1
		}
	}
	if lo == 0 {
		return -1
	}
	return t.segNode[lo-1]
}
