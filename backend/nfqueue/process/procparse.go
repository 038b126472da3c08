package process

import (
	"bytes"
	"strings"
)

// parseSocketLink returns the inode of a /proc/<pid>/fd link target of the form "socket:[12345]", and reports
// whether the target had that form.
func parseSocketLink(target []byte) (uint32, bool) {
	const prefix = "socket:["
	if len(target) < len(prefix)+2 || string(target[:len(prefix)]) != prefix || target[len(target)-1] != ']' {
		return 0, false
	}
	return parseUint32(target[len(prefix) : len(target)-1])
}

// parseUint32 parses a non-empty run of decimal digits that fits in 32 bits.
func parseUint32(b []byte) (uint32, bool) {
	if len(b) == 0 || len(b) > 10 {
		return 0, false
	}
	var n uint64
	for _, c := range b {
		if c < '0' || c > '9' {
			return 0, false
		}
		n = n*10 + uint64(c-'0')
	}
	if n > 1<<32-1 {
		return 0, false
	}
	return uint32(n), true
}

// statStartField is the position of starttime in /proc/<pid>/stat (proc(5) numbers fields from 1).
const statStartField = 22

// parseStat extracts the command name and the start time (in clock ticks since boot) from the contents of
// /proc/<pid>/stat. The command name may contain spaces and parentheses, so it runs from the first '(' to the
// last ')'. comm aliases stat.
func parseStat(stat []byte) (comm []byte, start uint64, ok bool) {
	open := bytes.IndexByte(stat, '(')
	closing := bytes.LastIndexByte(stat, ')')
	if open < 0 || closing < open {
		return nil, 0, false
	}
	comm = stat[open+1 : closing]
	rest := stat[closing+1:]
	// rest is " S ppid ...": field 3 (state) is the first after the name.
	field := 2
	for len(rest) > 0 {
		if rest[0] == ' ' {
			rest = rest[1:]
			continue
		}
		end := bytes.IndexAny(rest, " \n")
		if end < 0 {
			end = len(rest)
		}
		field++
		if field == statStartField {
			v, ok := parseUint64(rest[:end])
			if !ok {
				return nil, 0, false
			}
			return comm, v, true
		}
		rest = rest[end:]
		if len(rest) > 0 && rest[0] == '\n' {
			break
		}
	}
	return nil, 0, false
}

// parseUint64 parses a non-empty run of decimal digits that fits in 64 bits.
func parseUint64(b []byte) (uint64, bool) {
	if len(b) == 0 || len(b) > 20 {
		return 0, false
	}
	var n uint64
	for _, c := range b {
		if c < '0' || c > '9' {
			return 0, false
		}
		d := uint64(c - '0')
		if n > (1<<64-1-d)/10 {
			return 0, false
		}
		n = n*10 + d
	}
	return n, true
}

// deletedSuffix is what the kernel appends to /proc/<pid>/exe when the executable was unlinked or replaced,
// as package upgrades do. The program is still the one at that path, so policy should see the path.
const deletedSuffix = " (deleted)"

// cleanExePath strips the kernel's " (deleted)" marker from an exe link target.
func cleanExePath(target string) string {
	return strings.TrimSuffix(target, deletedSuffix)
}
