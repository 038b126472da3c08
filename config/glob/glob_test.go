package glob

import "testing"

func TestMatch(t *testing.T) {
	tests := []struct {
		pat, path string
		want      bool
	}{
		{"/usr/bin/telnet", "/usr/bin/telnet", true},
		{"/usr/bin/telnet", "/usr/bin/telnet2", false},
		{"/usr/bin/telnet*", "/usr/bin/telnet.netkit", true},
		{"/usr/bin/telnet*", "/usr/bin/telnet", true},
		{"/usr/bin/telnet*", "/usr/bin/x/telnet", false},
		{"/usr/bin/*", "/usr/bin/curl", true},
		{"/usr/bin/*", "/usr/bin/sub/curl", false},
		{"/usr/**", "/usr/bin/curl", true},
		{"/usr/**", "/usr", false},
		{"/usr/**/curl", "/usr/curl", true},
		{"/usr/**/curl", "/usr/local/bin/curl", true},
		{"/usr/**/curl", "/usr/local/bin/curl2", false},
		{"/opt/*/bin/?ython3", "/opt/py/bin/python3", true},
		{"/opt/*/bin/?ython3", "/opt/py/bin/ython3", false},
		{"/**", "/anything/at/all", true},
		{"/a/**/**/b", "/a/x/y/b", true},
		{"/a/**/**/b", "/a/b", true},
		{"/a*b*c", "/aXbYc", true},
		{"/a*b*c", "/aXbY", false},
		{`C:\Program Files\*\firefox.exe`, `c:\program files\Mozilla\FIREFOX.EXE`, true},
		{`C:\Program Files\**`, `C:\Program Files\A\B\c.exe`, true},
		{`C:\Windows\*.exe`, `C:\Program Files\x.exe`, false},
	}
	for _, tt := range tests {
		p, err := Compile(tt.pat)
		if err != nil {
			t.Fatalf("Compile(%q): %v", tt.pat, err)
		}
		if got := p.Match(tt.path); got != tt.want {
			t.Errorf("%q.Match(%q) = %v, want %v", tt.pat, tt.path, got, tt.want)
		}
	}
}

func TestCompileErrors(t *testing.T) {
	for _, p := range []string{"", "usr/bin/x", "/usr/a**b/x", "*", "/**/a/**/b/**/c/**/d/**/e"} {
		if _, err := Compile(p); err == nil {
			t.Errorf("Compile(%q) succeeded, want error", p)
		}
	}
}

func TestLiteralDir(t *testing.T) {
	tests := map[string]string{
		"/usr/bin/tel*":        "/usr/bin",
		"/usr/bin/telnet":      "/usr/bin",
		"/*/bin/x":             "",
		"/usr/**/x":            "/usr",
		`C:\Program Files\*`:   "c:/program files",
		"/opt/app/**/bin/*.so": "/opt/app",
	}
	for pat, want := range tests {
		p, err := Compile(pat)
		if err != nil {
			t.Fatal(err)
		}
		if got := p.LiteralDir(); got != want {
			t.Errorf("%q.LiteralDir() = %q, want %q", pat, got, want)
		}
	}
}

// FuzzMatch checks that matching never panics and that a literal pattern matches exactly itself.
func FuzzMatch(f *testing.F) {
	f.Add("/usr/**/bin/*x?", "/usr/a/b/bin/yxz")
	f.Add(`C:\a\*\b`, `c:/A/x/B`)
	f.Fuzz(func(t *testing.T, pat, path string) {
		p, err := Compile(pat)
		if err != nil {
			return
		}
		got := p.Match(path)
		if p.Literal() && got != (Normalize(path, p.FoldCase()) == p.Normalized()) {
			t.Fatalf("literal %q vs %q: %v", pat, path, got)
		}
	})
}
