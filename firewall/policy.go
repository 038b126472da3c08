package firewall

import (
	"hash/maphash"
	"net/netip"
	"sort"
	"strings"

	"github.com/warden-fw/warden/backend"
	"github.com/warden-fw/warden/config"
	"github.com/warden-fw/warden/config/glob"
)

// Query is what the policy needs to know about a connection. Empty strings and -1 mean unknown; a rule
// that restricts an unknown field does not match.
type Query struct {
	Direction backend.Direction
	Protocol  backend.Protocol
	Remote    netip.Addr
	// ServicePort is the remote port of an outbound connection, the local port of an inbound one.
	ServicePort uint16
	App         string
	UID         int32
	Interface   string
	Domain      string
}

// QueryFromInfo builds a query from a backend's packet info (without process, interface name or domain).
func QueryFromInfo(i *backend.Info) Query {
	q := Query{Direction: i.Direction, Protocol: i.Protocol, Remote: i.Remote.Addr().Unmap(), UID: i.UID,
		Interface: i.Interface}
	if i.Direction == backend.Inbound {
		q.ServicePort = i.Local.Port()
	} else {
		q.ServicePort = i.Remote.Port()
	}
	return q
}

// Match is the policy's answer.
type Match struct {
	Action config.Action
	// Rule is the index of the deciding rule, -1 when a default decided.
	Rule int
	// Name is the deciding rule's name, "" when a default decided.
	Name string
	// Via is the interface a split connection leaves through ("" = split_tunnel.interface).
	Via string
}

// Policy is a compiled, immutable rule set. Decide's cost depends on how many rules could match a query
// (the candidates the indexes return), not on how many rules there are.
type Policy struct {
	cfg      *config.Config
	rules    []compiledRule
	dirs     [2]dirIndex // by backend.Direction
	defaults [2]config.Action
	// NeedsProcess reports whether some rule looks at the application (so the process must be resolved).
	NeedsProcess bool
	// NeedsInterface reports whether some rule looks at the interface name.
	NeedsInterface bool
	// NeedsDomain reports whether some rule names domains.
	NeedsDomain bool
	// HasSplit reports whether some rule splits (action split).
	HasSplit bool

	refs        []ruleRef // one per rule, shared by every connection it decides
	defaultRefs [1]ruleRef
}

type compiledRule struct {
	name    string
	action  config.Action
	dirMask uint8 // 1<<Outbound | 1<<Inbound
	proto   config.Protocol
	app     *glob.Pattern
	uid     int32
	// remote: any of prefixes or domains; when a rule has many prefixes they go into ranges instead.
	hasRemote bool
	prefixes  []netip.Prefix
	ranges    [2]addrRanges // v4, v6; used when len(prefixes) > smallList
	useRanges bool
	domains   []string
	ports     []config.PortRange
	iface     string
	via       string
}

const smallList = 8

// dirIndex holds, for one direction, the candidate lists a query can draw from. Every rule of the
// direction is in exactly one kind of list (its most selective field), possibly several times.
type dirIndex struct {
	ipTree    [2]*prefixTree // v4, v6
	domExact  strIndex
	domSuffix strIndex
	// domLabels has bit n set when some exact or suffix domain has n labels (n < 64), so a lookup only
	// tries the suffixes of a name that can exist.
	domLabels   uint64
	appExact    strIndex     // literal paths
	appDir      strIndex     // globs, by their literal leading directory
	appFold     bool         // some app keys are Windows (case-folded) paths
	portSegs    []uint16     // segment starts (sorted)
	portRules   [][]int32    // rules covering each segment
	portAny     [1024]uint64 // bit p set when some rule covers port p: most ports need no search
	portDirect  []uint32     // with many segments: the segment of every port, one load instead of a search
	uid         map[int32][]int32
	wildcard    []int32
	hasPortsIdx bool
}

