package nfqread

import "golang.org/x/sys/unix"

func read(fd int, b []byte) (int, error) { return unix.Read(fd, b) }
