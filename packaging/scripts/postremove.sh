#!/bin/sh
# Warden package: after the files are removed.
#   deb postrm: "remove" | "purge" | "upgrade" | "disappear" | "abort-*" | "failed-upgrade"
#   rpm %postun: 0 when the package is erased, 1 after an upgrade
set -e

case "$1" in
	remove | 0)
		[ -d /run/systemd/system ] && systemctl daemon-reload >/dev/null 2>&1 || true
		;;
	purge)
		# dpkg removes /etc/warden/warden.yaml itself (a conffile); the logs are ours to remove.
		[ -d /run/systemd/system ] && systemctl daemon-reload >/dev/null 2>&1 || true
		rm -rf /var/log/warden
		;;
esac
exit 0
