#!/bin/sh
# Warden package: after the files are in place.
#   deb postinst: "configure" [previously configured version]   (also abort-upgrade/abort-remove/...)
#   rpm %post:    1 on a first install, 2 on an upgrade
#
# A fresh install does not enable or start the service: a firewall that switches itself on could cut the
# connection the package was installed over, and the admin should look at the config first. An upgrade
# restarts the service only if it was running, so the new binary takes over.
set -e

upgrade=false
case "$1" in
	configure) [ -n "$2" ] && upgrade=true ;;
	2) upgrade=true ;;
	1) ;;
	*) exit 0 ;;
esac

# Best effort: the module is listed in modules-load.d for the next boot; load it now for the first start.
modprobe nfnetlink_queue >/dev/null 2>&1 || true

if [ -d /run/systemd/system ]; then
	systemctl daemon-reload >/dev/null 2>&1 || true
	if [ "$upgrade" = true ]; then
		# Restarting is a clean stop (every rule removed) and a fresh start: a moment without filtering.
		systemctl try-restart warden.service >/dev/null 2>&1 || true
	fi
fi

if [ "$upgrade" = false ]; then
	cat <<'MSG'
Warden is installed but not running. Review /etc/warden/warden.yaml, check it, then start it:
    warden check
    systemctl enable --now warden
Documentation: /usr/share/doc/warden/
MSG
fi
exit 0
