package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/warden-fw/warden/backend/nfqueue"
	"github.com/warden-fw/warden/cmd/internal/control"
)

// bench is one invocation: the topology, the long-running children and the samples gathered so far.
type bench struct {
	o        *options
	ctx      context.Context
	stderr   io.Writer
	exe      string
	warden   string // binary, or "builtin"
	compare  string // --compare: a second warden binary, or ""
	tmp      string
	cfg      string // Warden's config file
	cfgRoute string // the same with split_tunnel.mode: route
	// cfgHandoff is the same with split_tunnel.mode: proxy and kernel_handoff: true.
	cfgHandoff string
	socket     string
	topo       *topology
	col        *collector

	children []*child
	tcpNext  uint64 // next run-wide connection index for TCP workloads
	udpNext  uint64
}

// child is a process inside a namespace.
type child struct {
	name  string
	cmd   *exec.Cmd
	stdin io.WriteCloser
	out   *bufio.Reader
	lines chan string
	done  chan struct{}
	log   string
}

func runBench(o *options, stdout, stderr io.Writer) (err error) {
	if os.Geteuid() != 0 {
		return errors.New("needs root (network namespaces, iptables, NFQUEUE)")
	}
	for _, tool := range []string{"ip", "iptables", "iptables-save", "nft", "conntrack"} {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Errorf("%s is required: %w", tool, err)
		}
	}
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	b := &bench{o: o, stderr: stderr, exe: exe, col: newCollector()}
	if b.warden, err = findWarden(o.warden, exe); err != nil {
		return err
	}
	if o.compare != "" {
		if b.compare, err = exec.LookPath(o.compare); err != nil {
			return fmt.Errorf("--compare: %w", err)
		}
	}
	if o.profile != "" {
		if err := os.MkdirAll(o.profile, 0o755); err != nil {
			return err
		}
		if o.profile, err = filepath.Abs(o.profile); err != nil {
			return err
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	defer stop()
	b.ctx = ctx

	removeStale()
	if b.tmp, err = os.MkdirTemp("", "wardenbench-"); err != nil {
		return err
	}
	defer func() {
		if o.keepLogs {
			fmt.Fprintln(stderr, "logs kept in", b.tmp)
		} else {
			os.RemoveAll(b.tmp)
		}
	}()
	b.socket = filepath.Join(b.tmp, "warden.sock")
	b.cfg = filepath.Join(b.tmp, "warden.yaml")
	pp := policyParams{Socket: b.socket, SplitRemote: serviceAddr.String(), SplitVia: "ub", Rules: o.rules, NoApps: o.noApps}
	policy := wardenConfig(pp)
	b.cfgRoute = filepath.Join(b.tmp, "warden-route.yaml")
	pp.SplitMode = cfgRoute
	if err := os.WriteFile(b.cfgRoute, []byte(wardenConfig(pp)), 0o600); err != nil {
		return err
	}
	b.cfgHandoff = filepath.Join(b.tmp, "warden-handoff.yaml")
	pp.SplitMode, pp.KernelHandoff = cfgProxy, true
	if err := os.WriteFile(b.cfgHandoff, []byte(wardenConfig(pp)), 0o600); err != nil {
		return err
	}
	if err := os.WriteFile(b.cfg, []byte(policy), 0o600); err != nil {
		return err
	}

	mach := machine()
	if b.topo, err = newTopology(); err != nil {
		return fmt.Errorf("creating namespaces: %w", err)
	}
	// Whatever happens from here on (an error, Ctrl-C), children are stopped and namespaces removed.
	defer func() {
		err = errors.Join(err, b.stopAll(), b.topo.remove())
	}()
	for _, s := range []struct{ ns, addr string }{{b.topo.server, serverAddr.String()}, {b.topo.uplink, serviceAddr.String()}} {
		if _, err := b.start(s.ns, "server-"+s.ns[len(s.ns)-1:], []string{b.exe, "_server", "-addr", s.addr}, true); err != nil {
			return err
		}
	}
	b.logf("namespaces %s, %s, %s ready; %d repetition(s) of %v per workload", b.topo.client, b.topo.server,
		b.topo.uplink, o.reps, o.duration)

	runErr := b.measure(policy)
	if runErr != nil && len(b.col.order) == 0 {
		return runErr
	}
	// An interrupted or failed run still reports what it measured, marked partial.
	rep := &Report{Machine: mach, Results: b.col.results(), Partial: runErr != nil}
	rep.Machine.LoadEnd = loadavg()
	rep.Ratios, rep.Targets = ratios(rep.Results)
	rep.Method = Method{Quick: o.quick, Reps: o.reps, DurationMS: o.duration.Milliseconds(), Clients: o.clients,
		LatencyRate: o.latencyRate, MemFlows: o.memFlows, MemClients: o.memClients, Rules: o.rules, Workloads: o.workloads, Warden: b.warden, Compare: b.compare, NoAppRules: o.noApps}
	writeTable(stdout, rep)
	if o.out != "" {
		runErr = errors.Join(runErr, writeJSON(o.out, rep))
	}
	return runErr
}

// measure runs every repetition of every configuration, then the memory workload.
func (b *bench) measure(policy string) error {
	o := b.o
	for rep := range o.reps {
		// Odd repetitions run the configurations in reverse order: the machine drifts within a run (other
		// tenants' load, state the workloads leave behind), and a fixed order would always hand the later
		// configurations the worse conditions.
		order := []string{cfgKernel, cfgBare, cfgWarden, cfgCompare, cfgRoute, cfgHandoff}
		if rep%2 == 1 {
			slices.Reverse(order)
		}
		for _, cfg := range order {
			if (cfg == cfgRoute || cfg == cfgHandoff) && !o.has(wlProxyBulk) && !o.has(wlProxyUDP) && !o.has(wlSplitSetup) {
				continue
			}
			if cfg == cfgCompare && o.compare == "" {
				continue
			}
			if err := b.runConfig(cfg, rep); err != nil {
				return fmt.Errorf("%s (repetition %d): %w", cfg, rep+1, err)
			}
		}
	}
	if o.has(wlMemory) {
		for rep := range o.reps {
			if err := b.runMemory(rep); err != nil {
				return fmt.Errorf("memory (repetition %d): %w", rep+1, err)
			}
		}
		if per, err := tableHeapPerConn(policy, o.memFlows); err == nil {
			b.col.add(wlTableHeap, "warden_inproc", "bytes", sample{value: per})
		} else {
			b.logf("in-process table measurement: %v", err)
		}
	}
	return nil
}

func (o *options) has(w string) bool { return slices.Contains(o.workloads, w) }

// findWarden resolves --warden: an explicit path, "builtin", or warden next to this binary or on $PATH.
func findWarden(flagVal, exe string) (string, error) {
	switch flagVal {
	case "builtin":
		return "builtin", nil
	case "":
		if p := filepath.Join(filepath.Dir(exe), "warden"); isExecutable(p) {
			return p, nil
		}
		if p, err := exec.LookPath("warden"); err == nil {
			return filepath.Abs(p)
		}
		return "", errors.New("no warden binary next to wardenbench or on $PATH: build one (go build -o DIR ./cmd/warden ./cmd/wardenbench) or pass --warden PATH (or --warden builtin)")
	default:
		if !isExecutable(flagVal) {
			return "", fmt.Errorf("--warden %s: not an executable file", flagVal)
		}
		return filepath.Abs(flagVal)
	}
}

func isExecutable(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0
}

func (b *bench) logf(format string, args ...any) {
	fmt.Fprintf(b.stderr, "wardenbench: "+format+"\n", args...)
}

// start runs argv inside ns. With ready, it waits for the child's "ready" line.
func (b *bench) start(ns, name string, argv []string, ready bool) (*child, error) {
	logPath := filepath.Join(b.tmp, name+".log")
	logf, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	cmd := exec.Command("ip", append([]string{"netns", "exec", ns}, argv...)...)
	cmd.Env = childEnviron()
	cmd.Stderr = logf
	// Its own process group: a Ctrl-C on the terminal reaches only the driver, which then stops the children
	// in order (Warden removes its rules) instead of racing them.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting %s: %w", name, err)
	}
	c := &child{name: name, cmd: cmd, stdin: stdin, out: bufio.NewReader(stdout), lines: make(chan string, 16),
		done: make(chan struct{}), log: logPath}
	b.children = append(b.children, c)
	go func() {
		sc := bufio.NewScanner(c.out)
		for sc.Scan() {
			c.lines <- sc.Text()
		}
		close(c.lines)
	}()
	go func() {
		_ = cmd.Wait()
		close(c.done)
	}()
	if ready {
		if l, err := b.line(c, 30*time.Second); err != nil || l != "ready" {
			return nil, fmt.Errorf("%s did not start (%q, %v): %s", name, l, err, tail(logPath))
		}
	}
	return c, nil
}

