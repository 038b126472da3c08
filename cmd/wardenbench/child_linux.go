package main

// The hidden subcommands. Each runs inside a namespace (under `ip netns exec`) as a child of the driver:
//
//	_server   TCP request/response, UDP echo and a bulk TCP source; runs until stdin closes
//	_client   one workload run; prints one JSON line with its counts and latencies
//	_bare     the bare accept-all NFQUEUE consumer; runs until stdin closes
//	_warden   Warden's daemon package (like `warden run`), for --warden builtin and --profile
//
// The long-running children read commands from stdin ("start PATH": begin a CPU profile, "stop": end it) and
// exit when stdin closes, so they never outlive the driver.

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"os/signal"
	"runtime/pprof"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	nfq "github.com/florianl/go-nfqueue/v2"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	_ "github.com/warden-fw/warden/backend/nfqueue" // registers the Linux backend for _warden
	"github.com/warden-fw/warden/backend/nfqueue/nfqread"
	"github.com/warden-fw/warden/backend/nfqueue/nfqverdict"
	"github.com/warden-fw/warden/cmd/internal/daemon"
)

func childMain(role string, args []string) int {
	var err error
	switch role {
	case "_server":
		err = serverMain(args)
	case "_client":
		err = clientMain(args)
	case "_bare":
		err = bareMain(args)
	case "_warden":
		err = wardenMain(args)
	default:
		err = fmt.Errorf("unknown subcommand %s", role)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "wardenbench %s: %v\n", role, err)
		return 1
	}
	return 0
}

// serveStdin answers profile commands until stdin closes.
func serveStdin() {
	sc := bufio.NewScanner(os.Stdin)
	var f *os.File
	for sc.Scan() {
		cmd, arg, _ := strings.Cut(sc.Text(), " ")
		var err error
		switch cmd {
		case "start":
			if f, err = os.Create(arg); err == nil {
				if err = pprof.StartCPUProfile(f); err != nil {
					f.Close()
					f = nil
				}
			}
		case "stop":
			if f != nil {
				pprof.StopCPUProfile()
				err = f.Close()
				f = nil
			}
		default:
			err = fmt.Errorf("unknown command %q", cmd)
		}
		if err != nil {
			fmt.Println("error", err)
		} else {
			fmt.Println("ok")
		}
	}
	if f != nil {
		pprof.StopCPUProfile()
		f.Close()
	}
}

// Blocking system calls on sockets with timeouts return EINTR when a signal arrives (SA_RESTART does not
// apply to them); these retry.

func rd(fd int, p []byte) (int, error) {
	for {
		n, err := unix.Read(fd, p)
		if err != unix.EINTR {
			return n, err
		}
	}
}

func wr(fd int, p []byte) (int, error) {
	for {
		n, err := unix.Write(fd, p)
		if err != unix.EINTR {
			return n, err
		}
	}
}

// connectFD connects a blocking socket. An interrupted connect goes on in the background; it then waits for
// it (bounded) and reports its outcome.
func connectFD(fd int, sa unix.Sockaddr) error {
	err := unix.Connect(fd, sa)
	if err != unix.EINTR {
		return err
	}
	pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLOUT}}
	for {
		n, err := unix.Poll(pfd, 5000)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return err
		}
		if n == 0 {
			return unix.ETIMEDOUT
		}
		if soErr, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR); err != nil {
			return err
		} else if soErr != 0 {
			return unix.Errno(soErr)
		}
		return nil
	}
}

// --- server ---

func listenSock(typ int, addr [4]byte, port int) (int, error) {
	fd, err := unix.Socket(unix.AF_INET, typ|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, err
	}
	_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1)
	// Accepted sockets inherit the timeout, so a vanished client never holds a worker for long.
	_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Sec: 2})
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: addr, Port: port}); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("binding port %d: %w", port, err)
	}
	if typ == unix.SOCK_STREAM {
		if err := unix.Listen(fd, 4096); err != nil {
			unix.Close(fd)
			return -1, err
		}
	}
	return fd, nil
}

