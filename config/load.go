package config

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"runtime"
	"strings"
	"time"

	"github.com/spf13/viper"
)

// DefaultConfigPath returns where the daemon looks for its config when no -c is given.
func DefaultConfigPath() string {
	if runtime.GOOS == "windows" {
		base := os.Getenv("ProgramData")
		if base == "" {
			base = `C:\ProgramData`
		}
		return filepath.Join(base, "Warden", "warden.yaml")
	}
	return "/etc/warden/warden.yaml"
}

// DefaultSocketPath returns the control endpoint used when the config names none.
func DefaultSocketPath() string {
	if runtime.GOOS == "windows" {
		return `\\.\pipe\warden`
	}
	return "/run/warden/warden.sock"
}

// ErrInvalid is wrapped by every validation failure, so callers can tell a bad config (exit 2) from an
// unreadable file.
var ErrInvalid = errors.New("invalid configuration")

// Load reads, decodes and validates the config file at path, with WARDEN_* environment overrides applied.
// The format follows the extension (.yaml/.yml, .toml, .json). On a validation failure the returned error
// wraps ErrInvalid and an Errors value listing every problem.
func Load(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading config: %w", err)
	}
	c, err := LoadBytes(data, filepath.Ext(path), os.Environ())
	if err != nil {
		return nil, err
	}
	if abs, err := filepath.Abs(path); err == nil {
		path = abs
	}
	c.File = path
	return c, nil
}

// LoadBytes decodes and validates a config held in memory; ext selects the format (".yaml", ".toml",
// ".json"); env is a list of KEY=VALUE pairs (os.Environ()) from which WARDEN_* overrides are taken.
func LoadBytes(data []byte, ext string, env []string) (*Config, error) {
	format := strings.TrimPrefix(strings.ToLower(ext), ".")
	switch format {
	case "yaml", "yml", "toml", "json":
	case "":
		format = "yaml"
	default:
		return nil, fmt.Errorf("%w: unsupported config format %q (use .yaml, .toml or .json)", ErrInvalid, ext)
	}
	v := viper.New()
	v.SetConfigType(format)
	if err := v.ReadConfig(bytes.NewReader(data)); err != nil {
		return nil, fmt.Errorf("%w: parsing %s: %v", ErrInvalid, format, err)
	}
	raw := v.AllSettings()
	applyEnv(raw, env)

	c := &Config{}
	setDefaults(reflect.ValueOf(c).Elem())
	var el errorList
	decodeStruct("", raw, reflect.ValueOf(c).Elem(), &el)
	// Validation runs even after decoding failed, so that one check lists every problem. What it says about a
	// value that could not be decoded (left at its default) would only repeat that error, so it is dropped.
	var vl errorList
	c.validate(&vl)
	for _, e := range vl.errs {
		if !coveredBy(e.Path, el.errs) {
			el.errs = append(el.errs, e)
		}
	}
	if len(el.errs) > 0 {
		return nil, fmt.Errorf("%w:\n%w", ErrInvalid, el.errs)
	}
	c.LoadedAt = time.Now()
	return c, nil
}

// coveredBy reports whether a value at path, or one inside it, already failed to decode. An unknown key
// covers nothing: it was ignored, and the keys beside it decoded as they are.
func coveredBy(path string, decodeErrs Errors) bool {
	for _, d := range decodeErrs {
		if d.Msg == unknownKeyMsg {
			continue
		}
		if path == d.Path || strings.HasPrefix(path, d.Path+".") || strings.HasPrefix(path, d.Path+"[") {
			return true
		}
	}
	return false
}

// applyEnv overlays WARDEN_* variables on the raw settings: WARDEN_ + the key path upper-cased with "_" for
// "." (WARDEN_SPLIT_TUNNEL_PORT=720). Only scalar keys can be set this way.
func applyEnv(raw map[string]any, env []string) {
	vars := make(map[string]string)
	for _, kv := range env {
		k, val, ok := strings.Cut(kv, "=")
		if ok && strings.HasPrefix(k, envPrefix+"_") {
			vars[k] = val
		}
	}
	if len(vars) == 0 {
		return
	}
	for _, key := range Keys() {
		if !key.Scalar {
			continue
		}
		name := envPrefix + "_" + strings.ToUpper(strings.ReplaceAll(key.Path, ".", "_"))
		val, ok := vars[name]
		if !ok {
			continue
		}
		m := raw
		parts := strings.Split(key.Path, ".")
		for _, p := range parts[:len(parts)-1] {
			sub, ok := m[p].(map[string]any)
			if !ok {
				sub = map[string]any{}
				m[p] = sub
			}
			m = sub
		}
		m[parts[len(parts)-1]] = val
	}
}

// SocketFromFile returns control.socket from the config file at path without validating the rest of it
// (the CLI must find a running daemon even when the file on disk is broken), or the default.
func SocketFromFile(path string) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return DefaultSocketPath()
	}
	v := viper.New()
	v.SetConfigType(strings.TrimPrefix(strings.ToLower(filepath.Ext(path)), "."))
	if v.ReadConfig(bytes.NewReader(data)) != nil {
		return DefaultSocketPath()
	}
	if s := v.GetString("control.socket"); s != "" {
		return s
	}
	return DefaultSocketPath()
}
