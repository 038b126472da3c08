package main

import (
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"

	"github.com/warden-fw/warden/backend"
	"github.com/warden-fw/warden/config"
	"github.com/warden-fw/warden/firewall"
)

// heapPacket is a minimal backend.Packet for feeding the pipeline in-process.
type heapPacket struct {
	info    backend.Info
	applied bool
}

func (p *heapPacket) Info() *backend.Info { return &p.info }
func (p *heapPacket) Payload() []byte     { return nil }
func (p *heapPacket) Apply(backend.Decision) error {
	if p.applied {
		return backend.ErrAlreadyApplied
	}
	p.applied = true
	return nil
}

// tableHeapPerConn measures, in this process, how much live heap the pipeline's connection table takes per
// connection: it compiles the benchmark's policy, decides n distinct UDP flows like the memory workload's,
// and compares the heap after a full collection before the pipeline was made and after. Unlike the RSS
// measurement it excludes the garbage collector's headroom and everything outside the pipeline.
func tableHeapPerConn(policyYAML string, n int) (float64, error) {
	dir, err := os.MkdirTemp("", "wardenbench-heap-")
	if err != nil {
		return 0, err
	}
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "warden.yaml")
	if err := os.WriteFile(path, []byte(policyYAML), 0o600); err != nil {
		return 0, err
	}
	cfg, err := config.Load(path)
	if err != nil {
		return 0, err
	}
	pol, err := firewall.Compile(cfg)
	if err != nil {
		return 0, err
	}
	// The baseline is taken before the pipeline exists: its table is sized at start (firewall's shardPresize),
	// and that memory belongs to the connections it holds.
	before := liveHeap()
	p := firewall.New(pol, firewall.Options{OwnPID: -2, MaxConnections: max(cfg.MaxConnections, n+1)})
	defer p.Close()
	var pkt heapPacket
	for i := range n {
		src, sport, dport := tuple(uint64(i), portUDPFirst)
		pkt = heapPacket{info: backend.Info{Protocol: backend.UDP, Direction: backend.Outbound,
			Local:  netip.AddrPortFrom(netip.AddrFrom4(src), uint16(sport)),
			Remote: netip.AddrPortFrom(serverAddr, uint16(dport)), PID: backend.Unknown, UID: 0, IfIndex: 2}}
		p.HandlePacket(&pkt)
	}
	after := liveHeap()
	got := p.Stats().Connections
	if got < n*99/100 {
		return 0, errors.New("the pipeline did not track the flows")
	}
	return float64(after-before) / float64(got), nil
}

func liveHeap() uint64 {
	var ms runtime.MemStats
	runtime.GC()
	runtime.GC()
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}
