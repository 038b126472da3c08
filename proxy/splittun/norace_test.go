//go:build !race

package splittun

const raceEnabled = false