// line reads the next line a child prints, bounded in time.
func (b *bench) line(c *child, timeout time.Duration) (string, error) {
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case l, ok := <-c.lines:
		if !ok {
			return "", fmt.Errorf("%s exited", c.name)
		}
		return l, nil
	case <-t.C:
		return "", fmt.Errorf("%s did not answer within %v", c.name, timeout)
	case <-b.ctx.Done():
		return "", b.ctx.Err()
	}
}

// command sends one stdin command to a child and waits for its answer.
func (b *bench) command(c *child, cmd string) error {
	if _, err := io.WriteString(c.stdin, cmd+"\n"); err != nil {
		return err
	}
	l, err := b.line(c, 10*time.Second)
	if err != nil {
		return err
	}
	if l != "ok" {
		return fmt.Errorf("%s: %s: %s", c.name, cmd, l)
	}
	return nil
}

// stop ends a child: SIGTERM (Warden removes its rules) and stdin closed, then SIGKILL after a bound.
func (b *bench) stop(c *child) error {
	for i, x := range b.children {
		if x == c {
			b.children = append(b.children[:i], b.children[i+1:]...)
			break
		}
	}
	_ = c.cmd.Process.Signal(syscall.SIGTERM)
	c.stdin.Close()
	select {
	case <-c.done:
	case <-time.After(15 * time.Second):
		_ = c.cmd.Process.Kill()
		<-c.done
		return fmt.Errorf("%s did not stop within 15s; killed", c.name)
	}
	if st := c.cmd.ProcessState; st != nil && !st.Success() {
		if ws, ok := st.Sys().(syscall.WaitStatus); ok && ws.Signaled() && ws.Signal() == syscall.SIGTERM {
			return nil // a child that does not handle SIGTERM (the servers) ends by it
		}
		return fmt.Errorf("%s exited with %v: %s", c.name, st, tail(c.log))
	}
	return nil
}

