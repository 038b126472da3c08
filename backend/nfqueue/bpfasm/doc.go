// Package bpfasm holds what Warden's hand-assembled eBPF programs share: the kernel context offsets they read
// and the instruction sequences that build an address key on the stack. The process attribution programs
// (backend/nfqueue/process) and the split-tunnel handoff (proxy/splittun/handoff) both use them. Linux only.
package bpfasm
