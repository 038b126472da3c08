// Package splitroute installs the Linux policy routing that carries split-tunnelled connections in the kernel
// instead of through the split-tunnel proxy. Route n (1..marks.SplitRoutes) is a packet mark, an ip rule
// that sends that mark to a routing table of the same number, and that table's default route through the
// split interface. The NFQUEUE backend marks a split connection's packets with its route's mark (saved to the
// connmark, restored on every later packet, which makes the kernel route it again), and a MASQUERADE rule
// gives the connection the interface's address. Bytes never leave the kernel: bulk transfers run at the
// speed of a direct connection, which a user-space relay on a loaded machine cannot match.
package splitroute
