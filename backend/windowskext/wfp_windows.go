package windowskext

import (
	"errors"
	"fmt"
	"log/slog"

	"github.com/tailscale/wf"
	"golang.org/x/sys/windows"
)

// Warden's WFP objects. The GUIDs are fixed so a later run finds what an earlier one left.
var (
	// Dynamic session: the hard permit for Warden's own executable, gone with the session.
	providerID = wf.ProviderID{Data1: 0x71787361, Data2: 0xc217, Data3: 0x41c6, Data4: [8]byte{0x81, 0xcd, 0xf4, 0xdc, 0x7f, 0x15, 0x3c, 0x8e}}
	sublayerID = wf.SublayerID{Data1: 0x1f1a7ab6, Data2: 0xc052, Data3: 0x4c9d, Data4: [8]byte{0x9d, 0xd1, 0xd4, 0xba, 0x82, 0x53, 0x02, 0x20}}
	// Persistent session: the fail-closed block that holds while the daemon and the driver are down.
	persistentProviderID = wf.ProviderID{Data1: 0xbab34ed6, Data2: 0x4422, Data3: 0x4641, Data4: [8]byte{0xab, 0x55, 0x14, 0x2e, 0x1f, 0x2d, 0x37, 0xa9}}
	persistentSublayerID = wf.SublayerID{Data1: 0x52b3a081, Data2: 0x2ebc, Data3: 0x4ce5, Data4: [8]byte{0xab, 0x05, 0x59, 0x19, 0x3d, 0x65, 0x6b, 0xbc}}
)

// The driver's sublayer has the maximum weight (0xFFFF). Ours comes right after it: the driver decides first
// (and hard-permits its owner's connections itself), then our hard permit keeps lower sublayers, i.e. other
// software's filters, from blocking Warden's own traffic.
const (
	sublayerWeight           = 0xFFFE
	persistentSublayerWeight = 0xFFFD
)

// aleLayers are the connection-authorisation layers the rules cover, outbound and inbound.
var aleLayers = []wf.LayerID{
	wf.LayerALEAuthConnectV4, wf.LayerALEAuthConnectV6,
	wf.LayerALEAuthRecvAcceptV4, wf.LayerALEAuthRecvAcceptV6,
}

// ruleID derives a fixed rule GUID from a base GUID and an index.
func ruleID(base windows.GUID, i int) wf.RuleID {
	id := base
	id.Data4[7] ^= byte(i + 1)
	id.Data4[6] ^= 0x5a
	return wf.RuleID(id)
}

// ownAppID returns the WFP application id of the running executable.
func ownAppID() (string, error) {
	exe, err := executablePath()
	if err != nil {
		return "", err
	}
	appID, err := wf.AppID(exe)
	if err != nil {
		return "", fmt.Errorf("getting the WFP app id of %s: %w", exe, err)
	}
	return appID, nil
}

// installOwnPermit opens a dynamic WFP session and adds a hard permit for Warden's executable at the ALE
// connect and accept layers. Closing the returned session removes everything.
func installOwnPermit(log *slog.Logger) (*wf.Session, error) {
	appID, err := ownAppID()
	if err != nil {
		return nil, err
	}
	s, err := wf.New(&wf.Options{Name: "Warden", Description: "Warden firewall (dynamic)", Dynamic: true})
	if err != nil {
		return nil, fmt.Errorf("opening a WFP session: %w", err)
	}
	if err := s.AddProvider(&wf.Provider{ID: providerID, Name: "Warden", Description: "Warden firewall"}); err != nil {
		s.Close()
		return nil, fmt.Errorf("adding the WFP provider: %w", err)
	}
	if err := s.AddSublayer(&wf.Sublayer{ID: sublayerID, Name: "Warden", Description: "Warden's own traffic",
		Provider: providerID, Weight: sublayerWeight}); err != nil {
		s.Close()
		return nil, fmt.Errorf("adding the WFP sublayer: %w", err)
	}
	for i, layer := range aleLayers {
		r := &wf.Rule{
			ID:         ruleID(windows.GUID(sublayerID), i),
			Name:       "Warden: permit own traffic",
			Layer:      layer,
			Sublayer:   sublayerID,
			Provider:   providerID,
			Weight:     15,
			Conditions: []*wf.Match{{Field: wf.FieldALEAppID, Op: wf.MatchTypeEqual, Value: appID}},
			Action:     wf.ActionPermit,
			HardAction: true,
		}
		if err := s.AddRule(r); err != nil {
			s.Close()
			return nil, fmt.Errorf("adding the own-traffic permit at %s: %w", layer, err)
		}
	}
	log.Debug("WFP own-traffic permit installed", "app_id", appID)
	return s, nil
}

