package daemon

import (
	"testing"

	"github.com/warden-fw/warden/config"
)

// Only a split tunnel that may route in the kernel asks the backend for the source NAT chain: in proxy mode it
// would give every new connection a NAT binding for nothing.
func TestBackendOptionsRouteSplit(t *testing.T) {
	for _, tt := range []struct {
		yaml string
		want bool
	}{
		{"{}", true}, // the default, auto: route on Linux
		{"split_tunnel: {mode: route}", true},
		{"split_tunnel: {mode: auto}", true},
		{"split_tunnel: {mode: proxy}", false},
	} {
		cfg, err := config.LoadBytes([]byte(tt.yaml), ".yaml", nil)
		if err != nil {
			t.Fatalf("%s: %v", tt.yaml, err)
		}
		if got := BackendOptions(cfg, nil).RouteSplit; got != tt.want {
			t.Errorf("%s: RouteSplit %v, want %v", tt.yaml, got, tt.want)
		}
	}
}
