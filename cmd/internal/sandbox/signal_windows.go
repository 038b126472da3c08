package sandbox

import "os"

// stopSignal asks the daemon for a clean stop; Windows has only Kill.
var stopSignal = os.Kill
