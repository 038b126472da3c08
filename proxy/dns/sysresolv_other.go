//go:build !windows

package dns

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
)

// systemResolvers reads /etc/resolv.conf, and systemd-resolved's list of the servers behind its stub.
func systemResolvers() (primary, fallback []netip.Addr, err error) {
	var errs []error
	for i, path := range []string{"/etc/resolv.conf", "/run/systemd/resolve/resolv.conf"} {
		f, ferr := os.Open(path)
		if ferr != nil {
			if i == 0 {
				errs = append(errs, fmt.Errorf("reading %s: %w", path, ferr))
			}
			continue
		}
		addrs := parseResolvConf(f)
		f.Close()
		if i == 0 {
			primary = addrs
		} else {
			fallback = addrs
		}
	}
	return primary, fallback, errors.Join(errs...)
}
