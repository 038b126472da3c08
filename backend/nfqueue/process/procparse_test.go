package process

import (
	"bytes"
	"fmt"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestParseSocketLink(t *testing.T) {
	tests := []struct {
		in    string
		inode uint32
		ok    bool
	}{
		{"socket:[12345]", 12345, true},
		{"socket:[0]", 0, true},
		{"socket:[4294967295]", 4294967295, true},
		{"socket:[4294967296]", 0, false},
		{"socket:[]", 0, false},
		{"socket:[12a]", 0, false},
		{"socket:[12", 0, false},
		{"pipe:[12345]", 0, false},
		{"anon_inode:[eventpoll]", 0, false},
		{"/dev/null", 0, false},
		{"", 0, false},
	}
	for _, tt := range tests {
		inode, ok := parseSocketLink([]byte(tt.in))
		if inode != tt.inode || ok != tt.ok {
			t.Errorf("parseSocketLink(%q) = %d, %v; want %d, %v", tt.in, inode, ok, tt.inode, tt.ok)
		}
	}
}

// statLine builds a /proc/<pid>/stat line with the given name and start time; the other fields are typical.
func statLine(pid int, comm string, start uint64) string {
	return fmt.Sprintf("%d (%s) S 1 %d %d 0 -1 4194560 1131 0 0 0 3 1 0 0 20 0 1 0 %d 2580480 257 "+
		"18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 17 1 0 0 0 0 0 0 0 0 0 0 0 0 0\n", pid, comm, pid, pid, start)
}

func TestParseStat(t *testing.T) {
	type result struct {
		Comm  string
		Start uint64
		OK    bool
	}
	tests := []struct {
		name string
		in   string
		want result
	}{
		{"plain", statLine(42, "sleep", 123456), result{"sleep", 123456, true}},
		{"name with spaces and parens", statLine(7, "a) (b c) 1 2", 99), result{"a) (b c) 1 2", 99, true}},
		{"empty name", statLine(7, "", 5), result{"", 5, true}},
		{"max start", statLine(7, "x", 18446744073709551615), result{"x", 18446744073709551615, true}},
		{"no newline", strings.TrimSuffix(statLine(7, "x", 77), "\n"), result{"x", 77, true}},
		{"truncated before start", "7 (x) S 1 7 7 0 -1 4194560 1131 0 0 0 3 1 0 0 20 0 1 0", result{}},
		{"start not a number", "7 (x) S 1 7 7 0 -1 4194560 1131 0 0 0 3 1 0 0 20 0 1 0 12z 5", result{}},
		{"start overflows", "7 (x) S 1 7 7 0 -1 4194560 1131 0 0 0 3 1 0 0 20 0 1 0 18446744073709551616 5", result{}},
		{"no parens", "7 x S 1", result{}},
		{"reversed parens", "7 )x( S 1", result{}},
		{"empty", "", result{}},
	}
	for _, tt := range tests {
		comm, start, ok := parseStat([]byte(tt.in))
		if diff := cmp.Diff(tt.want, result{string(comm), start, ok}); diff != "" {
			t.Errorf("%s: -want +got\n%s", tt.name, diff)
		}
	}
}

func FuzzParseStat(f *testing.F) {
	f.Add([]byte(statLine(42, "sleep", 123456)))
	f.Add([]byte(statLine(7, "a) (b", 1)))
	f.Add([]byte("1 (x)"))
	f.Fuzz(func(t *testing.T, b []byte) {
		comm, _, ok := parseStat(b)
		if !ok {
			if comm != nil {
				t.Fatal("comm without ok")
			}
			return
		}
		// The name is the text between the first '(' and the last ')'.
		if i := bytes.IndexByte(b, '('); i < 0 || !bytes.HasPrefix(b[i+1:], comm) || bytes.LastIndexByte(b, ')') != i+1+len(comm) {
			t.Fatalf("comm %q is not between the first '(' and the last ')' of %q", comm, b)
		}
	})
}

func FuzzParseSocketLink(f *testing.F) {
	f.Add([]byte("socket:[12345]"))
	f.Add([]byte("pipe:[1]"))
	f.Fuzz(func(t *testing.T, b []byte) {
		inode, ok := parseSocketLink(b)
		if !ok {
			return
		}
		// Accepted input is exactly the canonical form, give or take leading zeros.
		digits := strings.TrimLeft(string(b[len("socket:["):len(b)-1]), "0")
		if digits == "" {
			digits = "0"
		}
		if want := fmt.Sprintf("socket:[%d]", inode); "socket:["+digits+"]" != want {
			t.Fatalf("%q parsed as %d", b, inode)
		}
	})
}

func TestCleanExePath(t *testing.T) {
	for in, want := range map[string]string{
		"/usr/bin/curl":           "/usr/bin/curl",
		"/usr/bin/curl (deleted)": "/usr/bin/curl",
		"/opt/a (b)":              "/opt/a (b)",
	} {
		if got := cleanExePath(in); got != want {
			t.Errorf("cleanExePath(%q) = %q, want %q", in, got, want)
		}
	}
}