func (b *bench) stopAll() error {
	var errs []error
	for len(b.children) > 0 {
		if err := b.stop(b.children[len(b.children)-1]); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// tail returns the end of a log file, for error messages.
func tail(path string) string {
	data, _ := os.ReadFile(path)
	if len(data) > 2000 {
		data = data[len(data)-2000:]
	}
	return strings.TrimSpace(string(data))
}

// childEnviron is the children's environment. Asynchronous preemption is off: its signals would interrupt
// the load generators' blocking system calls for nothing (they run one goroutine per thread anyway).
func childEnviron() []string {
	// A GODEBUG given to the harness (gctrace=1, say) reaches the children too.
	debug := "GODEBUG=asyncpreemptoff=1"
	if v := os.Getenv("GODEBUG"); v != "" {
		debug += "," + v
	}
	return append(os.Environ(), childEnv+"=1", debug)
}

// client runs one workload in C and returns its result.
func (b *bench) client(args ...string) (clientResult, error) {
	ctx, cancel := context.WithTimeout(b.ctx, b.o.duration+5*time.Minute)
	defer cancel()
	argv := append([]string{"netns", "exec", b.topo.client, b.exe, "_client"}, args...)
	cmd := exec.CommandContext(ctx, "ip", argv...)
	cmd.Env = childEnviron()
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return clientResult{}, fmt.Errorf("client %v: %w: %s", args, err, strings.TrimSpace(errb.String()))
	}
	var r clientResult
	if err := json.Unmarshal(out.Bytes(), &r); err != nil {
		return r, fmt.Errorf("client %v: bad output %q: %w", args, out.String(), err)
	}
	if r.FirstErr != "" {
		b.logf("  %d error(s), first: %s", r.Errors, r.FirstErr)
	}
	return r, nil
}

// guard is what runs in C for one configuration.
type guard struct {
	c       *child
	builtin bool // a wardenbench child that takes profile commands
}

func (b *bench) startFirewall(cfg string) (*guard, error) {
	if err := b.topo.resetFirewall(); err != nil {
		return nil, err
	}
	switch cfg {
	case cfgKernel:
		n, err := b.topo.ruleCount()
		if err != nil {
			return nil, err
		}
		if n != 0 {
			return nil, fmt.Errorf("kernel-only configuration: %s still has %d rules", b.topo.client, n)
		}
		return &guard{}, nil
	case cfgBare:
		const first, queues = 1800, 4
		c, err := b.start(b.topo.client, "bare", []string{b.exe, "_bare", "-first", strconv.Itoa(first), "-queues", strconv.Itoa(queues)}, true)
		if err != nil {
			return nil, err
		}
		for _, r := range bareRules(first, queues) {
			if err := inNS(b.topo.client, append([]string{"iptables"}, r...)...); err != nil {
				return nil, errors.Join(err, b.stop(c))
			}
		}
		return &guard{c: c, builtin: true}, nil
	case cfgWarden, cfgRoute, cfgHandoff, cfgCompare:
		path := map[string]string{cfgRoute: b.cfgRoute, cfgHandoff: b.cfgHandoff}[cfg]
		if path == "" {
			path = b.cfg
		}
		argv := []string{b.warden, "run", "-c", path}
		switch {
		case cfg == cfgCompare:
			argv[0] = b.compare
		case b.warden == "builtin":
			argv = []string{b.exe, "_warden", "-c", path}
		}
		c, err := b.start(b.topo.client, "warden", argv, false)
		if err != nil {
			return nil, err
		}
		if err := b.waitWarden(c); err != nil {
			return nil, errors.Join(err, b.stop(c))
		}
		return &guard{c: c, builtin: b.warden == "builtin" && cfg != cfgCompare}, nil
	}
	return nil, fmt.Errorf("unknown configuration %s", cfg)
}

// waitWarden waits until Warden answers on its control socket, which it opens after its rules are in place.
func (b *bench) waitWarden(c *child) error {
	deadline := time.Now().Add(60 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(b.ctx, 2*time.Second)
		_, err := control.NewClient(b.socket).Status(ctx)
		cancel()
		if err == nil {
			return nil
		}
		select {
		case <-c.done:
			return fmt.Errorf("warden exited: %s", tail(c.log))
		case <-b.ctx.Done():
			return b.ctx.Err()
		case <-time.After(50 * time.Millisecond): // polling a socket that has no readiness event
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("warden did not answer within 60s: %v: %s", err, tail(c.log))
		}
	}
}

func (b *bench) stopFirewall(fw *guard) error {
	var errs []error
	if fw.c != nil {
		errs = append(errs, b.stop(fw.c))
	}
	errs = append(errs, b.topo.resetFirewall())
	return errors.Join(errs...)
}

// runConfig measures one configuration's workloads once.
func (b *bench) runConfig(cfg string, rep int) (err error) {
	if err := b.ctx.Err(); err != nil {
		return err
	}
	fw, err := b.startFirewall(cfg)
	if err != nil {
		return err
	}
	defer func() { err = errors.Join(err, b.stopFirewall(fw)) }()
	b.logf("repetition %d: %s", rep+1, cfg)
	o := b.o
	dur := "-duration=" + o.duration.String()
	clients := "-clients=" + strconv.Itoa(o.clients)
	type run struct {
		workload string
		config   string
		args     []string
		udp      bool
		profile  bool
	}
	var runs []run
	if cfg != cfgRoute && cfg != cfgHandoff { // these differ from Warden's only in how split traffic is carried
		runs = []run{
			{wlTCPConnect, cfg, []string{"-workload=tcp_connect", dur, clients}, false, true},
			{wlUDPFlows, cfg, []string{"-workload=udp_flows", dur, clients}, true, true},
			{wlLatency, cfg, []string{"-workload=latency", dur, "-clients=4", "-rate=" + strconv.Itoa(o.latencyRate)}, false, false},
			{wlBulk, cfg, []string{"-workload=bulk", dur}, false, true},
		}
	}
	// The split workloads compare the kernel's direct path with Warden's split tunnel to the same server: through
	// the proxy's relay, and by kernel routing.
	proxyCfg := map[string]string{cfgKernel: cfgDirect, cfgWarden: cfgProxy, cfgRoute: cfgRoute, cfgHandoff: cfgHandoff}[cfg]
	if proxyCfg != "" {
		svc := "-dst=" + serviceAddr.String()
		runs = append(runs,
			run{wlProxyBulk, proxyCfg, []string{"-workload=bulk", dur, svc}, false, true},
			run{wlProxyUDP, proxyCfg, []string{"-workload=udp_rr", dur, "-clients=4", svc}, false, true},
			// One source address, as a real host: with eight, MASQUERADE (route mode) folds them onto the uplink's
			// one address, their unrelated TCP timestamp offsets meet the server's TIME_WAIT sockets and PAWS
			// drops about 1% of the SYNs (TcpExtPAWSTimewait on the server), which no single host would see.
			run{wlSplitSetup, proxyCfg, []string{"-workload=latency", dur, "-clients=4", "-rate=" + strconv.Itoa(o.latencyRate), "-one-src", svc}, false, false},
		)
	}
	for _, r := range runs {
		if !o.has(r.workload) {
			continue
		}
		if err := b.ctx.Err(); err != nil {
			return err
		}
		next := &b.tcpNext
		if r.udp {
			next = &b.udpNext
		}
		profiling := o.profile != "" && rep == 0 && r.profile && fw.builtin
		if profiling {
			if err := b.command(fw.c, "start "+filepath.Join(o.profile, r.config+"-"+r.workload+".pprof")); err != nil {
				return err
			}
		}
		var perf *exec.Cmd
		var bpfRec *bpfRecorder
		if o.profile != "" && rep == 0 && r.profile {
			perf = b.startPerf(r.config + "-" + r.workload)
			if r.config == cfgWarden || r.config == cfgProxy || r.config == cfgRoute || r.config == cfgHandoff {
				bpfRec = b.startBPFStats()
			}
		}
		fwPID := 0
		if fw.c != nil {
			fwPID = fw.c.cmd.Process.Pid // `ip netns exec` execs the consumer in place: same PID
		}
		var res clientResult
		var err error
		var cpu0, cpu1 cpuTimes
		var fw0, fw1 time.Duration
		var drops0, drops1 int64
		retried := 0
		for {
			args := append(slices.Clone(r.args), "-base="+strconv.FormatUint(*next, 10))
			cpu0, fw0, drops0 = readCPU(), processCPU(fwPID), queueDrops(fwPID)
			res, err = b.client(args...)
			cpu1, fw1, drops1 = readCPU(), processCPU(fwPID), queueDrops(fwPID)
			stolen := cpu1.stolenSince(cpu0)
			if err != nil || o.maxSteal <= 0 || stolen <= o.maxSteal || retried == stealRetries || profiling || perf != nil {
				break
			}
			// The hypervisor gave much of the CPU to other guests: the run measured them as much as this
			// configuration. Every configuration is held to the same limit.
			retried++
			if res.Next > *next {
				*next = res.Next // a repeat still uses 5-tuples never seen before
			}
			b.logf("  %-16s %-13s repeated (%d of %d): %.1f%% of the CPU time was stolen by the hypervisor, over the %.0f%% limit",
				r.workload, r.config, retried, stealRetries, stolen*100, o.maxSteal*100)
		}
		busy := cpu1.busySince(cpu0)
		if profiling {
			err = errors.Join(err, b.command(fw.c, "stop"))
		}
		// The bulk workloads' operation is a megabyte moved: their machine time per MB shows what a byte costs
		// each configuration, which moves less from run to run than the rate.
		ops := float64(res.Ops)
		if isBulk(r.workload) {
			ops = float64(res.Bytes) / 1e6
		}
		if perf != nil {
			err = errors.Join(err, b.finishPerf(perf, uint64(ops), fwPID))
		}
		if bpfRec != nil {
			perOp, berr := bpfRec.finish(filepath.Join(o.profile, r.config+"-"+r.workload+".bpf.txt"), uint64(ops))
			err = errors.Join(err, berr)
			if perOp > 0 {
				b.logf("  Warden's attribution programs: %.2f µs of applications' CPU per operation", float64(perOp.Nanoseconds())/1e3)
			}
		}
		if err != nil {
			return err
		}
		if res.Next > *next {
			*next = res.Next
		}
		secs := float64(res.Elapsed) / 1e9
		s := sample{errors: res.Errors, p50: res.P50, p99: res.P99, cpuBusy: busy, stolen: cpu1.stolenSince(cpu0),
			stealRepeats: retried}
		if drops0 >= 0 && drops1 > drops0 {
			s.queueDrops = uint64(drops1 - drops0)
		}
		// Costs per operation for the workloads that count operations (the latency ones count connections too,
		// but at a fixed rate that leaves the machine mostly idle, so their costs would measure waiting).
		countsOps := r.workload == wlTCPConnect || r.workload == wlUDPFlows || r.workload == wlProxyUDP || isBulk(r.workload)
		if countsOps && ops > 0 {
			s.machineUS = cpu1.busyTimeSince(cpu0).Seconds() * 1e6 / ops
			if cpu1.switches > cpu0.switches {
				s.switches = float64(cpu1.switches-cpu0.switches) / ops
			}
			if fw0 >= 0 && fw1 > fw0 {
				s.fwUS = (fw1 - fw0).Seconds() * 1e6 / ops
			}
		}
		var unit string
		switch r.workload {
		case wlTCPConnect:
			s.value, unit = float64(res.Ops)/secs, "conn/s"
		case wlUDPFlows:
			s.value, unit = float64(res.Ops)/secs, "flows/s"
		case wlLatency, wlSplitSetup:
			s.value, unit = res.P50, "us (p50)"
		case wlBulk, wlProxyBulk:
			s.value, unit = float64(res.Bytes)/secs/1e6, "MB/s"
		case wlProxyUDP:
			s.value, unit = float64(res.Ops)/secs, "rr/s"
		}
		b.col.add(r.workload, r.config, unit, s)
		costs := ""
		if s.machineUS > 0 {
			costs = fmt.Sprintf(" machine %.0fµs/op %.1fcs/op", s.machineUS, s.switches)
		}
		if s.fwUS > 0 {
			costs += fmt.Sprintf(" firewall %.1fµs/op", s.fwUS)
		}
		drops := ""
		if s.queueDrops > 0 {
			drops = fmt.Sprintf(" queue drops %d", s.queueDrops)
		}
		stolen := ""
		if s.stolen >= 0.001 {
			stolen = fmt.Sprintf(" stolen %.1f%%", s.stolen*100)
		}
		b.logf("  %-16s %-13s %10.0f %-8s p50 %6.0fµs p99 %6.0fµs cpu %3.0f%%%s%s errors %d%s", r.workload, r.config,
			s.value, unit, res.P50, res.P99, busy*100, stolen, costs, res.Errors, drops)
	}
	if cfg == cfgWarden || cfg == cfgCompare {
		if st, err := control.NewClient(b.socket).Status(b.ctx); err == nil {
			b.logf("  warden: %d packets, %d connections, %d process lookups (%d inline, %d unknown, %d skipped), %d failures",
				st.Pipeline.Packets, st.Pipeline.Connections, st.Pipeline.ProcessLookups, st.Pipeline.ProcessInline,
				st.Pipeline.ProcessUnknown, st.Pipeline.ProcessSkipped, st.Pipeline.Failures)
			if a := st.Attribution; a != nil {
				b.logf("  attribution: ebpf %v (socket storage %v), %d map answers (%d without a system call, %d by the tuple, %d from the mirror), %d sock_diag queries, %d /proc, %d map misses, %d stale, %d mirror events, %d resets",
					a.EBPF, a.SocketStorage, a.MapAnswers, a.MapFast, a.TupleAnswers, a.MirrorAnswers, a.DiagLookups, a.ProcAnswers, a.MapMisses, a.MapStale, a.MirrorEvents, a.MirrorResets)
			}
		}
	}
	return nil
}

// startPerf records the whole machine's stacks (kernel and user) for the length of one workload run, when perf
// is installed: the queue's cost is mostly in the kernel, where pprof does not look.
func (b *bench) startPerf(name string) *exec.Cmd {
	path, err := exec.LookPath("perf")
	if err != nil {
		return nil
	}
	cmd := exec.Command(path, "record", "-a", "-g", "-q", "-o", filepath.Join(b.o.profile, name+".perf.data"),
		"--", "sleep", strconv.FormatFloat(b.o.duration.Seconds(), 'f', 3, 64))
	cmd.Stdout, cmd.Stderr = io.Discard, io.Discard
	if err := cmd.Start(); err != nil {
		b.logf("perf: %v", err)
		return nil
	}
	return cmd
}

// finishPerf waits for a recording and writes beside it its flat report (by symbol, with the command) and its
// split into the parts of a connection's cost per operation (see costParts).
func (b *bench) finishPerf(cmd *exec.Cmd, ops uint64, fwPID int) error {
	if err := cmd.Wait(); err != nil {
		b.logf("perf record: %v", err)
		return nil
	}
	var data string
	for i, a := range cmd.Args {
		if a == "-o" {
			data = cmd.Args[i+1]
		}
	}
	out, err := exec.Command(cmd.Path, "report", "-i", data, "--stdio", "--no-children", "-g", "none",
		"--sort", "comm,dso,sym", "--percent-limit", "0.5").Output()
	if err != nil {
		b.logf("perf report: %v", err)
		return nil
	}
	base := strings.TrimSuffix(data, ".perf.data")
	if err := os.WriteFile(base+".perf.txt", out, 0o644); err != nil {
		return err
	}
	script := exec.Command(cmd.Path, "script", "-i", data, "-F", "pid,period,ip,sym")
	stdout, err := script.StdoutPipe()
	if err != nil {
		return err
	}
	if err := script.Start(); err != nil {
		b.logf("perf script: %v", err)
		return nil
	}
	split, serr := splitPerfScript(stdout, fwPID)
	_, _ = io.Copy(io.Discard, stdout) // let perf finish writing after a parse error
	if err := script.Wait(); err != nil || serr != nil {
		b.logf("perf script: %v", errors.Join(err, serr))
		return nil
	}
	var buf strings.Builder
	writeSplit(&buf, split, ops)
	b.logf("  perf per operation: %s", split.summary(ops))
	return os.WriteFile(base+".split.txt", []byte(buf.String()), 0o644)
}

// runMemory starts a fresh Warden, reads its resident memory idle, makes it track o.memFlows new UDP flows
// (each a distinct 5-tuple with a request and a reply), and reads it again.
func (b *bench) runMemory(rep int) (err error) {
	if err := b.ctx.Err(); err != nil {
		return err
	}
	fw, err := b.startFirewall(cfgWarden)
	if err != nil {
		return err
	}
	defer func() { err = errors.Join(err, b.stopFirewall(fw)) }()
	b.logf("repetition %d: memory with %d flows", rep+1, b.o.memFlows)
	pid := fw.c.cmd.Process.Pid // `ip netns exec` execs Warden in place: same PID
	status := func() (control.Status, error) { return control.NewClient(b.socket).Status(b.ctx) }
	// Idle means after start-up settled: the policy compiled, the rules installed and the garbage of both
	// collected at least once (the Go runtime runs a GC every 2 minutes at the latest; one second is enough for
	// the start-up's transient allocations to be gone from the heap goal in practice).
	time.Sleep(time.Second)
	rss0, err := vmRSS(pid)
	if err != nil {
		return err
	}
	st0, err := status()
	if err != nil {
		return err
	}
	res, err := b.client("-workload=udp_flows", "-clients="+strconv.Itoa(b.o.memClients),
		"-count="+strconv.Itoa(b.o.memFlows), "-base="+strconv.FormatUint(b.udpNext, 10))
	if err != nil {
		return err
	}
	b.udpNext = res.Next
	var st1 control.Status
	deadline := time.Now().Add(10 * time.Second)
	for {
		if st1, err = status(); err != nil {
			return err
		}
		if uint64(st1.Pipeline.Connections-st0.Pipeline.Connections) >= res.Ops || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond) // decisions are applied before the reply; this rarely loops
	}
	rss1, err := vmRSS(pid)
	if err != nil {
		return err
	}
	added := st1.Pipeline.Connections - st0.Pipeline.Connections
	if added <= 0 {
		return fmt.Errorf("warden tracked no new connections (%d flows made)", res.Ops)
	}
	per := float64(rss1-rss0) * 1024 / float64(added)
	b.col.add(wlRSSIdle, cfgWarden, "KiB", sample{value: float64(rss0)})
	b.col.add(wlRSSTracked, cfgWarden, "KiB", sample{value: float64(rss1), errors: res.Errors})
	b.col.add(wlBytesPerCon, cfgWarden, "bytes", sample{value: per})
	b.logf("  rss idle %d KiB, with %d tracked connections %d KiB: %.0f bytes per connection", rss0,
		st1.Pipeline.Connections, rss1, per)
	return nil
}

