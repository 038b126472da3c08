// Package proxy is the home of Warden's local endpoints that reroute verdicts send traffic to. The endpoints
// live in subpackages:
//
//   - proxy/redirect: the table the firewall pipeline fills at verdict time and the endpoints read;
//   - proxy/splittun: the split-tunnel proxy (port 719), shared by every backend, TCP and UDP, IPv4 and IPv6;
//   - proxy/netif: the choice of the interface split traffic leaves through.
package proxy