// installFailClosed adds persistent filters that block every connection except Warden's own and loopback. They
// outlive the process and reboots. They must not be in place while the driver filters: a block in any sublayer
// overrides the driver's (soft) permits. So they are added when the backend stops with fail mode "closed" and
// removed when it starts again, once the driver holds traffic itself.
func installFailClosed(log *slog.Logger) error {
	appID, err := ownAppID()
	if err != nil {
		return err
	}
	s, err := wf.New(&wf.Options{Name: "Warden", Description: "Warden firewall (fail-closed)"})
	if err != nil {
		return fmt.Errorf("opening a WFP session: %w", err)
	}
	defer s.Close()
	// Start from nothing, so a half-installed set never remains beside a new one.
	if err := removePersistent(s); err != nil {
		return err
	}
	if err := s.AddProvider(&wf.Provider{ID: persistentProviderID, Name: "Warden (fail-closed)",
		Description: "Blocks traffic while Warden is not running", Persistent: true}); err != nil {
		return fmt.Errorf("adding the persistent WFP provider: %w", err)
	}
	if err := s.AddSublayer(&wf.Sublayer{ID: persistentSublayerID, Name: "Warden (fail-closed)",
		Provider: persistentProviderID, Weight: persistentSublayerWeight, Persistent: true}); err != nil {
		return fmt.Errorf("adding the persistent WFP sublayer: %w", err)
	}
	n := 0
	add := func(layer wf.LayerID, name string, weight uint64, conds []*wf.Match, action wf.Action) error {
		r := &wf.Rule{
			ID: ruleID(windows.GUID(persistentSublayerID), n), Name: name, Layer: layer,
			Sublayer: persistentSublayerID, Provider: persistentProviderID, Weight: weight,
			Conditions: conds, Action: action, HardAction: action == wf.ActionPermit, Persistent: true,
		}
		n++
		if err := s.AddRule(r); err != nil {
			return fmt.Errorf("adding %q at %s: %w", name, layer, err)
		}
		return nil
	}
	var errs []error
	for _, layer := range aleLayers {
		errs = append(errs,
			add(layer, "Warden: permit own traffic", 15, []*wf.Match{{Field: wf.FieldALEAppID, Op: wf.MatchTypeEqual, Value: appID}}, wf.ActionPermit),
			add(layer, "Warden: permit loopback", 14, []*wf.Match{{Field: wf.FieldFlags, Op: wf.MatchTypeFlagsAllSet, Value: wf.ConditionFlagIsLoopback}}, wf.ActionPermit),
			add(layer, "Warden: block while not running", 0, nil, wf.ActionBlock),
		)
	}
	if err := errors.Join(errs...); err != nil {
		// Never leave a partial set: a block without its permits would cut Warden off too.
		return errors.Join(err, removePersistent(s))
	}
	log.Info("WFP fail-closed filters installed; they block traffic until Warden starts again")
	return nil
}

// RemovePersistentFilters removes the fail-closed filters a stop with fail mode "closed" left, e.g. when
// uninstalling Warden. The backend does it itself when it starts.
func RemovePersistentFilters() error {
	s, err := wf.New(&wf.Options{Name: "Warden", Description: "Warden firewall (clean-up)"})
	if err != nil {
		return fmt.Errorf("opening a WFP session: %w", err)
	}
	defer s.Close()
	return removePersistent(s)
}

// removePersistent deletes every rule of the persistent provider, then its sublayer and the provider.
func removePersistent(s *wf.Session) error {
	rules, err := s.Rules()
	if err != nil {
		return fmt.Errorf("listing WFP rules: %w", err)
	}
	var errs []error
	for _, r := range rules {
		if r.Provider == persistentProviderID {
			if err := s.DeleteRule(r.ID); err != nil {
				errs = append(errs, fmt.Errorf("deleting WFP rule %s: %w", r.Name, err))
			}
		}
	}
	if err := s.DeleteSublayer(persistentSublayerID); err != nil && !isNotFound(err) {
		errs = append(errs, fmt.Errorf("deleting the persistent WFP sublayer: %w", err))
	}
	if err := s.DeleteProvider(persistentProviderID); err != nil && !isNotFound(err) {
		errs = append(errs, fmt.Errorf("deleting the persistent WFP provider: %w", err))
	}
	return errors.Join(errs...)
}

// WFP "not found" errors (FWP_E_*_NOT_FOUND).
const (
	fwpEProviderNotFound = windows.Errno(0x80320005)
	fwpESublayerNotFound = windows.Errno(0x80320007)
)

func isNotFound(err error) bool {
	return errors.Is(err, fwpEProviderNotFound) || errors.Is(err, fwpESublayerNotFound)
}