// serverMain serves, with blocking system calls on dedicated threads (the lightest server Go allows):
// request/response TCP (read 64 bytes, answer 64 bytes, close first so TIME_WAIT stays on this side), UDP
// echo, and a bulk source that writes until the peer goes away.
//
// UDP binds the given address, so that replies leave from the address the client sent to.
func serverMain(args []string) error {
	fs := flag.NewFlagSet("_server", flag.ContinueOnError)
	addrFlag := fs.String("addr", "", "address the UDP echo binds")
	if err := fs.Parse(args); err != nil {
		return err
	}
	udpAddr, err := netip.ParseAddr(*addrFlag)
	if err != nil || !udpAddr.Is4() {
		return fmt.Errorf("-addr %q: an IPv4 address is required", *addrFlag)
	}
	resp := make([]byte, reqSize)
	for p := range portSpread {
		lfd, err := listenSock(unix.SOCK_STREAM, [4]byte{}, portTCPFirst+p)
		if err != nil {
			return err
		}
		for range 2 {
			go func() {
				buf := make([]byte, 512)
				for {
					fd, _, err := unix.Accept4(lfd, unix.SOCK_CLOEXEC)
					if err != nil {
						if err == unix.EINTR || err == unix.ECONNABORTED || err == unix.EAGAIN {
							continue
						}
						time.Sleep(time.Millisecond)
						continue
					}
					if n, _ := rd(fd, buf); n > 0 {
						_, _ = wr(fd, resp)
					}
					unix.Close(fd)
				}
			}()
		}
		ufd, err := listenSock(unix.SOCK_DGRAM, udpAddr.As4(), portUDPFirst+p)
		if err != nil {
			return err
		}
		_ = unix.SetsockoptTimeval(ufd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{})
		_ = unix.SetsockoptInt(ufd, unix.SOL_SOCKET, unix.SO_RCVBUF, 4<<20)
		go func() {
			buf := make([]byte, 2048)
			for {
				n, from, err := unix.Recvfrom(ufd, buf, 0)
				if err != nil {
					continue
				}
				_ = unix.Sendto(ufd, buf[:n], 0, from)
			}
		}()
	}
	bfd, err := listenSock(unix.SOCK_STREAM, [4]byte{}, portBulk)
	if err != nil {
		return err
	}
	_ = unix.SetsockoptTimeval(bfd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{})
	go func() {
		chunk := make([]byte, 256<<10)
		for {
			fd, _, err := unix.Accept4(bfd, unix.SOCK_CLOEXEC)
			if err != nil {
				continue
			}
			_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &unix.Timeval{Sec: 5})
			go func() {
				defer unix.Close(fd)
				for {
					if _, err := wr(fd, chunk); err != nil {
						return
					}
				}
			}()
		}
	}()
	fmt.Println("ready")
	serveStdin()
	return nil
}

// --- client ---

// clientResult is what one workload run reports.
type clientResult struct {
	Ops      uint64  `json:"ops"`
	Errors   uint64  `json:"errors"`
	Elapsed  int64   `json:"elapsed_ns"`
	Bytes    uint64  `json:"bytes"`
	P50      float64 `json:"p50_us"`
	P99      float64 `json:"p99_us"`
	Next     uint64  `json:"next"`
	FirstErr string  `json:"first_error,omitempty"`
}

type clientArgs struct {
	workload string
	duration time.Duration
	clients  int
	rate     int
	base     uint64
	count    uint64
	dst      netip.Addr
	// oneSrc makes every connection come from one source address, as a real host's do (see the split
	// workloads in docs/performance.md).
	oneSrc bool
}

