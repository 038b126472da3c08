package config

import (
	"bufio"
	"bytes"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// The repository root relative to this package's directory (where go test runs).
const repoRoot = ".."

// refRow is one row of a reference table in docs/configuration.md whose first cell is a backticked name.
type refRow struct {
	line  int
	cells []string
}

// docRows returns the table rows of a Markdown file keyed by the backticked text of their first cell.
func docRows(t *testing.T, path string) map[string]refRow {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	rows := make(map[string]refRow)
	sc := bufio.NewScanner(bytes.NewReader(data))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if !strings.HasPrefix(line, "| `") {
			continue
		}
		cells := strings.Split(strings.Trim(line, "|"), " | ")
		for i := range cells {
			cells[i] = strings.TrimSpace(cells[i])
		}
		name, ok := backticked(cells[0])
		if !ok {
			continue
		}
		if prev, dup := rows[name]; dup {
			t.Errorf("%s:%d: %s is already described on line %d", path, n, name, prev.line)
		}
		rows[name] = refRow{line: n, cells: cells}
	}
	return rows
}

// backticked returns the text of a cell that is exactly one `code span`.
func backticked(cell string) (string, bool) {
	if len(cell) < 2 || cell[0] != '`' || cell[len(cell)-1] != '`' || strings.Count(cell, "`") != 2 {
		return "", false
	}
	return cell[1 : len(cell)-1], true
}

// TestConfigurationReferenceMatchesSchema holds docs/configuration.md to the schema in both directions: every
// key of Keys() has a row (with the code's default, where the code has one), and every row names a real key.
func TestConfigurationReferenceMatchesSchema(t *testing.T) {
	path := filepath.Join(repoRoot, "docs", "configuration.md")
	rows := docRows(t, path)
	keys := Keys()
	byPath := make(map[string]Key, len(keys))
	for _, k := range keys {
		byPath[k.Path] = k
		row, ok := rows[k.Path]
		if !ok {
			t.Errorf("%s: key `%s` is not documented (add a row: | `%s` | type | default | meaning | validation |)",
				path, k.Path, k.Path)
			continue
		}
		if len(row.cells) != 5 {
			t.Errorf("%s:%d: `%s` has %d columns, want 5 (key, type, default, meaning, validation)", path, row.line,
				k.Path, len(row.cells))
			continue
		}
		def := row.cells[2]
		switch {
		case k.Default != "":
			if want := "`" + k.Default + "`"; def != want {
				t.Errorf("%s:%d: `%s` default is documented as %s, the code says %s", path, row.line, k.Path, def, want)
			}
		case def == "—", def == "`\"\"`", strings.HasPrefix(def, "`"):
			// No default in the schema: the key is unset, empty, or has a platform default the code computes.
		default:
			t.Errorf("%s:%d: `%s` has no default in the code; document it as —, `\"\"` or the computed value, not %q",
				path, row.line, k.Path, def)
		}
		if strings.TrimSpace(row.cells[3]) == "" {
			t.Errorf("%s:%d: `%s` has no meaning", path, row.line, k.Path)
		}
	}

	for name, row := range rows {
		if env, ok := strings.CutPrefix(name, envPrefix+"_"); ok {
			checkEnvRow(t, path, row.line, name, env, keys)
			continue
		}
		if _, ok := byPath[name]; !ok && looksLikeKeyPath(name) {
			t.Errorf("%s:%d: `%s` is documented but is not a configuration key", path, row.line, name)
		}
	}
}

// looksLikeKeyPath tells a key path (snake_case words joined by dots, [] for list items) from other code in a
// table's first column.
func looksLikeKeyPath(s string) bool {
	return s != "" && strings.Trim(s, "abcdefghijklmnopqrstuvwxyz_.[]") == ""
}

// checkEnvRow checks a documented environment example (WARDEN_X=value): the variable must name a scalar key,
// and the value must be one the config accepts.
func checkEnvRow(t *testing.T, path string, line int, name, env string, keys []Key) {
	t.Helper()
	varName, _, ok := strings.Cut(name, "=")
	if !ok {
		t.Errorf("%s:%d: `%s`: write environment examples as VARIABLE=value", path, line, name)
		return
	}
	envKey, _, _ := strings.Cut(env, "=")
	found := slices.ContainsFunc(keys, func(k Key) bool {
		return k.Scalar && strings.ToUpper(strings.ReplaceAll(k.Path, ".", "_")) == envKey
	})
	if !found {
		t.Errorf("%s:%d: %s does not correspond to any scalar key", path, line, varName)
		return
	}
	if _, err := LoadBytes(nil, ".yaml", []string{name}); err != nil {
		t.Errorf("%s:%d: the documented override %s is rejected: %v", path, line, name, err)
	}
}

