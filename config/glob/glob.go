// Package glob matches executable paths against Warden's app patterns: "*" matches within one path
// segment, "**" matches any number of whole segments (including none), "?" matches one character of a
// segment. Everything else is literal. Patterns that start with a drive letter (C:\...) are Windows paths:
// they use "\" or "/" as separators and match case-insensitively.
package glob

import (
	"errors"
	"fmt"
	"strings"
)

const maxDeep = 4

// Pattern is a compiled app pattern.
type Pattern struct {
	raw      string
	segs     []string
	foldCase bool
	// literal is set when the pattern has no wildcard at all.
	literal bool
}

// Compile checks and compiles a pattern. It must be an absolute path.
func Compile(p string) (*Pattern, error) {
	if p == "" {
		return nil, errors.New("empty pattern")
	}
	windows := isWindowsAbs(p)
	if !windows && !strings.HasPrefix(p, "/") {
		return nil, errors.New("not an absolute path (must start with / or a drive letter)")
	}
	norm := p
	if windows {
		norm = strings.ToLower(strings.ReplaceAll(p, `\`, "/"))
	}
	var segs []string
	deep := 0
	for _, s := range strings.Split(norm, "/") {
		if strings.Contains(s, "**") && s != "**" {
			return nil, errors.New(`"**" must be a whole path segment`)
		}
		if s == "**" {
			if len(segs) > 0 && segs[len(segs)-1] == "**" {
				continue // "**/**" is "**"
			}
			deep++
		}
		segs = append(segs, s)
	}
	// Each "**" multiplies the work of a match by the path's depth; a few are plenty for any real layout.
	if deep > maxDeep {
		return nil, fmt.Errorf("at most %d \"**\" segments", maxDeep)
	}
	return &Pattern{raw: p, segs: segs, foldCase: windows, literal: !strings.ContainsAny(norm, "*?")}, nil
}

func isWindowsAbs(p string) bool {
	return len(p) >= 3 && p[1] == ':' && (p[2] == '\\' || p[2] == '/') &&
		(p[0]|0x20 >= 'a' && p[0]|0x20 <= 'z')
}

// String returns the pattern as written.
func (p *Pattern) String() string { return p.raw }

// Literal reports whether the pattern has no wildcards; then Normalize(pattern) == Normalize(path) decides.
func (p *Pattern) Literal() bool { return p.literal }

// Normalized returns the pattern in the form Match compares against (lower-case with "/" for Windows).
func (p *Pattern) Normalized() string { return strings.Join(p.segs, "/") }

// LiteralDir returns the longest leading directory of the pattern that contains no wildcard, in normalized
// form, e.g. "/usr/bin" for "/usr/bin/tel*". Every path the pattern matches lies below it.
func (p *Pattern) LiteralDir() string {
	n := 0
	for n < len(p.segs)-1 && !strings.ContainsAny(p.segs[n], "*?") {
		n++
	}
	if n == 0 {
		return ""
	}
	return strings.Join(p.segs[:n], "/")
}

// FoldCase reports whether the pattern matches case-insensitively (Windows paths).
func (p *Pattern) FoldCase() bool { return p.foldCase }

// Normalize brings a path into the form patterns of that kind compare against.
func Normalize(path string, foldCase bool) string {
	if foldCase {
		return strings.ToLower(strings.ReplaceAll(path, `\`, "/"))
	}
	return path
}

// Match reports whether path matches the pattern.
func (p *Pattern) Match(path string) bool {
	path = Normalize(path, p.foldCase)
	if p.literal {
		return path == p.Normalized()
	}
	return matchSegs(p.segs, path)
}

// matchSegs matches pattern segments against the remaining path. The recursion only branches at "**",
// which patterns use sparingly; the depth is bounded by the number of segments.
func matchSegs(segs []string, path string) bool {
	for len(segs) > 0 {
		if segs[0] == "**" {
			rest := segs[1:]
			if len(rest) == 0 {
				return true
			}
			for {
				if matchSegs(rest, path) {
					return true
				}
				i := strings.IndexByte(path, '/')
				if i < 0 {
					return false
				}
				path = path[i+1:]
			}
		}
		seg := path
		i := strings.IndexByte(path, '/')
		if i >= 0 {
			seg = path[:i]
		}
		if !matchSegment(segs[0], seg) {
			return false
		}
		segs = segs[1:]
		if i < 0 {
			return len(segs) == 0
		}
		path = path[i+1:]
		if len(segs) == 0 {
			return false
		}
	}
	return path == ""
}

// matchSegment matches one segment with "*" and "?" by the usual greedy backtracking over one star.
func matchSegment(pat, s string) bool {
	px, sx := 0, 0
	starP, starS := -1, 0
	for sx < len(s) {
		switch {
		case px < len(pat) && pat[px] == '*':
			starP, starS = px, sx
			px++
		case px < len(pat) && (pat[px] == '?' || pat[px] == s[sx]):
			px++
			sx++
		case starP >= 0:
			starS++
			px, sx = starP+1, starS
		default:
			return false
		}
	}
	for px < len(pat) && pat[px] == '*' {
		px++
	}
	return px == len(pat)
}
