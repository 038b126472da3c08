package bpfkit

import (
	"bytes"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestCgroup2Mount(t *testing.T) {
	hybrid := `30 22 0:27 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
31 30 0:28 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
40 30 0:37 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
`
	unified := `22 1 0:21 / /sys rw,nosuid - sysfs sysfs rw
29 22 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate
`
	tests := []struct {
		name   string
		in     string
		want   string
		wantOK bool
	}{
		{"hybrid", hybrid, "/sys/fs/cgroup/unified", true},
		{"unified with optional fields", unified, "/sys/fs/cgroup", true},
		{"escaped space", "50 1 0:40 / /run/my\\040cg rw - cgroup2 none rw\n", "/run/my cg", true},
		{"escaped backslash", "50 1 0:40 / /a\\134b rw - cgroup2 none rw\n", `/a\b`, true},
		{"cgroup v1 only", "31 30 0:28 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n", "", false},
		{"empty", "", "", false},
		{"no separator", "40 30 0:37 / /x rw cgroup2 cgroup2 rw\n", "", false},
		{"too few fields", "40 30 / - cgroup2 cgroup2 rw\n", "", false},
		{"type in the source field only", "40 30 0:37 / /x rw - tmpfs cgroup2 rw\n", "", false},
	}
	for _, tt := range tests {
		got, ok := cgroup2Mount([]byte(tt.in))
		if diff := cmp.Diff(struct {
			Dir string
			OK  bool
		}{tt.want, tt.wantOK}, struct {
			Dir string
			OK  bool
		}{got, ok}); diff != "" {
			t.Errorf("%s: -want +got\n%s", tt.name, diff)
		}
	}
}

// FuzzCgroup2Mount checks the mountinfo parser on arbitrary text: no panic, and a found mount point comes from
// a line that names cgroup2.
func FuzzCgroup2Mount(f *testing.F) {
	f.Add([]byte("40 30 0:37 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"))
	f.Add([]byte("50 1 0:40 / /run/my\\040cg rw - cgroup2 none rw\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		dir, ok := cgroup2Mount(b)
		if !ok && dir != "" {
			t.Fatalf("not found but dir %q", dir)
		}
		if ok && !bytes.Contains(b, []byte("cgroup2")) {
			t.Fatalf("found %q in input without cgroup2", dir)
		}
	})
}
