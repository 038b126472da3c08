package config

import (
	"fmt"
	"math"
	"reflect"
	"sort"
	"strconv"
	"strings"
	"time"
)

// FieldError is one problem with one key.
type FieldError struct {
	Path string // e.g. "rules[3].ports[0]"
	Msg  string
}

func (e FieldError) Error() string { return e.Path + ": " + e.Msg }

// Errors is every problem validation found, in key order.
type Errors []FieldError

func (es Errors) Error() string {
	lines := make([]string, len(es))
	for i, e := range es {
		lines[i] = e.Error()
	}
	return strings.Join(lines, "\n")
}

type errorList struct{ errs Errors }

func (l *errorList) add(path, format string, args ...any) {
	l.errs = append(l.errs, FieldError{Path: path, Msg: fmt.Sprintf(format, args...)})
}

// unknownKeyMsg is the error for a key the config does not have.
const unknownKeyMsg = "unknown key (a typo must not silently weaken a firewall)"

var durationType = reflect.TypeFor[time.Duration]()

// decodeStruct fills the tagged fields of dst (a pointer to struct) from m, reporting unknown keys and
// values of the wrong shape. Fields missing from m keep their current value.
func decodeStruct(path string, m map[string]any, dst reflect.Value, el *errorList) {
	t := dst.Type()
	known := make(map[string]int, t.NumField())
	for i := 0; i < t.NumField(); i++ {
		if k := t.Field(i).Tag.Get("key"); k != "" {
			known[k] = i
		}
	}
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		fp := join(path, k)
		i, ok := known[strings.ToLower(k)]
		if !ok {
			el.add(fp, unknownKeyMsg)
			continue
		}
		decodeValue(fp, m[k], dst.Field(i), el)
	}
}

func join(path, key string) string {
	if path == "" {
		return key
	}
	return path + "." + key
}

func decodeValue(path string, v any, dst reflect.Value, el *errorList) {
	if v == nil {
		return // "key:" with no value means "leave the default"
	}
	switch {
	case dst.Type() == durationType:
		s, ok := scalarString(v)
		if !ok {
			el.add(path, "%s is not a duration (e.g. 3s, 500ms)", describe(v))
			return
		}
		d, err := time.ParseDuration(s)
		if err != nil || d < 0 {
			el.add(path, "%q is not a duration (e.g. 3s, 500ms)", s)
			return
		}
		dst.SetInt(int64(d))
	case dst.Kind() == reflect.String:
		s, ok := scalarString(v)
		if !ok {
			el.add(path, "%s is not a single value", describe(v))
			return
		}
		dst.SetString(s)
	case dst.Kind() == reflect.Bool:
		switch x := v.(type) {
		case bool:
			dst.SetBool(x)
		case string:
			b, err := strconv.ParseBool(strings.TrimSpace(x))
			if err != nil {
				el.add(path, "%q is not true or false", x)
				return
			}
			dst.SetBool(b)
		default:
			el.add(path, "%s is not true or false", describe(v))
		}
	case dst.Kind() == reflect.Int:
		n, ok := toInt(v)
		if !ok {
			el.add(path, "%s is not an integer", describe(v))
			return
		}
		dst.SetInt(n)
	case dst.Kind() == reflect.Struct:
		m, ok := v.(map[string]any)
		if !ok {
			el.add(path, "%s is not a section (key: value pairs)", describe(v))
			return
		}
		decodeStruct(path, m, dst, el)
	case dst.Kind() == reflect.Slice:
		list, ok := v.([]any)
		if !ok {
			if dst.Type().Elem().Kind() == reflect.String {
				// A lone scalar where a list is expected ("ports: 443") is read as a one-element list.
				if s, ok := scalarString(v); ok {
					dst.Set(reflect.ValueOf([]string{s}))
					return
				}
			}
			el.add(path, "%s is not a list", describe(v))
			return
		}
		out := reflect.MakeSlice(dst.Type(), len(list), len(list))
		for i, item := range list {
			ip := fmt.Sprintf("%s[%d]", path, i)
			elem := out.Index(i)
			if elem.Kind() == reflect.Struct {
				setDefaults(elem)
			}
			decodeValue(ip, item, elem, el)
		}
		dst.Set(out)
	default:
		panic("config: unsupported field kind " + dst.Kind().String())
	}
}

