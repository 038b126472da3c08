// Package handoff lets the split-tunnel proxy put what it relays towards an application straight into the
// application's socket, inside the kernel, instead of sending it over the loopback TCP connection between them.
//
// Without it every byte of a proxied download crosses two TCP connections: server → proxy (the upstream) and
// proxy → application (over loopback). On a machine whose CPUs are busy, the second one costs about as much as
// the first. With it, the proxy still reads the upstream, but its writes to the loopback connection are
// redirected by a BPF sk_msg program into the application socket's receive queue (sockmap's ingress
// redirect): the loopback connection's TCP stack is skipped, in order, synchronously within the proxy's write.
//
// How the two sockets are paired:
//   - At verdict time the pipeline calls Expect with the connection's tuple (client address, original
//     destination); the entry goes into a BPF hash.
//   - A sock_ops program on the cgroup v2 root sees the application's socket become established (the proxy's
//     SYN-ACK). When its tuple was expected, it puts the socket into a sockhash keyed by that tuple. That is the
//     only way to reach a socket the daemon holds no descriptor of.
//   - When the proxy has accepted the connection and dialled upstream, Attach checks that the application's
//     socket is there and puts the proxy's end of the loopback connection into a second sockhash, whose sk_msg
//     program redirects every write to the paired application socket.
//
// Only downloads are handed off. Uploads stay on the loopback connection: redirecting the application's own
// writes would need the pairing in place before its first write, which the proxy cannot guarantee.
//
// What the application sees changes in two ways, which is why this is an option (split_tunnel.kernel_handoff):
// its socket is read through the kernel's sockmap receive path, which splice(2) and TCP_ZEROCOPY_RECEIVE do not
// use (an application reading its socket with those would see no data); and data the proxy handed off but the
// application had not read yet is dropped if the daemon's BPF objects go away first (Drain waits for it at a
// graceful stop).
//
// The kernel charges handed-off data to the application socket but applies no receive window to it, so the
// proxy bounds it itself: Client.Queued reports what waits in the application's socket (sock_diag's memory
// info), and the proxy relays no further than a window ahead of the application's reads.
package handoff

import "errors"

// ErrNotPaired means the application's socket was not found in the kernel's map: the connection was not
// expected, the sock_ops program has not seen it (another network namespace, a remapped source port), or the
// map was full. The proxy then relays as usual.
var ErrNotPaired = errors.New("application socket not seen by the handoff program")

// ErrClosed is returned by a Handoff used after Close.
var ErrClosed = errors.New("kernel handoff closed")

// ErrUnsupported means this platform or kernel cannot hand off.
var ErrUnsupported = errors.New("kernel handoff unsupported")
