#!/usr/bin/env bash
# Builds Warden's .deb and .rpm with nfpm and checks what is inside them: the binary, the systemd unit, the
# default config (as a config file that upgrades keep), the docs, the maintainer scripts and the dependencies.
# Also checks the default config with the built binary, the unit with systemd-analyze (when present) and that
# every command line in the unit is one the binary accepts.
#
#   .ci/packages.sh                      # packages go to a temporary directory, removed at the end
#   PKG_OUT=dist .ci/packages.sh         # keep them in dist/
#   WARDEN_VERSION=1.2.3 .ci/packages.sh
#
# Runs as root on a fresh Debian/Ubuntu machine (installs rpm and nfpm when missing); exits non-zero on any
# failure.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n=== %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

export PATH="$PATH:/usr/local/go/bin:$(go env GOPATH)/bin"
export WARDEN_VERSION="${WARDEN_VERSION:-0.0.0-dev}"
export GOARCH="${GOARCH:-$(go env GOARCH)}"
commit=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
out="${PKG_OUT:-$work/out}"
mkdir -p "$out"

step "build warden $WARDEN_VERSION ($GOARCH, commit $commit)"
export WARDEN_BINARY="$work/warden"
CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=$WARDEN_VERSION -X main.commit=$commit" \
  -o "$WARDEN_BINARY" ./cmd/warden
"$WARDEN_BINARY" version | tee "$work/version.txt"
grep -q "warden $WARDEN_VERSION " "$work/version.txt" || fail "the binary does not report version $WARDEN_VERSION"

step "default and example configs"
"$WARDEN_BINARY" check -c packaging/warden.yaml
"$WARDEN_BINARY" check -c examples/warden.yaml
# The packaged default must change nothing: everything allowed, traffic flowing while the daemon is down.
"$WARDEN_BINARY" check -c packaging/warden.yaml | grep -q "(0 rules, backend auto, fail mode open)" ||
  fail "packaging/warden.yaml must be fail_mode open with no active rules"
for q in "--proto tcp --remote 192.0.2.1 --port 23" "--direction inbound --proto tcp --port 22"; do
  # shellcheck disable=SC2086 # word splitting of $q is intended
  got=$("$WARDEN_BINARY" explain -c packaging/warden.yaml $q --json)
  [ "$got" = '{"action":"allow","rule":"","via":""}' ] || fail "default config: explain $q gave $got"
done

