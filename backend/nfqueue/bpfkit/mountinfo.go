package bpfkit

import "bytes"

// cgroup2Mount returns the mount point of the cgroup v2 hierarchy from the contents of /proc/self/mountinfo
// (proc(5)): the fifth field of the first line whose filesystem type, after the " - " separator, is cgroup2.
// Mount points with spaces or other special characters are octal-escaped there (\040).
func cgroup2Mount(mountinfo []byte) (string, bool) {
	for line := range bytes.SplitSeq(mountinfo, []byte{'\n'}) {
		sep := bytes.Index(line, []byte(" - "))
		if sep < 0 {
			continue
		}
		post := bytes.Fields(line[sep+3:])
		if len(post) == 0 || string(post[0]) != "cgroup2" {
			continue
		}
		pre := bytes.Fields(line[:sep])
		if len(pre) < 5 {
			continue
		}
		return unescapeMountField(pre[4]), true
	}
	return "", false
}

// unescapeMountField undoes the kernel's octal escaping of space, tab, newline and backslash (\ooo).
func unescapeMountField(f []byte) string {
	if bytes.IndexByte(f, '\\') < 0 {
		return string(f)
	}
	out := make([]byte, 0, len(f))
	for i := 0; i < len(f); i++ {
		if f[i] == '\\' && i+3 < len(f) && isOctal(f[i+1]) && isOctal(f[i+2]) && isOctal(f[i+3]) {
			out = append(out, (f[i+1]-'0')<<6|(f[i+2]-'0')<<3|(f[i+3]-'0'))
			i += 3
			continue
		}
		out = append(out, f[i])
	}
	return string(out)
}

func isOctal(c byte) bool { return c >= '0' && c <= '7' }
