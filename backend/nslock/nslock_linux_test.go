package nslock

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"
)

func TestAcquireRelease(t *testing.T) {
	name := fmt.Sprintf("warden-nslock-test-%d", os.Getpid())
	l, err := Acquire(name)
	if err != nil {
		t.Fatal(err)
	}
	// Held: a second acquisition fails and names the holder (this process: the kernel reports its PID).
	_, err = Acquire(name)
	if !errors.Is(err, ErrHeld) || !strings.Contains(err.Error(), fmt.Sprintf("(pid %d)", os.Getpid())) {
		t.Fatalf("second Acquire: %v, want ErrHeld naming pid %d", err, os.Getpid())
	}
	l.Release()
	l.Release() // harmless
	l2, err := Acquire(name)
	if err != nil {
		t.Fatalf("after Release: %v", err)
	}
	l2.Release()
	var none *Lock
	none.Release()
}