// Compile builds a Policy from a validated config.
func Compile(cfg *config.Config) (*Policy, error) {
	p := &Policy{cfg: cfg, rules: make([]compiledRule, len(cfg.Rules)), refs: make([]ruleRef, len(cfg.Rules))}
	p.defaultRefs[0] = ruleRef{Index: -1, Source: "default"}
	for i := range cfg.Rules {
		p.refs[i] = ruleRef{Name: cfg.Rules[i].Name, Index: i, Source: "rule"}
	}
	p.defaults[backend.Outbound] = cfg.Default
	p.defaults[backend.Inbound] = cfg.InboundDefaultA
	type builder struct {
		prefixes [2]map[netip.Prefix][]int32
		ports    [][2]uint32 // lo, hi+1, rule in third slot below
		portRule []int32
	}
	var bs [2]builder
	for d := range p.dirs {
		di := &p.dirs[d]
		seed := maphash.MakeSeed()
		di.domExact = newStrIndex(seed)
		di.domSuffix = newStrIndex(seed)
		di.appExact = newStrIndex(seed)
		di.appDir = newStrIndex(seed)
		di.uid = map[int32][]int32{}
		bs[d].prefixes = [2]map[netip.Prefix][]int32{{}, {}}
	}
	for i := range cfg.Rules {
		r := &cfg.Rules[i]
		cr := &p.rules[i]
		*cr = compiledRule{name: r.Name, action: r.Action, proto: r.Protocol, uid: r.UID,
			prefixes: r.Prefixes, domains: r.Domains, ports: r.Ports, iface: r.Interface, via: r.Via,
			hasRemote: len(r.Prefixes)+len(r.Domains) > 0}
		switch r.Direction {
		case config.Outbound:
			cr.dirMask = 1 << backend.Outbound
		case config.Inbound:
			cr.dirMask = 1 << backend.Inbound
		default:
			cr.dirMask = 1<<backend.Outbound | 1<<backend.Inbound
		}
		if r.App != "" {
			pat, err := glob.Compile(r.App)
			if err != nil {
				return nil, err // validated already; only reachable with a hand-built config
			}
			cr.app = pat
			p.NeedsProcess = true
		}
		if r.Interface != "" {
			p.NeedsInterface = true
		}
		if r.Action == config.Split {
			p.HasSplit = true
		}
		if len(r.Domains) > 0 {
			p.NeedsDomain = true
		}
		if len(r.Prefixes) > smallList {
			var fam [2][]netip.Prefix
			for _, pf := range r.Prefixes {
				fam[famOf(pf.Addr())] = append(fam[famOf(pf.Addr())], pf)
			}
			cr.ranges = [2]addrRanges{newAddrRanges(fam[0]), newAddrRanges(fam[1])}
			cr.useRanges = true
		}
		idx := int32(i)
		for d := range p.dirs {
			if cr.dirMask&(1<<d) == 0 {
				continue
			}
			di, b := &p.dirs[d], &bs[d]
			switch {
			case cr.hasRemote:
				for _, pf := range r.Prefixes {
					m := b.prefixes[famOf(pf.Addr())]
					m[pf] = appendOnce(m[pf], idx)
				}
				for _, dom := range r.Domains {
					if s, ok := strings.CutPrefix(dom, "*."); ok {
						di.domSuffix.add(s, idx)
						di.domLabels |= labelBit(s)
					} else {
						di.domExact.add(dom, idx)
						di.domLabels |= labelBit(dom)
					}
				}
			case cr.app != nil && cr.app.Literal():
				k := cr.app.Normalized()
				di.appExact.add(k, idx)
				di.appFold = di.appFold || cr.app.FoldCase()
			case cr.app != nil && cr.app.LiteralDir() != "":
				k := cr.app.LiteralDir()
				di.appDir.add(k, idx)
				di.appFold = di.appFold || cr.app.FoldCase()
			case len(r.Ports) > 0 && portSpan(r.Ports) <= 4096:
				for _, pr := range r.Ports {
					b.ports = append(b.ports, [2]uint32{uint32(pr.Lo), uint32(pr.Hi) + 1})
					b.portRule = append(b.portRule, idx)
				}
				di.hasPortsIdx = true
			case cr.uid >= 0:
				di.uid[cr.uid] = append(di.uid[cr.uid], idx)
			default:
				di.wildcard = append(di.wildcard, idx)
			}
		}
	}
	for d := range p.dirs {
		di := &p.dirs[d]
		di.ipTree[0] = buildPrefixTree(bs[d].prefixes[0])
		di.ipTree[1] = buildPrefixTree(bs[d].prefixes[1])
		di.portSegs, di.portRules = buildPortSegments(bs[d].ports, bs[d].portRule)
		for i, l := range di.portRules {
			if len(l) == 0 {
				continue
			}
			hi := 65536
			if i+1 < len(di.portSegs) {
				hi = int(di.portSegs[i+1])
			}
			for port := int(di.portSegs[i]); port < hi; port++ {
				di.portAny[port>>6] |= 1 << (port & 63)
			}
		}
		if len(di.portSegs) > 256 {
			di.portDirect = make([]uint32, 65536)
			for i := range di.portSegs {
				hi := 65536
				if i+1 < len(di.portSegs) {
					hi = int(di.portSegs[i+1])
				}
				for port := int(di.portSegs[i]); port < hi; port++ {
					di.portDirect[port] = uint32(i)
				}
			}
		}
		for _, x := range []*strIndex{&di.domExact, &di.domSuffix, &di.appExact, &di.appDir} {
			x.finish()
		}
	}
	return p, nil
}

