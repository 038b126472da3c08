#!/bin/sh
# Warden package: before the files are removed.
#   deb prerm: "remove" | "upgrade" | "deconfigure" | "failed-upgrade"
#   rpm %preun: 0 when the package is erased, 1 when an upgrade replaces it
#
# On an upgrade nothing happens here (postinstall restarts the running service). On removal the service is
# stopped, which removes its rules, and then `warden cleanup` removes whatever an earlier crash may have left:
# once the binary is gone nothing could remove leftovers, and with fail_mode closed they block all traffic.
set -e

case "$1" in
	remove | deconfigure | 0) ;;
	*) exit 0 ;;
esac

if [ -d /run/systemd/system ]; then
	systemctl disable --now warden.service >/dev/null 2>&1 || true
fi
if [ -x /usr/bin/warden ]; then
	# It refuses (and says so) while a daemon still answers, e.g. one started by hand.
	/usr/bin/warden cleanup -c /etc/warden/warden.yaml || echo "warden: cleanup failed; run 'warden cleanup' before removing Warden" >&2
fi
exit 0