step "maintainer scripts"
for s in packaging/scripts/*.sh; do
  sh -n "$s" || fail "$s: syntax error"
  [ -x "$s" ] || fail "$s: not executable"
done
if command -v shellcheck >/dev/null 2>&1; then
  shellcheck -s sh packaging/scripts/*.sh
fi
# Run each script the way dpkg and rpm call it, against stand-ins: systemctl, modprobe and warden record their
# arguments, and the paths the scripts touch point into a scratch directory.
fake="$work/fake"
mkdir -p "$fake/bin" "$fake/run-systemd-system" "$fake/var-log-warden"
for tool in systemctl modprobe warden; do
  printf '#!/bin/sh\necho "%s $*" >>"%s/calls"\n' "$tool" "$fake" >"$fake/bin/$tool"
  chmod +x "$fake/bin/$tool"
done
# script ARGS... -> the calls it made, one line each, or "none".
run_script() {
  local script=$1
  shift
  sed -e "s#/usr/bin/warden#$fake/bin/warden#g" -e "s#/run/systemd/system#$fake/run-systemd-system#g" \
    -e "s#/var/log/warden#$fake/var-log-warden#g" "packaging/scripts/$script" >"$fake/script"
  rm -f "$fake/calls"
  PATH="$fake/bin:$PATH" sh "$fake/script" "$@" >/dev/null || fail "$script $*: exit status $?"
  if [ -f "$fake/calls" ]; then tr '\n' ';' <"$fake/calls"; else printf none; fi
}
expect_calls() {
  local want=$1
  shift
  local got
  got=$(run_script "$@")
  [ "$got" = "$want" ] || fail "$*: made the calls '$got', want '$want'"
  echo "ok: $* -> $want"
}
reload="systemctl daemon-reload;"
# Fresh installs reload systemd but start nothing; upgrades restart a running service.
expect_calls "modprobe nfnetlink_queue;$reload" postinstall.sh configure ""
expect_calls "modprobe nfnetlink_queue;$reload" postinstall.sh 1
expect_calls "modprobe nfnetlink_queue;${reload}systemctl try-restart warden.service;" postinstall.sh configure 0.9.0
expect_calls "modprobe nfnetlink_queue;${reload}systemctl try-restart warden.service;" postinstall.sh 2
expect_calls none postinstall.sh abort-upgrade 0.9.0
# Removal stops the service and cleans up; an upgrade leaves it alone.
removed="systemctl disable --now warden.service;warden cleanup -c /etc/warden/warden.yaml;"
expect_calls "$removed" preremove.sh remove
expect_calls "$removed" preremove.sh 0
expect_calls none preremove.sh upgrade 1.0.0
expect_calls none preremove.sh 1
expect_calls "$reload" postremove.sh remove
expect_calls "$reload" postremove.sh 0
expect_calls none postremove.sh upgrade 1.0.0
expect_calls none postremove.sh 1
expect_calls "$reload" postremove.sh purge
[ ! -e "$fake/var-log-warden" ] || fail "postremove.sh purge: /var/log/warden is still there"

step "systemd unit"
# Every Exec line must be a command line the binary accepts: cobra rejects unknown commands and flags before
# it looks at --help, so "<line> --help" exits 0 exactly when the line parses.
grep -E '^Exec(Start|StartPre|Stop|StopPost|Reload)=/usr/bin/warden ' packaging/warden.service | while IFS= read -r line; do
  cmdline=${line#*=/usr/bin/warden }
  # shellcheck disable=SC2086 # word splitting of the command line is intended
  "$WARDEN_BINARY" $cmdline --help >/dev/null 2>"$work/err" ||
    fail "packaging/warden.service: '$line' is not accepted by this warden: $(cat "$work/err")"
  echo "ok: ${line%%=*}: warden $cmdline"
done
if command -v systemd-analyze >/dev/null 2>&1; then
  # verify wants the executables to exist: point the unit's /usr/bin/warden at the built binary.
  mkdir -p "$work/unit"
  sed "s#/usr/bin/warden#$WARDEN_BINARY#g" packaging/warden.service >"$work/unit/warden.service"
  systemd-analyze verify --man=no "$work/unit/warden.service" 2>&1 | tee "$work/verify.txt" || true
  # It exits 0 on some problems (unknown keys are "ignoring" warnings); any line about our unit is a failure.
  if grep -q "warden.service" "$work/verify.txt"; then
    fail "systemd-analyze verify reported problems in packaging/warden.service"
  fi
  # systemd-analyze security needs a running systemd; print the exposure where it has one.
  if [ -d /run/systemd/system ]; then
    systemd-analyze security --offline=yes "$work/unit/warden.service" 2>/dev/null | tail -n 1 || true
  fi
else
  echo "systemd-analyze not installed: unit syntax not verified"
fi

step "tools: nfpm, dpkg-deb, rpm"
if ! command -v nfpm >/dev/null 2>&1; then
  GOFLAGS= go install github.com/goreleaser/nfpm/v2/cmd/nfpm@v2.45.2
fi
command -v nfpm
if ! command -v rpm >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends rpm >/dev/null
fi
command -v dpkg-deb >/dev/null 2>&1 || fail "dpkg-deb is missing"

step "build packages"
nfpm package -f packaging/nfpm.yaml -p deb -t "$out/"
nfpm package -f packaging/nfpm.yaml -p rpm -t "$out/"
deb=$(ls "$out"/*.deb)
rpm=$(ls "$out"/*.rpm)
ls -l "$deb" "$rpm"

# want FILE-LIST PATH...: every PATH must be in the list (one path per line).
want() {
  local list=$1
  shift
  for p in "$@"; do
    grep -qxF "$p" "$list" || fail "$(basename "$list"): $p is missing"
  done
}

step "check the .deb"
dpkg-deb -c "$deb" | tee "$work/deb-long.txt"
# "-rwxr-xr-x root/root 123 2024-01-01 00:00 ./usr/bin/warden" -> "/usr/bin/warden"; dirs keep their "/".
awk '{print $6}' "$work/deb-long.txt" | sed 's#^\./#/#' >"$work/deb.txt"
want "$work/deb.txt" /usr/bin/warden /lib/systemd/system/warden.service /etc/warden/warden.yaml \
  /etc/logrotate.d/warden /usr/lib/modules-load.d/warden.conf /usr/share/doc/warden/README.md \
  /usr/share/doc/warden/configuration.md /usr/share/doc/warden/operations.md \
  /usr/share/doc/warden/troubleshooting.md /usr/share/doc/warden/design.md \
  /usr/share/doc/warden/examples/warden.yaml
grep -E ' \./usr/bin/warden$' "$work/deb-long.txt" | grep -q '^-rwxr-xr-x root/root' ||
  fail ".deb: /usr/bin/warden must be root-owned 0755"
grep -E ' \./etc/warden/warden.yaml$' "$work/deb-long.txt" | grep -q '^-rw------- root/root' ||
  fail ".deb: /etc/warden/warden.yaml must be root-owned 0600"
dpkg-deb -f "$deb" Package Version Architecture Depends | tee "$work/deb-fields.txt"
grep -qx "Package: warden" "$work/deb-fields.txt" || fail ".deb: wrong package name"
grep -q "^Depends: .*iptables" "$work/deb-fields.txt" || fail ".deb: does not depend on iptables"
grep -q "^Depends: .*iproute2" "$work/deb-fields.txt" || fail ".deb: does not depend on iproute2"
mkdir -p "$work/deb-ctrl"
dpkg-deb -e "$deb" "$work/deb-ctrl"
grep -qx /etc/warden/warden.yaml "$work/deb-ctrl/conffiles" || fail ".deb: /etc/warden/warden.yaml is not a conffile"
for s in postinst prerm postrm; do
  [ -x "$work/deb-ctrl/$s" ] || fail ".deb: maintainer script $s is missing"
done
# The packaged files themselves: the binary runs and the installed default config passes its own check.
mkdir -p "$work/deb-root"
dpkg-deb -x "$deb" "$work/deb-root"
"$work/deb-root/usr/bin/warden" version | grep -q "warden $WARDEN_VERSION " || fail ".deb: packaged binary is wrong"
"$work/deb-root/usr/bin/warden" check -c "$work/deb-root/etc/warden/warden.yaml" >/dev/null ||
  fail ".deb: the packaged /etc/warden/warden.yaml does not pass warden check"
cmp -s "$work/deb-root/lib/systemd/system/warden.service" packaging/warden.service ||
  fail ".deb: the packaged unit differs from packaging/warden.service"

step "check the .rpm"
rpm -qlp "$rpm" | tee "$work/rpm.txt"
want "$work/rpm.txt" /usr/bin/warden /usr/lib/systemd/system/warden.service /etc/warden/warden.yaml \
  /etc/logrotate.d/warden /usr/lib/modules-load.d/warden.conf /usr/share/doc/warden/README.md \
  /usr/share/doc/warden/configuration.md /usr/share/doc/warden/operations.md \
  /usr/share/doc/warden/troubleshooting.md /usr/share/doc/warden/design.md \
  /usr/share/doc/warden/examples/warden.yaml
grep -qx /lib/systemd/system/warden.service "$work/rpm.txt" && fail ".rpm: the unit belongs in /usr/lib/systemd/system"
rpm -qcp "$rpm" >"$work/rpm-config.txt"
grep -qx /etc/warden/warden.yaml "$work/rpm-config.txt" || fail ".rpm: /etc/warden/warden.yaml is not a config file"
rpm -qp --qf '[%{FILEFLAGS:fflags} %{FILENAMES}\n]' "$rpm" | grep -qx 'cn /etc/warden/warden.yaml' ||
  fail ".rpm: /etc/warden/warden.yaml is not %config(noreplace)"
rpm -qp --qf '[%{FILEMODES:perms} %{FILEUSERNAME} %{FILENAMES}\n]' "$rpm" >"$work/rpm-modes.txt"
grep -qx -- '-rwxr-xr-x root /usr/bin/warden' "$work/rpm-modes.txt" || fail ".rpm: /usr/bin/warden must be root-owned 0755"
grep -qx -- '-rw------- root /etc/warden/warden.yaml' "$work/rpm-modes.txt" || fail ".rpm: warden.yaml must be 0600"
rpm -qp --requires "$rpm" | tee "$work/rpm-requires.txt"
grep -q '^iptables' "$work/rpm-requires.txt" || fail ".rpm: does not require iptables"
rpm -qp --scripts "$rpm" >"$work/rpm-scripts.txt"
for s in "postinstall scriptlet" "preuninstall scriptlet" "postuninstall scriptlet"; do
  grep -q "^$s" "$work/rpm-scripts.txt" || fail ".rpm: $s is missing"
done
rpm -qp --qf '%{NAME} %{VERSION} %{RELEASE} %{ARCH}\n' "$rpm"

step "packages OK"
ls -l "$out"