// strIndex maps strings to ascending rule lists by a 64-bit hash of the string. Looking up a uint64 key
// never dereferences a stored string, which saves a cache miss per probe in large rule sets; two strings
// whose hashes collide share a list, which is harmless because every candidate is checked in full.
//
// A small bit filter in front of the map answers most misses (the common case: most applications and
// domains have no rule) from a few kilobytes that stay in cache, instead of probing a map of megabytes.
type strIndex struct {
	seed   maphash.Seed
	m      map[uint64][]int32
	filter []uint64 // two bits per key, from two halves of its hash; sized in finish
	mask   uint64
}

func newStrIndex(seed maphash.Seed) strIndex {
	return strIndex{seed: seed, m: map[uint64][]int32{}}
}

func (x *strIndex) add(s string, idx int32) {
	h := maphash.String(x.seed, s)
	x.m[h] = appendOnce(x.m[h], idx)
}

// finish builds the filter once every key is added: about 16 bits per key.
func (x *strIndex) finish() {
	n := uint64(64)
	for n < uint64(len(x.m))*16 {
		n <<= 1
	}
	x.filter = make([]uint64, n/64)
	x.mask = n - 1
	for h := range x.m {
		a, b := h&x.mask, (h>>32)&x.mask
		x.filter[a>>6] |= 1 << (a & 63)
		x.filter[b>>6] |= 1 << (b & 63)
	}
}

func (x *strIndex) get(s string) []int32 {
	if len(x.m) == 0 {
		return nil
	}
	h := maphash.String(x.seed, s)
	a, b := h&x.mask, (h>>32)&x.mask
	if x.filter[a>>6]&(1<<(a&63)) == 0 || x.filter[b>>6]&(1<<(b&63)) == 0 {
		return nil
	}
	return x.m[h]
}

// labelBit returns the bit for a domain's label count (the top bit for 63 and more).
func labelBit(d string) uint64 {
	n := strings.Count(d, ".") + 1
	if n > 63 {
		n = 63
	}
	return 1 << n
}

func famOf(a netip.Addr) int {
	if a.Is4() {
		return 0
	}
	return 1
}

func appendOnce(s []int32, v int32) []int32 {
	if n := len(s); n > 0 && s[n-1] == v {
		return s
	}
	return append(s, v)
}

func portSpan(ps []config.PortRange) int {
	n := 0
	for _, p := range ps {
		n += int(p.Hi) - int(p.Lo) + 1
	}
	return n
}