func clientMain(args []string) error {
	fs := flag.NewFlagSet("_client", flag.ContinueOnError)
	var a clientArgs
	var dst string
	fs.StringVar(&a.workload, "workload", "", "")
	fs.DurationVar(&a.duration, "duration", time.Second, "")
	fs.IntVar(&a.clients, "clients", 8, "")
	fs.IntVar(&a.rate, "rate", 0, "")
	fs.Uint64Var(&a.base, "base", 0, "")
	fs.Uint64Var(&a.count, "count", 0, "")
	fs.StringVar(&dst, "dst", serverAddr.String(), "")
	fs.BoolVar(&a.oneSrc, "one-src", false, "")
	if err := fs.Parse(args); err != nil {
		return err
	}
	var err error
	if a.dst, err = netip.ParseAddr(dst); err != nil {
		return err
	}
	var res clientResult
	switch a.workload {
	case "tcp_connect", "latency":
		res = runTransactions(a, tcpTransaction)
	case "udp_flows":
		res = runTransactions(a, udpTransaction)
	case "bulk":
		res, err = runBulk(a)
	case "udp_rr":
		res = runUDPRR(a)
	default:
		return fmt.Errorf("unknown workload %q", a.workload)
	}
	if err != nil {
		return err
	}
	return json.NewEncoder(os.Stdout).Encode(res)
}

// transaction opens one new connection (flow) with index i, exchanges one request and response and closes
// it. It returns how long the connection took to establish (TCP) or the round trip took (UDP).
type transaction func(i uint64, dst netip.Addr, buf []byte) (time.Duration, error)

func tcpTransaction(i uint64, dst netip.Addr, buf []byte) (time.Duration, error) {
	src, sport, dport := tuple(i, portTCPFirst)
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, err
	}
	defer unix.Close(fd)
	_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1)
	tv := unix.Timeval{Sec: 2}
	_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &tv) // bounds connect
	_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: src, Port: sport}); err != nil {
		return 0, fmt.Errorf("bind: %w", err)
	}
	t0 := time.Now()
	if err := connectFD(fd, &unix.SockaddrInet4{Addr: dst.As4(), Port: dport}); err != nil {
		return 0, fmt.Errorf("connect: %w", err)
	}
	took := time.Since(t0)
	if _, err := wr(fd, buf[:reqSize]); err != nil {
		return 0, fmt.Errorf("write: %w", err)
	}
	got := 0
	for {
		n, err := rd(fd, buf)
		if err != nil {
			return 0, fmt.Errorf("read: %w", err)
		}
		if n == 0 {
			break
		}
		got += n
	}
	if got != reqSize {
		return 0, fmt.Errorf("short response: %d bytes", got)
	}
	return took, nil
}

func udpTransaction(i uint64, dst netip.Addr, buf []byte) (time.Duration, error) {
	src, sport, dport := tuple(i, portUDPFirst)
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, err
	}
	defer unix.Close(fd)
	_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Usec: 500000})
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: src, Port: sport}); err != nil {
		return 0, fmt.Errorf("bind: %w", err)
	}
	if err := connectFD(fd, &unix.SockaddrInet4{Addr: dst.As4(), Port: dport}); err != nil {
		return 0, fmt.Errorf("connect: %w", err)
	}
	t0 := time.Now()
	if _, err := wr(fd, buf[:reqSize]); err != nil {
		return 0, fmt.Errorf("write: %w", err)
	}
	n, err := rd(fd, buf)
	if err != nil {
		return 0, fmt.Errorf("read: %w", err)
	}
	if n != reqSize {
		return 0, fmt.Errorf("short reply: %d bytes", n)
	}
	return time.Since(t0), nil
}

// runTransactions runs a.clients workers, each on its own thread, doing transactions back to back (or, with
// a.rate, at a fixed total rate) until a.duration passes or a.count transactions were made.
func runTransactions(a clientArgs, tx transaction) clientResult {
	var (
		next     atomic.Uint64
		ops      atomic.Uint64
		errs     atomic.Uint64
		firstErr atomic.Pointer[string]
		wg       sync.WaitGroup
		mu       sync.Mutex
		lats     []float64
	)
	next.Store(a.base)
	start := time.Now()
	deadline := start.Add(a.duration)
	if a.count > 0 {
		deadline = start.Add(10 * time.Minute)
	}
	var interval time.Duration
	if a.rate > 0 {
		interval = time.Duration(float64(time.Second) * float64(a.clients) / float64(a.rate))
	}
	for w := range a.clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 2048)
			local := make([]float64, 0, 1<<14)
			due := start.Add(time.Duration(w) * interval / time.Duration(a.clients))
			for {
				now := time.Now()
				if now.After(deadline) {
					break
				}
				if interval > 0 {
					if d := due.Sub(now); d > 0 {
						time.Sleep(d) // pacing the offered load, not synchronisation
					}
					due = due.Add(interval)
				}
				i := next.Add(1) - 1
				if a.count > 0 && i-a.base >= a.count {
					break
				}
				idx := i
				if a.oneSrc {
					idx = i * clientAddrCount // tuple then always picks the first address
				}
				took, err := tx(idx, a.dst, buf)
				if err != nil {
					errs.Add(1)
					s := err.Error()
					firstErr.CompareAndSwap(nil, &s)
					continue
				}
				ops.Add(1)
				local = append(local, float64(took.Nanoseconds())/1e3)
			}
			mu.Lock()
			lats = append(lats, local...)
			mu.Unlock()
		}()
	}
	wg.Wait()
	r := clientResult{Ops: ops.Load(), Errors: errs.Load(), Elapsed: time.Since(start).Nanoseconds(), Next: next.Load()}
	r.P50, r.P99 = percentiles(lats)
	if p := firstErr.Load(); p != nil {
		r.FirstErr = *p
	}
	return r
}

