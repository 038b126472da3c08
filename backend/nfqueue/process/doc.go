// Package process finds the process behind a connection on Linux, for packets whose owner the kernel did not
// tell (NFQUEUE delivers the UID/GID, never the PID).
//
// A lookup asks the kernel's sock_diag netlink interface for the socket that owns the 5-tuple (its inode and
// UID), maps the inode to a PID through a cached index of /proc/<pid>/fd, and the PID to its executable through
// /proc/<pid>/exe, cached by PID and start time so a reused PID is never mistaken for the old process. Results
// are also cached by 5-tuple for a short time. A socket whose process is already gone is reported as unknown.
//
// sock_diag answers for the network namespace the resolver was created in; /proc is global, so processes of
// every namespace are found.
package process