// TestDocsYAMLExamplesAreValid loads every ```yaml block in docs/ and the README as a complete config: an
// example that does not pass `warden check` teaches the wrong thing.
func TestDocsYAMLExamplesAreValid(t *testing.T) {
	files, err := filepath.Glob(filepath.Join(repoRoot, "docs", "*.md"))
	if err != nil {
		t.Fatal(err)
	}
	files = append(files, filepath.Join(repoRoot, "README.md"))
	blocks := 0
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, b := range fencedBlocks(data, "yaml") {
			blocks++
			if _, err := LoadBytes([]byte(b.text), ".yaml", nil); err != nil {
				t.Errorf("%s:%d: YAML example is not a valid config:\n%v", f, b.line, err)
			}
		}
	}
	if blocks == 0 {
		t.Fatal("found no ```yaml examples in docs/: is the documentation missing?")
	}
}

type fenced struct {
	line int // of the opening fence
	text string
}

// fencedBlocks returns the contents of the ``` blocks of a Markdown text whose info string is lang.
func fencedBlocks(md []byte, lang string) []fenced {
	var out []fenced
	var cur *fenced
	var b strings.Builder
	for i, line := range strings.Split(string(md), "\n") {
		trimmed := strings.TrimSpace(line)
		switch {
		case cur == nil && trimmed == "```"+lang:
			cur = &fenced{line: i + 1}
			b.Reset()
		case cur != nil && trimmed == "```":
			cur.text = b.String()
			out = append(out, *cur)
			cur = nil
		case cur != nil:
			b.WriteString(line)
			b.WriteByte('\n')
		}
	}
	return out
}

func TestFencedBlocks(t *testing.T) {
	md := "text\n```yaml\na: 1\n```\n```sh\nls\n```\n  ```yaml\nb: 2\nc: 3\n  ```\n"
	want := []fenced{{line: 2, text: "a: 1\n"}, {line: 8, text: "b: 2\nc: 3\n"}}
	if diff := cmp.Diff(want, fencedBlocks([]byte(md), "yaml"), cmp.AllowUnexported(fenced{})); diff != "" {
		t.Errorf("fencedBlocks (-want +got):\n%s", diff)
	}
}

// loadFileNoEnv loads a config file as Load does, but without the test process's WARDEN_* variables.
func loadFileNoEnv(t *testing.T, path string) *Config {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	c, err := LoadBytes(data, filepath.Ext(path), nil)
	if err != nil {
		t.Fatalf("%s does not load:\n%v", path, err)
	}
	return c
}

// TestShippedConfigsLoad checks the example and the packaged default config, and that the default changes
// nothing on the machine it is installed on: fail open, everything allowed, no rule active.
func TestShippedConfigsLoad(t *testing.T) {
	loadFileNoEnv(t, filepath.Join(repoRoot, "examples", "warden.yaml"))

	def := loadFileNoEnv(t, filepath.Join(repoRoot, "packaging", "warden.yaml"))
	type summary struct {
		Backend, FailMode, Default, Inbound string
		Rules                               int
	}
	got := summary{def.Backend, def.FailMode, def.Default.String(), def.InboundDefaultA.String(), len(def.Rules)}
	want := summary{"auto", "open", "allow", "allow", 0}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("packaging/warden.yaml must be a no-op default (-want +got):\n%s", diff)
	}

	// The commented-out example rules must work once uncommented.
	data, err := os.ReadFile(filepath.Join(repoRoot, "packaging", "warden.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	rules := commentedBlock(string(data), "# rules:")
	if rules == "" {
		t.Fatal("packaging/warden.yaml: no commented-out \"# rules:\" block")
	}
	c, err := LoadBytes([]byte(rules), ".yaml", nil)
	if err != nil {
		t.Fatalf("packaging/warden.yaml: the commented example rules do not load once uncommented:\n%v\n%s", err, rules)
	}
	if len(c.Rules) < 2 {
		t.Errorf("packaging/warden.yaml: %d commented example rules, want a few", len(c.Rules))
	}
}

// commentedBlock returns the comment lines from the one equal to start up to the first line that is not a
// comment, with their "# " removed.
func commentedBlock(text, start string) string {
	var b strings.Builder
	in := false
	for _, line := range strings.Split(text, "\n") {
		if !in {
			in = strings.TrimRight(line, " ") == start
			if !in {
				continue
			}
		}
		if !strings.HasPrefix(line, "#") {
			break
		}
		line = strings.TrimPrefix(strings.TrimPrefix(line, "#"), " ")
		b.WriteString(line)
		b.WriteByte('\n')
	}
	return b.String()
}