// runBulk receives from the bulk source over one connection for a.duration, after a short warm-up.
func runBulk(a clientArgs) (clientResult, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return clientResult{}, err
	}
	defer unix.Close(fd)
	tv := unix.Timeval{Sec: 5}
	_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &tv)
	_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	if err := connectFD(fd, &unix.SockaddrInet4{Addr: a.dst.As4(), Port: portBulk}); err != nil {
		return clientResult{}, fmt.Errorf("connect: %w", err)
	}
	buf := make([]byte, 256<<10)
	warm := time.Now().Add(200 * time.Millisecond)
	for time.Now().Before(warm) {
		if _, err := rd(fd, buf); err != nil {
			return clientResult{}, fmt.Errorf("read: %w", err)
		}
	}
	var total uint64
	start := time.Now()
	deadline := start.Add(a.duration)
	for i := 0; ; i++ {
		n, err := rd(fd, buf)
		if err != nil || n == 0 {
			return clientResult{}, fmt.Errorf("read after %d bytes: %v", total, err)
		}
		total += uint64(n)
		if i%16 == 0 && time.Now().After(deadline) {
			break
		}
	}
	return clientResult{Ops: 1, Bytes: total, Elapsed: time.Since(start).Nanoseconds()}, nil
}

// runUDPRR runs a.clients UDP sockets, each one flow doing request/response round trips back to back.
func runUDPRR(a clientArgs) clientResult {
	var (
		ops, errs atomic.Uint64
		wg        sync.WaitGroup
		mu        sync.Mutex
		lats      []float64
		firstErr  atomic.Pointer[string]
	)
	start := time.Now()
	deadline := start.Add(a.duration)
	for w := range a.clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			fail := func(err error) {
				errs.Add(1)
				s := err.Error()
				firstErr.CompareAndSwap(nil, &s)
			}
			fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				fail(err)
				return
			}
			defer unix.Close(fd)
			_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Usec: 500000})
			if err := connectFD(fd, &unix.SockaddrInet4{Addr: a.dst.As4(), Port: portUDPFirst + w%portSpread}); err != nil {
				fail(err)
				return
			}
			buf := make([]byte, 2048)
			local := make([]float64, 0, 1<<15)
			for time.Now().Before(deadline) {
				t0 := time.Now()
				if _, err := wr(fd, buf[:reqSize]); err != nil {
					fail(err)
					continue
				}
				if n, err := rd(fd, buf); err != nil || n != reqSize {
					fail(fmt.Errorf("read: %d bytes, %v", n, err))
					continue
				}
				ops.Add(1)
				local = append(local, float64(time.Since(t0).Nanoseconds())/1e3)
			}
			mu.Lock()
			lats = append(lats, local...)
			mu.Unlock()
		}()
	}
	wg.Wait()
	r := clientResult{Ops: ops.Load(), Errors: errs.Load(), Elapsed: time.Since(start).Nanoseconds()}
	r.P50, r.P99 = percentiles(lats)
	if p := firstErr.Load(); p != nil {
		r.FirstErr = *p
	}
	return r
}

// --- the bare consumer ---

