//go:build !windows

package windowskext

import (
	"errors"
	"net"
	"testing"

	"github.com/warden-fw/warden/backend"
)

func TestBindToInterfaceUnsupported(t *testing.T) {
	d := net.Dialer{Control: BindToInterfaceControl(1, false)}
	if _, err := d.Dial("udp4", "127.0.0.1:9"); !errors.Is(err, backend.ErrUnsupported) {
		t.Fatalf("dial with the Windows interface binding: %v, want ErrUnsupported", err)
	}
}

func TestNotRegisteredHere(t *testing.T) {
	if _, err := backend.Resolve(Name); !errors.Is(err, backend.ErrUnsupported) {
		t.Fatalf("Resolve(%q) = %v, want ErrUnsupported off Windows", Name, err)
	}
}
