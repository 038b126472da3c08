// Package bpfkit holds what Warden's hand-assembled eBPF programs share: the kernel context offsets they read,
// the instruction sequences that build an address key on the stack, the cgroup v2 root they attach to and the
// network namespace cookie they filter on. The process attribution programs (backend/nfqueue/process) and the
// split-tunnel handoff (proxy/splittun/handoff) both use it. Everything but the mountinfo parser is Linux only.
package bpfkit