// bareMark is the permanent accept mark the bare consumer sets (Warden's accept-always).
const bareMark = 1710

// bareMain binds the given queues and accepts every packet with bareMark, in the manner of Warden's backend
// (same library and socket settings: 128-byte copy, GSO flag, no ENOBUFS, 8 MiB buffer, and Warden's queue
// reader and verdict writer) but with nothing between receiving and answering.
func bareMain(args []string) error {
	fs := flag.NewFlagSet("_bare", flag.ContinueOnError)
	first := fs.Int("first", 1800, "first queue")
	n := fs.Int("queues", 4, "number of queues")
	if err := fs.Parse(args); err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var verdictErrs atomic.Uint64
	for q := *first; q < *first+*n; q++ {
		nf, err := nfq.Open(&nfq.Config{NfQueue: uint16(q), AfFamily: unix.AF_UNSPEC})
		if err != nil {
			return fmt.Errorf("opening queue %d: %w", q, err)
		}
		defer nf.Close()
		if err := nf.SetOption(netlink.NoENOBUFS, true); err != nil {
			return err
		}
		rc, err := nf.Con.SyscallConn()
		if err != nil {
			return err
		}
		// As Warden does: beyond rmem_max, which needs CAP_NET_ADMIN (we are root).
		_ = rc.Control(func(fd uintptr) {
			_ = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 8<<20)
		})
		cfg := nfqread.Config{Queue: uint16(q), CopyRange: 128, MaxQueueLen: 4096, Flags: nfq.NfQaCfgFlagGSO}
		if err := nfqread.Bind(nf.Con, cfg); err != nil {
			return err
		}
		verdicts := nfqverdict.NewWriter(rc, unix.AF_UNSPEC, uint16(q))
		reader := nfqread.NewReader(rc)
		hook := func(a *nfqread.Packet) {
			if err := verdicts.Accept(a.ID, bareMark); err != nil {
				verdictErrs.Add(1)
			}
		}
		go func() {
			// Read until the socket closes; other errors (none are expected) are skipped like Warden does.
			for ctx.Err() == nil {
				if err := reader.Next(hook); err != nil && errors.Is(err, os.ErrClosed) {
					return
				}
			}
		}()
	}
	fmt.Println("ready")
	serveStdin()
	return nil
}

// bareRules returns the bare consumer's iptables rules: Warden's scheme in miniature, with its fast path for
// accepted connections (their later packets leave mangle on the connmark, mark untouched, so that mangle OUTPUT
// does not look their route up again), so that the ceiling is no slower on an established packet than Warden.
func bareRules(first, n int) [][]string {
	half := n / 2
	out := fmt.Sprintf("%d:%d", first, first+half-1)
	in := fmt.Sprintf("%d:%d", first+half, first+n-1)
	mark := strconv.Itoa(bareMark)
	var rules [][]string
	for _, c := range []struct{ chain, queues string }{{"OUTPUT", out}, {"INPUT", in}} {
		rules = append(rules,
			[]string{"-t", "mangle", "-A", c.chain, "-m", "connmark", "--mark", mark, "-j", "RETURN"},
			[]string{"-t", "mangle", "-A", c.chain, "-j", "NFQUEUE", "--queue-balance", c.queues, "--queue-bypass"},
			[]string{"-t", "filter", "-A", c.chain, "-m", "mark", "--mark", mark, "-j", "CONNMARK", "--save-mark"},
		)
	}
	return rules
}

// --- Warden built in ---

// wardenMain runs Warden's daemon package as `warden run -c FILE` does, and stops on SIGTERM, SIGINT or when
// stdin closes.
func wardenMain(args []string) error {
	fs := flag.NewFlagSet("_warden", flag.ContinueOnError)
	cfgPath := fs.String("c", "", "config file")
	if err := fs.Parse(args); err != nil {
		return err
	}
	cfg, pol, err := daemon.Load(*cfgPath)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithCancel(ctx)
	go func() {
		serveStdin()
		cancel()
	}()
	d := &daemon.Daemon{ConfigPath: *cfgPath, Stderr: os.Stderr}
	return d.Run(ctx, cfg, pol)
}