// scalarString renders a scalar (string, number, bool) as the user wrote it.
func scalarString(v any) (string, bool) {
	switch x := v.(type) {
	case string:
		return x, true
	case bool:
		return strconv.FormatBool(x), true
	case int:
		return strconv.Itoa(x), true
	case int64:
		return strconv.FormatInt(x, 10), true
	case uint64:
		return strconv.FormatUint(x, 10), true
	case float64:
		if x == math.Trunc(x) && math.Abs(x) < 1e15 {
			return strconv.FormatInt(int64(x), 10), true
		}
		return strconv.FormatFloat(x, 'g', -1, 64), true
	}
	return "", false
}

func toInt(v any) (int64, bool) {
	switch x := v.(type) {
	case int:
		return int64(x), true
	case int64:
		return x, true
	case uint64:
		if x > math.MaxInt64 {
			return 0, false
		}
		return int64(x), true
	case float64:
		if x != math.Trunc(x) || math.Abs(x) > 1e15 {
			return 0, false
		}
		return int64(x), true
	case string:
		n, err := strconv.ParseInt(strings.TrimSpace(x), 10, 64)
		return n, err == nil
	}
	return 0, false
}

func describe(v any) string {
	switch v.(type) {
	case map[string]any:
		return "a section"
	case []any:
		return "a list"
	}
	if s, ok := scalarString(v); ok {
		return strconv.Quote(s)
	}
	return fmt.Sprintf("%v", v)
}

// setDefaults applies the `default` tags of a struct value's fields, recursively.
func setDefaults(v reflect.Value) {
	t := v.Type()
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		if f.Tag.Get("key") == "" {
			continue
		}
		fv := v.Field(i)
		if fv.Kind() == reflect.Struct && fv.Type() != durationType {
			setDefaults(fv)
			continue
		}
		def, ok := f.Tag.Lookup("default")
		if !ok {
			continue
		}
		switch {
		case fv.Type() == durationType:
			d, err := time.ParseDuration(def)
			if err != nil {
				panic("config: bad default for " + f.Name)
			}
			fv.SetInt(int64(d))
		case fv.Kind() == reflect.String:
			fv.SetString(def)
		case fv.Kind() == reflect.Bool:
			fv.SetBool(def == "true")
		case fv.Kind() == reflect.Int:
			n, err := strconv.Atoi(def)
			if err != nil {
				panic("config: bad default for " + f.Name)
			}
			fv.SetInt(int64(n))
		}
	}
}

// Key describes one configuration key for documentation and environment binding.
type Key struct {
	Path    string // e.g. "split_tunnel.port", or "rules[].name" for rule fields
	Default string
	Doc     string
	// Scalar reports whether the key holds a single value (and so can be set from the environment).
	Scalar bool
}

// Keys lists every key of the schema, in declaration order.
func Keys() []Key {
	var out []Key
	collectKeys("", reflect.TypeFor[Config](), &out)
	return out
}

func collectKeys(prefix string, t reflect.Type, out *[]Key) {
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		k := f.Tag.Get("key")
		if k == "" {
			continue
		}
		p := join(prefix, k)
		switch {
		case f.Type.Kind() == reflect.Struct && f.Type != durationType:
			collectKeys(p, f.Type, out)
		case f.Type.Kind() == reflect.Slice && f.Type.Elem().Kind() == reflect.Struct:
			*out = append(*out, Key{Path: p, Doc: f.Tag.Get("doc")})
			collectKeys(p+"[]", f.Type.Elem(), out)
		default:
			def := f.Tag.Get("default")
			*out = append(*out, Key{Path: p, Default: def, Doc: f.Tag.Get("doc"), Scalar: f.Type.Kind() != reflect.Slice && !strings.Contains(prefix, "[]")})
		}
	}
}