// buildPortSegments splits the port space at every range boundary; each segment lists the rules covering
// it, ascending. Port-indexed rules cover at most 4096 ports each, which bounds the flattening.
func buildPortSegments(ranges [][2]uint32, rules []int32) ([]uint16, [][]int32) {
	if len(ranges) == 0 {
		return nil, nil
	}
	cuts := make([]uint32, 0, 2*len(ranges))
	for _, r := range ranges {
		cuts = append(cuts, r[0], r[1])
	}
	sort.Slice(cuts, func(i, j int) bool { return cuts[i] < cuts[j] })
	uniq := cuts[:1]
	for _, c := range cuts[1:] {
		if c != uniq[len(uniq)-1] {
			uniq = append(uniq, c)
		}
	}
	var segs []uint16
	var lists [][]int32
	for _, c := range uniq {
		if c > 65535 {
			break
		}
		segs = append(segs, uint16(c))
	}
	lists = make([][]int32, len(segs))
	for i, r := range ranges {
		start := sort.Search(len(segs), func(j int) bool { return uint32(segs[j]) >= r[0] })
		for j := start; j < len(segs) && uint32(segs[j]) < r[1]; j++ {
			lists[j] = appendOnce(lists[j], rules[i])
		}
	}
	for i := range lists {
		sort.Slice(lists[i], func(a, b int) bool { return lists[i][a] < lists[i][b] })
	}
	return segs, lists
}

func (di *dirIndex) portList(port uint16) []int32 {
	if di.portAny[port>>6]&(1<<(port&63)) == 0 {
		return nil
	}
	if di.portDirect != nil {
		// portAny said some rule covers port, so it lies in a segment.
		return di.portRules[di.portDirect[port]]
	}
	lo, hi := 0, len(di.portSegs)
	for lo < hi {
		m := int(uint(lo+hi) >> 1)
		if port < di.portSegs[m] {
			hi = m
		} else {
			lo = m + 1
		}
	}
	i := lo - 1
	if i < 0 {
		return nil
	}
	return di.portRules[i]
}

// Decide returns the first rule matching q, or the default for q's direction.
func (p *Policy) Decide(q *Query) Match {
	dir := q.Direction & 1
	di := &p.dirs[dir]
	best := int32(len(p.rules))

	// scan lowers best to the first rule of list that matches. Lists are ascending, so a scan stops as soon
	// as it reaches best: nothing after it can win.
	scan := func(list []int32) {
		for _, i := range list {
			if i >= best {
				return
			}
			if p.rules[i].matches(q) {
				best = i
				return
			}
		}
	}
	if q.Remote.IsValid() {
		fam := famOf(q.Remote)
		if t := di.ipTree[fam]; t != nil {
			for n := t.lookup(addrKey(q.Remote)); n >= 0; n = t.nodes[n].parent {
				scan(t.nodes[n].rules)
			}
		}
	}
	if q.Domain != "" && di.domLabels != 0 {
		d := q.Domain
		n := strings.Count(d, ".") + 1
		if di.domLabels&labelBit(d) != 0 {
			scan(di.domExact.get(d))
		}
		for ; ; n-- {
			if n >= 64 || di.domLabels&(1<<n) != 0 {
				scan(di.domSuffix.get(d))
			}
			i := strings.IndexByte(d, '.')
			if i < 0 {
				break
			}
			d = d[i+1:]
		}
	}
	if q.App != "" && (len(di.appExact.m) > 0 || len(di.appDir.m) > 0) {
		p.scanApp(di, q.App, scan)
		if di.appFold {
			if f := glob.Normalize(q.App, true); f != q.App {
				p.scanApp(di, f, scan)
			}
		}
	}
	if di.hasPortsIdx && q.Protocol.HasPorts() {
		scan(di.portList(q.ServicePort))
	}
	if q.UID >= 0 && len(di.uid) > 0 {
		scan(di.uid[q.UID])
	}
	scan(di.wildcard)

	if int(best) < len(p.rules) {
		r := &p.rules[best]
		return Match{Action: r.action, Rule: int(best), Name: r.name, Via: r.via}
	}
	return Match{Action: p.defaults[dir], Rule: -1}
}

