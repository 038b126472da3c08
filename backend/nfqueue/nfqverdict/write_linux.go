package nfqverdict

import "golang.org/x/sys/unix"

func write(fd int, b []byte) (int, error) { return unix.Write(fd, b) }
