// Package e2e holds Warden's end-to-end tests: the real `warden` binary (built once, with the race detector)
// runs as `warden run` inside fresh network namespaces built by cmd/internal/sandbox, and the tests drive it
// from outside with the CLI (status, conns, reload, cleanup), signals and real TCP/UDP traffic made by agent
// processes inside the namespaces. They need Linux and root; without root they skip, unless CI is set, in
// which case they fail.
package e2e
