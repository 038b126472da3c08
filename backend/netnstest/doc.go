// Package netnstest holds the helpers Warden's Linux kernel tests share: a root check that skips locally but
// fails under CI, command running that fails the test with the command's output, and network namespaces with
// random names that are removed when the test ends, whatever its outcome.
//
// It is imported only from _linux_test.go files. This file carries no build constraint so that the package
// still exists, empty, on other systems, and `go build ./...` and `go vet ./...` pass there.
package netnstest
