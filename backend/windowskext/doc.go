// Package windowskext is Warden's Windows interception backend. It drives the Portmaster kernel driver
// (kext v2, device \\.\PortmasterKext) through the byte protocol in package kextproto.
//
// Design:
//
//   - The logic is platform-independent and runs over an abstract Device: an io.Reader delivering the driver's
//     info stream and a writer taking exactly one command per Write (one WriteFile). On Windows the Device is
//     the driver handle (overlapped I/O, version check, service and WFP set-up, see the _windows.go files); in
//     tests it is the emulated driver in package kextemu, which reproduces the driver's read batching.
//   - One reader goroutine decodes infos. A connection info becomes a packet handle (backend.Packet) handed to
//     the pipeline; log lines go to the injected logger; bandwidth stats accumulate per connection until the
//     connection's end event. Malformed records are counted, logged and skipped without losing the framing.
//   - Apply maps the Decision to the driver's verdict byte once (an atomic flag guards it) and writes a Verdict
//     command. An invalid decision is never sent as an unknown value: the fail-mode verdict goes out instead.
//   - The driver has no verdict timeout, so the backend keeps one: every pending packet sits in a min-heap by
//     deadline, served by a single goroutine and timer; an expired packet gets the fail-mode verdict.
//   - A housekeeping goroutine sends CleanEndedConnections, GetBandwidthStats and GetLogs on tickers. Time
//     comes from a Clock so tests drive timers and tickers without sleeping.
//   - Stop answers every pending packet with the fail-mode verdict, sends Shutdown (which ends the driver's
//     read with EOF), closes the device and waits for every goroutine.
//
// The backend registers itself as "windowskext" (the default) on Windows only; elsewhere the package only
// provides the portable pieces, and the registry reports backend.ErrUnsupported for the name.
package windowskext