// cpuTimes are the machine's total, idle and stolen CPU time (jiffies) and its context switches since boot,
// from /proc/stat. Stolen time is time the hypervisor gave this virtual machine's CPUs to someone else: not
// work of any configuration, so it counts as neither busy nor idle.
type cpuTimes struct{ total, idle, steal, switches uint64 }

func readCPU() cpuTimes {
	data, err := os.ReadFile("/proc/stat")
	if err != nil {
		return cpuTimes{}
	}
	return parseStat(string(data))
}

// parseStat reads the aggregate "cpu" line and the "ctxt" line of /proc/stat's text.
func parseStat(data string) cpuTimes {
	var t cpuTimes
	for l := range strings.SplitSeq(data, "\n") {
		f := strings.Fields(l)
		switch {
		case len(f) == 2 && f[0] == "ctxt":
			t.switches, _ = strconv.ParseUint(f[1], 10, 64)
		case len(f) > 1 && f[0] == "cpu":
			for i, s := range f[1:] {
				if i >= 8 { // guest times are already in user and nice
					break
				}
				v, _ := strconv.ParseUint(s, 10, 64)
				t.total += v
				switch i {
				case 3, 4: // idle, iowait
					t.idle += v
				case 7:
					t.steal += v
				}
			}
		}
	}
	return t
}

