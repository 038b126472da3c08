package nfqueue

import (
	"bufio"
	"io"
	"strconv"
	"strings"
)

// ParseQueueDrops sums the drop counters of the queues want selects in the text of
// /proc/net/netfilter/nfnetlink_queue: packets dropped because the queue was full, and because the netlink
// message could not be delivered (the reader's socket buffer was full). Either loses the packet, unless the
// queue fails open.
func ParseQueueDrops(r io.Reader, want func(queue uint16) bool) (uint64, error) {
	var total uint64
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		// queue_number peer_portid queue_total copy_mode copy_range queue_dropped user_dropped id_sequence 1
		fields := strings.Fields(sc.Text())
		if len(fields) < 7 {
			continue
		}
		n, err := strconv.ParseUint(fields[0], 10, 16)
		if err != nil || !want(uint16(n)) {
			continue
		}
		for _, i := range []int{5, 6} {
			if v, err := strconv.ParseUint(fields[i], 10, 64); err == nil {
				total += v
			}
		}
	}
	return total, sc.Err()
}
