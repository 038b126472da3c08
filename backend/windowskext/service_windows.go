package windowskext

import (
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"time"

	"golang.org/x/sys/windows"
	"golang.org/x/sys/windows/svc"
	"golang.org/x/sys/windows/svc/mgr"
)

// Service timings (kext-protocol.md 1.1).
const (
	serviceStopWait   = 10 * time.Second
	serviceGoneWait   = 30 * time.Second
	serviceStartWait  = 30 * time.Second
	servicePollPeriod = 100 * time.Millisecond
)

// installDriver (re)creates the driver's kernel service from driverPath and starts it. A service left by an
// earlier run is stopped and deleted first, so a restart after a crash converges to a fresh start.
func installDriver(log *slog.Logger, driverPath string) error {
	if driverPath == "" {
		return errors.New("no driver path configured (backend option DriverPath)")
	}
	path, err := filepath.Abs(driverPath)
	if err != nil {
		return fmt.Errorf("resolving the driver path: %w", err)
	}
	m, err := mgr.Connect()
	if err != nil {
		return fmt.Errorf("connecting to the service manager: %w", err)
	}
	defer m.Disconnect()

	if err := removeService(log, m); err != nil {
		return fmt.Errorf("removing the stale driver service: %w", err)
	}

	name, err := windows.UTF16PtrFromString(ServiceName)
	if err != nil {
		return err
	}
	// The path is passed unquoted: mgr.CreateService quotes paths with spaces, which suits a process's
	// command line but not a driver's image path.
	image, err := windows.UTF16PtrFromString(path)
	if err != nil {
		return err
	}
	h, err := windows.CreateService(m.Handle, name, name, windows.SERVICE_ALL_ACCESS, windows.SERVICE_KERNEL_DRIVER,
		windows.SERVICE_DEMAND_START, windows.SERVICE_ERROR_NORMAL, image, nil, nil, nil, nil, nil)
	if err != nil {
		return fmt.Errorf("creating the driver service for %s: %w", path, err)
	}
	s := &mgr.Service{Name: ServiceName, Handle: h}
	defer s.Close()

	if err := s.Start(); err != nil && !errors.Is(err, windows.ERROR_SERVICE_ALREADY_RUNNING) {
		_ = s.Delete()
		return fmt.Errorf("starting the driver service: %w", err)
	}
	if err := waitState(s, svc.Running, serviceStartWait); err != nil {
		_ = stopService(s)
		_ = s.Delete()
		return fmt.Errorf("starting the driver service: %w", err)
	}
	log.Info("kext driver service started", "path", path)
	return nil
}

// uninstallDriver stops and deletes the driver's service.
func uninstallDriver(log *slog.Logger) error {
	m, err := mgr.Connect()
	if err != nil {
		return fmt.Errorf("connecting to the service manager: %w", err)
	}
	defer m.Disconnect()
	return removeService(log, m)
}

// removeService stops and deletes the service if it exists, and waits until it is gone.
func removeService(log *slog.Logger, m *mgr.Mgr) error {
	s, err := m.OpenService(ServiceName)
	if errors.Is(err, windows.ERROR_SERVICE_DOES_NOT_EXIST) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("opening service %s: %w", ServiceName, err)
	}
	var errs []error
	if err := stopService(s); err != nil {
		errs = append(errs, err)
	}
	if err := s.Delete(); err != nil && !errors.Is(err, windows.ERROR_SERVICE_MARKED_FOR_DELETE) {
		errs = append(errs, fmt.Errorf("deleting service %s: %w", ServiceName, err))
	}
	s.Close()
	// Deletion completes once every handle to the service is closed; wait for it.
	deadline := time.Now().Add(serviceGoneWait)
	for {
		s, err := m.OpenService(ServiceName)
		if errors.Is(err, windows.ERROR_SERVICE_DOES_NOT_EXIST) {
			break
		}
		if err == nil {
			s.Close()
		}
		if time.Now().After(deadline) {
			errs = append(errs, fmt.Errorf("service %s still exists %v after deletion", ServiceName, serviceGoneWait))
			break
		}
		time.Sleep(servicePollPeriod)
	}
	if len(errs) == 0 {
		log.Debug("kext driver service removed")
	}
	return errors.Join(errs...)
}

// stopService stops a running service and waits up to serviceStopWait for it.
func stopService(s *mgr.Service) error {
	st, err := s.Query()
	if err != nil {
		return fmt.Errorf("querying service %s: %w", ServiceName, err)
	}
	if st.State == svc.Stopped {
		return nil
	}
	if _, err := s.Control(svc.Stop); err != nil && !errors.Is(err, windows.ERROR_SERVICE_NOT_ACTIVE) {
		return fmt.Errorf("stopping service %s: %w", ServiceName, err)
	}
	return waitState(s, svc.Stopped, serviceStopWait)
}

// waitState polls the service until it reaches want.
func waitState(s *mgr.Service, want svc.State, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for {
		st, err := s.Query()
		if err != nil {
			return fmt.Errorf("querying service %s: %w", ServiceName, err)
		}
		if st.State == want {
			return nil
		}
		if want == svc.Running && st.State == svc.Stopped {
			return fmt.Errorf("service %s stopped while starting (exit code %d)", ServiceName, st.Win32ExitCode)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("service %s did not reach state %d within %v (state %d)", ServiceName, want, limit, st.State)
		}
		wait := time.Duration(st.WaitHint) * time.Millisecond / 10
		time.Sleep(min(max(wait, servicePollPeriod), time.Second))
	}
}