// userHZ is the unit of the CPU times in /proc/stat and /proc/PID/stat (USER_HZ, 100 on every Linux
// architecture Go runs on).
const userHZ = 100

// queueDrops returns how many packets the NFQUEUE queues of a process's network namespace have dropped (the
// queue full, or its message not delivered), or -1 when there is no such process or no queue. Each such drop
// loses a connection's first packet: the connection waits for a retransmission (a TCP SYN's after 1 s).
func queueDrops(pid int) int64 {
	if pid == 0 {
		return -1
	}
	f, err := os.Open(fmt.Sprintf("/proc/%d/net/netfilter/nfnetlink_queue", pid))
	if err != nil {
		return -1
	}
	defer f.Close()
	n, err := nfqueue.ParseQueueDrops(f, func(uint16) bool { return true })
	if err != nil {
		return -1
	}
	return int64(n)
}

// processCPU returns the user and system CPU time a process has used, all its threads together (those that
// exited included), or -1 when there is no such process.
func processCPU(pid int) time.Duration {
	if pid == 0 {
		return -1
	}
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return -1
	}
	// The command name may hold spaces and parentheses: the fields start after the last ')'.
	i := strings.LastIndexByte(string(data), ')')
	if i < 0 {
		return -1
	}
	f := strings.Fields(string(data[i+1:]))
	if len(f) < 13 {
		return -1
	}
	// utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name (state is the first).
	utime, err1 := strconv.ParseInt(f[11], 10, 64)
	stime, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return -1
	}
	return time.Duration(utime+stime) * time.Second / userHZ
}