func (p *Policy) scanApp(di *dirIndex, app string, scan func([]int32)) {
	scan(di.appExact.get(app))
	if len(di.appDir.m) == 0 {
		return
	}
	for d := app; ; {
		i := strings.LastIndexByte(d, '/')
		if i <= 0 {
			break
		}
		d = d[:i]
		scan(di.appDir.get(d))
	}
}

// decideLinear is the obvious first-match loop; tests hold Decide against it.
func (p *Policy) decideLinear(q *Query) Match {
	for i := range p.rules {
		if p.rules[i].matches(q) {
			r := &p.rules[i]
			return Match{Action: r.action, Rule: i, Name: r.name, Via: r.via}
		}
	}
	return Match{Action: p.defaults[q.Direction&1], Rule: -1}
}

// Config returns the config the policy was compiled from.
func (p *Policy) Config() *config.Config { return p.cfg }

// Len returns the number of rules.
func (p *Policy) Len() int { return len(p.rules) }

// matches reports whether every field the rule sets matches q.
func (r *compiledRule) matches(q *Query) bool {
	if r.dirMask&(1<<(q.Direction&1)) == 0 {
		return false
	}
	switch r.proto {
	case config.TCP:
		if q.Protocol != backend.TCP {
			return false
		}
	case config.UDP:
		if q.Protocol != backend.UDP {
			return false
		}
	case config.ICMP:
		if q.Protocol != backend.ICMP && q.Protocol != backend.ICMPv6 {
			return false
		}
	}
	if r.action == config.Split {
		// Only outbound TCP/UDP to somewhere other than this host can be split; for anything else a split
		// rule does not apply and the next rule decides.
		if !q.Protocol.HasPorts() || q.Remote.IsLoopback() {
			return false
		}
	}
	if len(r.ports) > 0 {
		if !q.Protocol.HasPorts() {
			return false
		}
		ok := false
		for _, pr := range r.ports {
			if pr.Contains(q.ServicePort) {
				ok = true
				break
			}
		}
		if !ok {
			return false
		}
	}
	if r.uid >= 0 && q.UID != r.uid {
		return false
	}
	if r.iface != "" && q.Interface != r.iface {
		return false
	}
	if r.hasRemote && !r.remoteMatches(q) {
		return false
	}
	if r.app != nil && (q.App == "" || !r.app.Match(q.App)) {
		return false
	}
	return true
}

func (r *compiledRule) remoteMatches(q *Query) bool {
	if q.Remote.IsValid() {
		if r.useRanges {
			if r.ranges[famOf(q.Remote)].contains(addrKey(q.Remote)) {
				return true
			}
		} else {
			for _, pf := range r.prefixes {
				if pf.Contains(q.Remote) {
					return true
				}
			}
		}
	}
	if q.Domain != "" {
		for _, d := range r.domains {
			if s, ok := strings.CutPrefix(d, "*."); ok {
				// "*.example.org" covers example.org itself and every name below it.
				if q.Domain == s || strings.HasSuffix(q.Domain, "."+s) {
					return true
				}
			} else if q.Domain == d {
				return true
			}
		}
	}
	return false
}

// BlockDomain reports whether a rule whose deciding condition is the domain blocks or drops name, so the
// nameserver can answer it with the block response. Defaults never block at DNS level: with
// default_action block, names of allowed destinations must still resolve.
func (p *Policy) BlockDomain(name string) bool {
	if !p.NeedsDomain {
		return false
	}
	q := Query{Direction: backend.Outbound, Domain: name, UID: -1}
	m := p.Decide(&q)
	if m.Rule < 0 || (m.Action != config.BlockAction && m.Action != config.DropAction) {
		return false
	}
	return len(p.rules[m.Rule].domains) > 0
}
