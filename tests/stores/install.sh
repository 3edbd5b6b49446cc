#!/usr/bin/env bash
# install.sh -- idempotently install the real mailbox backends used by the
# LMTP gateway's integration tests: Cyrus IMAP 3.6 (lmtpd + imapd) and
# Dovecot 2.3 (lmtp + imap), plus python3 (the scripts' port and banner helpers).
#
# Debian 12 specifics handled here:
#  * cyrus-imapd "Conflicts: imap-server" and dovecot-imapd "Provides:
#    imap-server", so the two IMAP servers cannot both be installed by dpkg.
#    We install dovecot-imapd normally and only *unpack* the cyrus-imapd .deb
#    (it ships just imapd/idled/squatter) into $CYRUS_IMAPD_DIR; cyrus.sh
#    points cyrus.conf at that imapd.  All other Cyrus daemons (master,
#    lmtpd, ctl_*) come from cyrus-common, which installs fine.
#  * cyrus-common Depends on "default-mta | mail-transport-agent"; without an
#    MTA already installed apt would pull exim4 (which conflicts with
#    postfix).  We therefore name postfix explicitly when no MTA is present.
#  * No systemd / no running init: postinst scripts call invoke-rc.d; a
#    /usr/sbin/policy-rc.d that exits 101 makes them skip starting services.
#    We create one if missing (and leave it: it only affects invoke-rc.d).
#  * Any daemon a postinst nevertheless started from the *system* config is
#    stopped by PID (pidfile), never by name.
#
# Env: CYRUS_IMAPD_DIR (default /usr/local/lib/cyrus-imapd) -- where the
#      unpacked Cyrus imapd lives.
#
# Adapted for postern's test suite from the shared backends kit (shared/backends/, run and
# verified on Debian 12: Cyrus IMAP 3.6.1, Dovecot 2.3.19.1); its tested logic is unchanged.
# Used by tests/common_stores (the Rust harness) and .ci/install-stores.sh.
set -euo pipefail

CYRUS_IMAPD_DIR="${CYRUS_IMAPD_DIR:-/usr/local/lib/cyrus-imapd}"
export DEBIAN_FRONTEND=noninteractive
APT=(apt-get -o DPkg::Lock::Timeout=600 -o Acquire::Retries=3 -y -q)

if [ "$(id -u)" != 0 ]; then
  echo "install.sh: must run as root" >&2
  exit 1
fi

# 1. Keep postinst scripts from starting services (no init system here).
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\n# installed by backends/install.sh: do not start services from maintainer scripts\nexit 101\n' > /usr/sbin/policy-rc.d
  chmod 755 /usr/sbin/policy-rc.d
  echo "install.sh: created /usr/sbin/policy-rc.d (exit 101)"
fi

pkgs_ok() {
  local p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$' || return 1
  done
}

PKGS=(cyrus-common cyrus-admin cyrus-clients sasl2-bin db-util
      dovecot-core dovecot-lmtpd dovecot-imapd python3)

need_install=0
pkgs_ok "${PKGS[@]}" || need_install=1
[ -x "$CYRUS_IMAPD_DIR/imapd" ] || need_install=1

if [ "$need_install" = 1 ]; then
  # apt lists: refresh if empty or older than a day.
  if [ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' -mmin -1440 2>/dev/null | head -1)" ]; then
    "${APT[@]}" update
  fi
fi

if ! pkgs_ok "${PKGS[@]}"; then
  extra=()
  # cyrus-common needs an MTA; make sure apt picks postfix, never exim4.
  if ! dpkg-query -W -f='${Provides} ${Status}\n' 2>/dev/null \
       | grep -E 'mail-transport-agent.*install ok installed' >/dev/null; then
    extra+=(postfix)
  fi
  # If a previous run was interrupted, let dpkg finish first (fails harmlessly
  # while another apt/dpkg holds the lock; apt-get below waits for it).
  dpkg --configure -a 2>/dev/null || true
  if ! "${APT[@]}" install --no-install-recommends "${PKGS[@]}" "${extra[@]}"; then
    # stale package lists (e.g. a security update replaced a version): refresh, retry
    "${APT[@]}" update
    "${APT[@]}" install --no-install-recommends "${PKGS[@]}" "${extra[@]}"
  fi
fi

# 2. Cyrus imapd: unpack (not install) the cyrus-imapd .deb of the same
#    version as cyrus-common.
want_ver="$(dpkg-query -W -f='${Version}' cyrus-common)"
have_ver="$(cat "$CYRUS_IMAPD_DIR/VERSION" 2>/dev/null || true)"
if [ ! -x "$CYRUS_IMAPD_DIR/imapd" ] || [ "$have_ver" != "$want_ver" ]; then
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  dl() { ( cd "$tmp" && apt-get -o Acquire::Retries=3 -o APT::Sandbox::User=root -q download "cyrus-imapd=$want_ver" ); }
  if ! dl; then
    # that exact version is gone from the mirror: refresh and bring cyrus-common
    # to the current version, then fetch the matching cyrus-imapd
    "${APT[@]}" update
    "${APT[@]}" install --no-install-recommends --only-upgrade \
      cyrus-common cyrus-admin cyrus-clients libcyrus-imap-perl
    want_ver="$(dpkg-query -W -f='${Version}' cyrus-common)"
    dl
  fi
  dpkg-deb -x "$tmp"/cyrus-imapd_*.deb "$tmp/x"
  mkdir -p "$CYRUS_IMAPD_DIR"
  install -m 755 "$tmp/x/usr/lib/cyrus/bin/imapd" "$CYRUS_IMAPD_DIR/imapd"
  echo "$want_ver" > "$CYRUS_IMAPD_DIR/VERSION"
  echo "install.sh: unpacked cyrus-imapd $want_ver imapd into $CYRUS_IMAPD_DIR"
fi
if ldd "$CYRUS_IMAPD_DIR/imapd" | grep -q 'not found'; then
  echo "install.sh: $CYRUS_IMAPD_DIR/imapd has missing libraries:" >&2
  ldd "$CYRUS_IMAPD_DIR/imapd" | grep 'not found' >&2
  exit 1
fi

# 3. Stop system-config daemons a postinst may have started (by PID only).
stop_pidfile() { # pidfile expected-comm
  local pf="$1" comm="$2" pid
  [ -r "$pf" ] || return 0
  pid="$(head -1 "$pf" | tr -dc 0-9)"
  [ -n "$pid" ] || return 0
  if [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$comm" ]; then
    echo "install.sh: stopping system $comm (pid $pid from $pf)"
    kill "$pid" 2>/dev/null || true
  fi
}
stop_pidfile /run/dovecot/master.pid dovecot
stop_pidfile /run/cyrus-master.pid cyrmaster
stop_pidfile /run/saslauthd/saslauthd.pid saslauthd

echo "install.sh: OK"
echo "  cyrus-common  $(dpkg-query -W -f='${Version}' cyrus-common)"
echo "  dovecot-core  $(dpkg-query -W -f='${Version}' dovecot-core)"
echo "  cyrus imapd   $CYRUS_IMAPD_DIR/imapd"