// busy is the CPU time spent on this machine's own work.
func (t cpuTimes) busy() uint64 { return t.total - t.idle - t.steal }

// busyTimeSince returns the CPU time the machine was busy between then and t, all CPUs together.
func (t cpuTimes) busyTimeSince(then cpuTimes) time.Duration {
	if t.total < then.total || t.busy() < then.busy() {
		return 0
	}
	return time.Duration(t.busy()-then.busy()) * time.Second / userHZ
}

// busySince returns the busy share of CPU time between then and t.
func (t cpuTimes) busySince(then cpuTimes) float64 {
	total := t.total - then.total
	if total == 0 || t.total < then.total || t.busy() < then.busy() {
		return 0
	}
	return float64(t.busy()-then.busy()) / float64(total)
}

// stolenSince returns the share of CPU time between then and t that the hypervisor took away.
func (t cpuTimes) stolenSince(then cpuTimes) float64 {
	total := t.total - then.total
	if total == 0 || t.total < then.total || t.steal < then.steal {
		return 0
	}
	return float64(t.steal-then.steal) / float64(total)
}

// vmRSS reads a process's resident set size in KiB.
func vmRSS(pid int) (uint64, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for l := range strings.SplitSeq(string(data), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			return strconv.ParseUint(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
		}
	}
	return 0, fmt.Errorf("no VmRSS in /proc/%d/status", pid)
}

