package sandbox

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"time"

	"github.com/warden-fw/warden/cmd/internal/control"
)

// Daemon is a `warden run` child process (started inside the client namespace with Command).
type Daemon struct {
	// Socket is its control socket.
	Socket string
	cmd    *exec.Cmd
	done   chan struct{}
	state  *os.ProcessState
}

// StartDaemon starts cmd, a `warden run` whose control socket is socket.
func StartDaemon(cmd *exec.Cmd, socket string) (*Daemon, error) {
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting warden run: %w", err)
	}
	d := &Daemon{Socket: socket, cmd: cmd, done: make(chan struct{})}
	go func() {
		_ = cmd.Wait()
		d.state = cmd.ProcessState
		close(d.done)
	}()
	return d, nil
}

// PID returns the daemon's process id (`ip netns exec` execs the daemon, so this is warden itself).
func (d *Daemon) PID() int { return d.cmd.Process.Pid }

// Done is closed when the process has exited.
func (d *Daemon) Done() <-chan struct{} { return d.done }

// ExitCode returns the exit code once the process has exited (-1 for a signal), or -1 before.
func (d *Daemon) ExitCode() int {
	select {
	case <-d.done:
		return d.state.ExitCode()
	default:
		return -1
	}
}

// WaitReady waits until the control API answers a status request, the process exits, or ctx ends.
func (d *Daemon) WaitReady(ctx context.Context) (control.Status, error) {
	c := control.NewClient(d.Socket)
	for {
		rctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		st, err := c.Status(rctx)
		cancel()
		if err == nil {
			return st, nil
		}
		select {
		case <-d.done:
			return st, fmt.Errorf("warden run exited with code %d before it was ready", d.state.ExitCode())
		case <-ctx.Done():
			return st, fmt.Errorf("warden run not ready: %w (last: %v)", ctx.Err(), err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// Signal sends sig to the daemon.
func (d *Daemon) Signal(sig os.Signal) error { return d.cmd.Process.Signal(sig) }

// Wait waits up to timeout for the process to exit and returns its exit code.
func (d *Daemon) Wait(timeout time.Duration) (int, error) {
	select {
	case <-d.done:
		return d.state.ExitCode(), nil
	case <-time.After(timeout):
		return -1, fmt.Errorf("warden run did not exit within %v", timeout)
	}
}

// Stop asks the daemon to stop (SIGTERM) and waits up to timeout; if it has not exited by then it is killed
// and an error says so.
func (d *Daemon) Stop(timeout time.Duration) (int, error) {
	select {
	case <-d.done:
		return d.state.ExitCode(), nil
	default:
	}
	if err := d.Signal(stopSignal); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return -1, err
	}
	code, err := d.Wait(timeout)
	if err != nil {
		_ = d.cmd.Process.Kill()
		<-d.done
		return d.state.ExitCode(), fmt.Errorf("%w; killed", err)
	}
	return code, nil
}

// Kill kills the daemon at once (SIGKILL) and waits for it.
func (d *Daemon) Kill() {
	_ = d.cmd.Process.Kill()
	<-d.done
}
