package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/sys/windows/svc"
	"golang.org/x/sys/windows/svc/eventlog"
	"golang.org/x/sys/windows/svc/mgr"

	"github.com/warden-fw/warden/backend/windowskext"
	"github.com/warden-fw/warden/cmd/internal/daemon"
)

const serviceName = "Warden"

// runAsServiceIfNeeded runs `warden run` under the service control manager when Windows started us as a
// service. It reports whether it did.
func runAsServiceIfNeeded(g *globals) (bool, error) {
	isService, err := svc.IsWindowsService()
	if err != nil || !isService {
		return false, err
	}
	return true, svc.Run(serviceName, &wardenService{g: g})
}

type wardenService struct{ g *globals }

// Execute implements svc.Handler: it runs the daemon until the SCM asks it to stop.
func (s *wardenService) Execute(_ []string, req <-chan svc.ChangeRequest, status chan<- svc.Status) (bool, uint32) {
	status <- svc.Status{State: svc.StartPending}
	cfg, pol, err := daemon.Load(s.g.configPath)
	if err != nil {
		logEvent(fmt.Sprintf("warden: %v", err))
		return true, exitUsage
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	d := &daemon.Daemon{ConfigPath: s.g.configPath, SocketPath: s.g.socketPath, Stderr: os.Stderr}
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx, cfg, pol) }()
	status <- svc.Status{State: svc.Running, Accepts: svc.AcceptStop | svc.AcceptShutdown | svc.AcceptParamChange}
	for {
		select {
		case err := <-done:
			if err != nil {
				logEvent(fmt.Sprintf("warden stopped: %v", err))
				return true, exitFailure
			}
			return false, 0
		case c := <-req:
			switch c.Cmd {
			case svc.Interrogate:
				status <- c.CurrentStatus
			case svc.ParamChange:
				// The Windows counterpart of SIGHUP.
				_, _ = d.Reload()
			case svc.Stop, svc.Shutdown:
				status <- svc.Status{State: svc.StopPending}
				cancel()
			}
		}
	}
}

func logEvent(msg string) {
	if l, err := eventlog.Open(serviceName); err == nil {
		_ = l.Error(1, msg)
		_ = l.Close()
	}
}

func newServiceCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "service",
		Short: "Install, remove, start or stop the Warden Windows service",
	}
	cmd.AddCommand(
		&cobra.Command{Use: "install", Short: "Install Warden as an automatically started service", Args: cobra.NoArgs,
			RunE: func(*cobra.Command, []string) error { return withCode(exitFailure, installService(g)) }},
		&cobra.Command{Use: "uninstall", Short: "Stop and remove the service, its driver and its filters", Args: cobra.NoArgs,
			RunE: func(*cobra.Command, []string) error { return withCode(exitFailure, uninstallService()) }},
		&cobra.Command{Use: "start", Short: "Start the service", Args: cobra.NoArgs,
			RunE: func(*cobra.Command, []string) error { return withCode(exitFailure, controlService(true)) }},
		&cobra.Command{Use: "stop", Short: "Stop the service", Args: cobra.NoArgs,
			RunE: func(*cobra.Command, []string) error { return withCode(exitFailure, controlService(false)) }},
	)
	return cmd
}

func installService(g *globals) error {
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	cfgPath, err := filepath.Abs(g.configPath)
	if err != nil {
		return err
	}
	if _, _, err := daemon.Load(cfgPath); err != nil {
		return fmt.Errorf("refusing to install with an invalid config: %w", err)
	}
	m, err := mgr.Connect()
	if err != nil {
		return fmt.Errorf("connecting to the service manager: %w", err)
	}
	defer m.Disconnect()
	if s, err := m.OpenService(serviceName); err == nil {
		s.Close()
		return fmt.Errorf("service %s already exists; uninstall it first", serviceName)
	}
	s, err := m.CreateService(serviceName, exe, mgr.Config{
		StartType:   mgr.StartAutomatic,
		DisplayName: "Warden application firewall",
		Description: "Decides, for every new connection, whether it is allowed, blocked, dropped or split-tunnelled.",
	}, "run", "-c", cfgPath)
	if err != nil {
		return fmt.Errorf("creating service: %w", err)
	}
	defer s.Close()
	// Restart after a crash: a firewall should not stay down.
	_ = s.SetRecoveryActions([]mgr.RecoveryAction{{Type: mgr.ServiceRestart, Delay: 5 * time.Second}}, 86400)
	_ = eventlog.InstallAsEventCreate(serviceName, eventlog.Error|eventlog.Warning|eventlog.Info)
	fmt.Printf("installed service %s (%s run -c %s)\n", serviceName, exe, cfgPath)
	return nil
}

func uninstallService() error {
	m, err := mgr.Connect()
	if err != nil {
		return fmt.Errorf("connecting to the service manager: %w", err)
	}
	defer m.Disconnect()
	var errs []error
	if s, err := m.OpenService(serviceName); err == nil {
		if st, err := s.Query(); err == nil && st.State != svc.Stopped {
			if _, err := s.Control(svc.Stop); err != nil {
				errs = append(errs, fmt.Errorf("stopping: %w", err))
			}
			waitForState(s, svc.Stopped, 30*time.Second)
		}
		if err := s.Delete(); err != nil {
			errs = append(errs, fmt.Errorf("deleting service: %w", err))
		}
		s.Close()
	}
	_ = eventlog.Remove(serviceName)
	// Fail-closed filters persist by design while Warden is stopped; uninstalling removes them.
	if err := windowskext.RemovePersistentFilters(); err != nil {
		errs = append(errs, fmt.Errorf("removing persistent filters: %w", err))
	}
	return errors.Join(errs...)
}

func controlService(start bool) error {
	m, err := mgr.Connect()
	if err != nil {
		return fmt.Errorf("connecting to the service manager: %w", err)
	}
	defer m.Disconnect()
	s, err := m.OpenService(serviceName)
	if err != nil {
		return fmt.Errorf("service %s is not installed: %w", serviceName, err)
	}
	defer s.Close()
	if start {
		if err := s.Start(); err != nil {
			return err
		}
		return waitForState(s, svc.Running, 30*time.Second)
	}
	if _, err := s.Control(svc.Stop); err != nil {
		return err
	}
	return waitForState(s, svc.Stopped, 30*time.Second)
}

func waitForState(s *mgr.Service, want svc.State, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for time.Now().Before(deadline) {
		st, err := s.Query()
		if err != nil {
			return err
		}
		if st.State == want {
			return nil
		}
		time.Sleep(200 * time.Millisecond)
	}
	return fmt.Errorf("service did not reach state %d within %s", want, limit)
}
