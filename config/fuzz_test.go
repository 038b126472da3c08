package config

import (
	"errors"
	"testing"
)

// FuzzLoadBytes feeds arbitrary documents to the loader: it must never panic, and it either returns a
// config or an error, never both or neither.
func FuzzLoadBytes(f *testing.F) {
	f.Add([]byte(good), ".yaml")
	f.Add([]byte(`{"rules": [{"name": "x", "action": "drop", "ports": [53, "1-2"]}]}`), ".json")
	f.Add([]byte("[[rules]]\nname = \"x\"\naction = \"block\"\n"), ".toml")
	f.Add([]byte("rules: [{name: a, remote: [\"*.\", 1.2.3.4/99]}]"), ".yaml")
	f.Fuzz(func(t *testing.T, data []byte, ext string) {
		c, err := LoadBytes(data, ext, nil)
		if (c == nil) == (err == nil) {
			t.Fatalf("config %v and error %v", c, err)
		}
		if err != nil && !errors.Is(err, ErrInvalid) {
			t.Fatalf("error does not wrap ErrInvalid: %v", err)
		}
	})
}
