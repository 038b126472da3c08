package backend

import (
	"fmt"
	"runtime"
	"sort"
	"sync"
)

// Factory builds a backend from options.
type Factory func(Options) (Backend, error)

var registry struct {
	sync.Mutex
	factories map[string]Factory
	auto      string
}

// Register makes a backend available under name. The OS packages call it from init; isDefault marks the
// backend "auto" selects on this OS. Registering a name twice panics, as it is a programming error.
func Register(name string, isDefault bool, f Factory) {
	registry.Lock()
	defer registry.Unlock()
	if registry.factories == nil {
		registry.factories = make(map[string]Factory)
	}
	if _, dup := registry.factories[name]; dup {
		panic("backend: " + name + " registered twice")
	}
	registry.factories[name] = f
	if isDefault {
		registry.auto = name
	}
}

// Available returns the names of the backends registered on this OS, sorted.
func Available() []string {
	registry.Lock()
	defer registry.Unlock()
	names := make([]string, 0, len(registry.factories))
	for n := range registry.factories {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// Resolve returns the backend name "auto" stands for on this OS, or name itself. It fails with a wrapped
// ErrUnsupported when the backend does not exist here.
func Resolve(name string) (string, error) {
	registry.Lock()
	defer registry.Unlock()
	if name == "" || name == "auto" {
		if registry.auto == "" {
			return "", fmt.Errorf("no interception backend for %s/%s: %w", runtime.GOOS, runtime.GOARCH, ErrUnsupported)
		}
		return registry.auto, nil
	}
	if _, ok := registry.factories[name]; !ok {
		return "", fmt.Errorf("backend %q is not available on %s: %w", name, runtime.GOOS, ErrUnsupported)
	}
	return name, nil
}

// New builds the named backend ("auto" for this OS's default).
func New(name string, o Options) (Backend, error) {
	resolved, err := Resolve(name)
	if err != nil {
		return nil, err
	}
	registry.Lock()
	f := registry.factories[resolved]
	registry.Unlock()
	b, err := f(o)
	if err != nil {
		return nil, fmt.Errorf("creating %s backend: %w", resolved, err)
	}
	return b, nil
}