func loadavg() string {
	data, _ := os.ReadFile("/proc/loadavg")
	f := strings.Fields(string(data))
	if len(f) < 3 {
		return ""
	}
	return strings.Join(f[:3], " ")
}

func machine() Machine {
	m := baseMachine()
	m.LoadStart = loadavg()
	if data, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for l := range strings.SplitSeq(string(data), "\n") {
			if v, ok := strings.CutPrefix(l, "model name"); ok {
				m.CPUModel = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(v), ":"))
				break
			}
		}
	}
	var u syscall.Utsname
	if syscall.Uname(&u) == nil {
		var sb strings.Builder
		for _, c := range u.Release {
			if c == 0 {
				break
			}
			sb.WriteByte(byte(c))
		}
		m.Kernel = sb.String()
	}
	if data, err := os.ReadFile("/proc/meminfo"); err == nil {
		for l := range strings.SplitSeq(string(data), "\n") {
			if v, ok := strings.CutPrefix(l, "MemTotal:"); ok {
				m.MemTotalKiB, _ = strconv.ParseUint(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
				break
			}
		}
	}
	return m
}

// isBulk reports whether a workload moves bytes on one connection, whose operation is then a megabyte.
func isBulk(workload string) bool { return workload == wlBulk || workload == wlProxyBulk }
