#!/usr/bin/env bash
# cyrus.sh -- run a private, throw-away Cyrus IMAP 3.6 instance under DIR.
#
#   cyrus.sh start  DIR [LMTP_PORT] [IMAP_PORT]   (port omitted or 0 = pick a free one)
#   cyrus.sh stop   DIR
#   cyrus.sh status DIR
#   cyrus.sh mkuser DIR USER [PASSWORD] [QUOTA_KB]   (needs a running instance;
#                                    password default: user name; QUOTA_KB: STORAGE quota in KiB)
#   cyrus.sh mkusers DIR USER...                     (password = user name, no quota)
#   cyrus.sh quota  DIR USER QUOTA_KB                 (set/replace STORAGE quota; "none" removes it)
#   cyrus.sh env    DIR                               (print the instance's KEY=VALUE lines)
#
# Everything lives under DIR: etc/ (imapd.conf, cyrus.conf), conf/ (Cyrus
# configdirectory: databases, proc, locks, sasldb2), spool/ (partition),
# master.pid, master.log (master's stdout/stderr), backend.env, and the
# LMTP unix socket DIR/lmtp.sock.  Only 127.0.0.1 is listened on.
#
# "start" prints (and writes to DIR/backend.env) lines such as
#   LMTP_HOST=127.0.0.1 LMTP_PORT=.. LMTP_SOCKET=DIR/lmtp.sock IMAP_PORT=..
#   ADMIN_USER=admin ADMIN_PASSWORD=adminpass
# and returns only when both ports answer with their greeting banners.
#
# Env knobs (read at "start"):
#   CYRUS_LMTP_TCP_AUTH=1   TCP LMTP requires AUTH (no lmtpd -a); the client
#                           must AUTH PLAIN as ADMIN_USER.  Default 0:
#                           TCP LMTP from 127.0.0.1 is pre-authenticated.
#   CYRUS_AUTOCREATE=1      lmtpd auto-creates INBOX for unknown users
#                           (autocreate_post), i.e. no "550 5.1.1 User unknown".
#   CYRUS_OVERQUOTA_PERM=1  over quota = 552 5.2.2 (default 452 4.2.2).
#   CYRUS_DUPSUPPRESS=1     restore Cyrus' default duplicatesuppression: 1
#                           (meant to drop a 2nd delivery of the same
#                           Message-ID to a mailbox; in our test a plain INBOX
#                           re-delivery was stored twice anyway).  Default 0.
#   CYRUS_LMTP_MAXCHILD=N   maxchild of the lmtp and lmtpunix services (each:
#                           at most N lmtpd, more connections wait in the
#                           listen backlog).  Default 50.
#   CYRUS_ADMIN, CYRUS_ADMIN_PASSWORD (default admin / adminpass)
#   CYRUS_IMAPD             path of imapd (default: /usr/lib/cyrus/bin/imapd
#                           if present, else /usr/local/lib/cyrus-imapd/imapd
#                           as unpacked by install.sh)
#   CYRUS_START_TIMEOUT     seconds to wait for the banners (default 30)
#
# Privileges: Cyrus refuses to run as root.  Started by root, master and its
# children run as the "cyrus" system user (group "mail") and the script
# chowns DIR's contents to it (DIR itself gets mode 0755 so cyrus can reach
# it; every parent of DIR must be searchable by others).  Started by a
# non-root user, Cyrus runs as that user (CYRUS_USER/CYRUS_GROUP env).
#
# Adapted for postern's test suite from the shared backends kit (shared/backends/, run and
# verified on Debian 12: Cyrus IMAP 3.6.1, Dovecot 2.3.19.1); its tested logic is unchanged.
# Used by tests/common_stores (the Rust harness) and .ci/install-stores.sh.
set -euo pipefail

SELF="$(basename "$0")"
HERE="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=_lib.sh
. "$HERE/_lib.sh"
usage() { sed -n '2,13p' "$0" >&2; exit 2; }

CYRUS_BIN=/usr/lib/cyrus/bin
MASTER="$CYRUS_BIN/master"

load_env() {
  [ -r "$DIR/backend.env" ] || die "$DIR/backend.env missing (instance never started?)"
  # shellcheck disable=SC1091
  . "$DIR/backend.env"
}

# saslpw USER PASSWORD: (re)set USER's password in the private sasldb
saslpw() {
  printf '%s' "$2" | saslpasswd2 -p -c -f "$DIR/conf/sasldb2" -u localhost "$1"
  if [ "$(id -u)" = 0 ]; then chown "$CY_USER:$CY_GROUP" "$DIR/conf/sasldb2"; fi
  chmod 0600 "$DIR/conf/sasldb2"
}

master_pid() { pid_alive_with "$DIR/master.pid" "-M $DIR/etc/cyrus.conf"; }

cmd_start() {
  local lmtp_port="${1:-0}" imap_port="${2:-0}"
  [ "$lmtp_port" = 0 ] && lmtp_port="$(free_port)"
  [ "$imap_port" = 0 ] && imap_port="$(free_port)"
  [ "$lmtp_port" != "$imap_port" ] || die "LMTP and IMAP port must differ"

  if pid="$(master_pid)"; then die "already running (pid $pid) in $DIR"; fi
  port_free "$lmtp_port" || die "127.0.0.1:$lmtp_port is already in use"
  port_free "$imap_port" || die "127.0.0.1:$imap_port is already in use"

  local imapd="${CYRUS_IMAPD:-}"
  if [ -z "$imapd" ]; then
    if [ -x "$CYRUS_BIN/imapd" ]; then imapd="$CYRUS_BIN/imapd"
    else imapd=/usr/local/lib/cyrus-imapd/imapd; fi
  fi
  [ -x "$imapd" ] || die "imapd not found at $imapd (run install.sh)"
  [ -x "$MASTER" ] || die "$MASTER not found (run install.sh)"

  local admin="${CYRUS_ADMIN:-admin}" adminpw="${CYRUS_ADMIN_PASSWORD:-adminpass}"
  local lmtp_cmd="lmtpd -a" tcp_auth=0
  if [ "${CYRUS_LMTP_TCP_AUTH:-0}" = 1 ]; then lmtp_cmd="lmtpd"; tcp_auth=1; fi
  local autocreate="${CYRUS_AUTOCREATE:-0}" permq="${CYRUS_OVERQUOTA_PERM:-0}"
  local lmtp_maxchild="${CYRUS_LMTP_MAXCHILD:-50}"
  local sock="$DIR/lmtp.sock"
  # sun_path is limited to 107 bytes
  [ "${#sock}" -lt 100 ] || die "socket path too long (${#sock} bytes): $sock"

  mkdir -p "$DIR"/{etc,spool,conf/{db,lock,log,msg,proc,ptclient,quota,sieve,socket,user,sync}}
  rm -f "$sock" "$DIR/master.pid"

  cat > "$DIR/etc/imapd.conf" <<EOF
# generated by cyrus.sh -- private test instance
configdirectory: $DIR/conf
partition-default: $DIR/spool
defaultpartition: default
servername: localhost
syslog_prefix: cyrus-test
lmtpsocket: $sock
idlesocket: $DIR/conf/socket/idle
notifysocket: $DIR/conf/socket/notify
admins: $admin
lmtp_admins: $admin
unixhierarchysep: yes
altnamespace: no
virtdomains: off
lmtp_downcase_rcpt: yes
allowplaintext: yes
sasl_pwcheck_method: auxprop
sasl_auxprop_plugin: sasldb
sasl_sasldb_path: $DIR/conf/sasldb2
sasl_mech_list: PLAIN LOGIN
sasl_auto_transition: no
umask: 077
hashimapspool: false
duplicatesuppression: ${CYRUS_DUPSUPPRESS:-0}
lmtp_over_quota_perm_failure: $permq
autocreate_post: $autocreate
autocreate_quota: $([ "$autocreate" = 1 ] && echo 0 || echo -1)
EOF

  cat > "$DIR/etc/cyrus.conf" <<EOF
# generated by cyrus.sh -- private test instance
START {
  recover   cmd="ctl_cyrusdb -r -C $DIR/etc/imapd.conf"
}
SERVICES {
  imap      cmd="$imapd -C $DIR/etc/imapd.conf" listen="127.0.0.1:$imap_port" prefork=0 maxchild=50
  lmtp      cmd="$lmtp_cmd -C $DIR/etc/imapd.conf" listen="127.0.0.1:$lmtp_port" prefork=0 maxchild=$lmtp_maxchild
  lmtpunix  cmd="lmtpd -C $DIR/etc/imapd.conf" listen="$sock" prefork=0 maxchild=$lmtp_maxchild
}
EVENTS {
  checkpoint cmd="ctl_cyrusdb -c -C $DIR/etc/imapd.conf" period=30
}
DAEMON {
}
EOF

  local cy_user cy_group
  if [ "$(id -u)" = 0 ]; then
    cy_user="${CYRUS_USER:-cyrus}"
    cy_group="${CYRUS_GROUP:-mail}"
    chmod 0755 "$DIR"
    chown -R "$cy_user:$cy_group" "$DIR/conf" "$DIR/spool"
    setpriv --reuid="$cy_user" --regid="$cy_group" --clear-groups \
      test -x "$DIR" -a -w "$DIR/conf" -a -w "$DIR/spool" \
      || die "user $cy_user cannot reach $DIR (is every parent directory searchable by others?)"
  else
    cy_user="${CYRUS_USER:-$(id -un)}"
    cy_group="${CYRUS_GROUP:-$(id -gn)}"
  fi

  cat > "$DIR/backend.env" <<EOF
BACKEND=cyrus
LMTP_HOST=127.0.0.1
LMTP_PORT=$lmtp_port
LMTP_SOCKET=$sock
LMTP_TCP_AUTH=$tcp_auth
IMAP_HOST=127.0.0.1
IMAP_PORT=$imap_port
ADMIN_USER=$admin
ADMIN_PASSWORD=$adminpw
CY_USER=$cy_user
CY_GROUP=$cy_group
EOF

  # admin account in the private sasldb (realm = servername)
  CY_USER="$cy_user" CY_GROUP="$cy_group"
  saslpw "$admin" "$adminpw"

  local t0; t0="$(now)"
  CYRUS_USER="$cy_user" CYRUS_GROUP="$cy_group" \
    "$MASTER" -C "$DIR/etc/imapd.conf" -M "$DIR/etc/cyrus.conf" \
      -p "$DIR/master.pid" -L "$DIR/master.log" -d

  local to="${CYRUS_START_TIMEOUT:-30}"
  if ! wait_banner lmtp "$lmtp_port" "$to" || ! wait_banner imap "$imap_port" "$to" \
     || ! wait_banner lmtp "$sock" "$to"; then
    echo "$SELF: start failed; master.log:" >&2
    tail -20 "$DIR/master.log" >&2 || true
    cmd_stop >/dev/null 2>&1 || true
    exit 1
  fi
  echo "STARTUP_SECONDS=$(elapsed "$t0" "$(now)")" >> "$DIR/backend.env"
  grep -v '^CY_' "$DIR/backend.env"
}

cmd_stop() {
  local pid
  if ! pid="$(master_pid)"; then
    echo "$SELF: not running in $DIR"
    rm -f "$DIR/master.pid"
    return 0
  fi
  # master TERMs its children itself; make sure they are gone too (they all
  # carry "-C DIR/etc/imapd.conf" on their command line) so the ports are free
  term_and_wait "$pid" || true
  reap_instance "-C $DIR/etc/imapd.conf"
  rm -f "$DIR/master.pid" "$DIR/lmtp.sock"
  echo "$SELF: stopped (pid $pid)"
}

# imap_admin PYTHON-SNIPPET: runs snippet with `M` = logged-in admin IMAP4
imap_admin() {
  load_env
  IMAP_PORT="$IMAP_PORT" ADMIN_USER="$ADMIN_USER" ADMIN_PASSWORD="$ADMIN_PASSWORD" \
    "$PY" -c "
import imaplib, os, sys
M = imaplib.IMAP4('127.0.0.1', int(os.environ['IMAP_PORT']))
M.login(os.environ['ADMIN_USER'], os.environ['ADMIN_PASSWORD'])
def ok(r, what):
    if r[0] != 'OK':
        sys.exit('%s failed: %r' % (what, r))
$1
M.logout()
" "${@:2}"
}

lc() { printf '%s' "$1" | tr '[:upper:]' '[:lower:]'; }

# create mailboxes user/NAME for every NAME in argv[1:] (QUOTA env: KiB)
CREATE_PY='
quota = os.environ.get("QUOTA", "")
for u in sys.argv[1:]:
    mb = "user/" + u
    r = M.create(mb)
    if r[0] != "OK" and b"already exists" not in (r[1][0] or b"").lower():
        sys.exit("CREATE %s failed: %r" % (mb, r))
    if quota:
        ok(M.setquota(mb, "(STORAGE %s)" % quota), "SETQUOTA")
'

need_running() { master_pid >/dev/null || die "instance in $DIR is not running (start it first)"; }

cmd_mkuser() {
  local user pw quota="${3:-}"
  user="$(lc "${1:?user}")"
  pw="${2:-$user}"
  case "$user" in */*|*' '*|'') die "bad user name: $user" ;; esac
  need_running
  load_env
  saslpw "$user" "$pw"
  QUOTA="$quota" imap_admin "$CREATE_PY" "$user"
  echo "$SELF: user $user ready (mailbox user/$user${quota:+, quota ${quota}KiB})"
}

cmd_mkusers() {
  local u; local -a users=()
  [ $# -gt 0 ] || die "mkusers: no users given"
  need_running
  load_env
  for u in "$@"; do
    u="$(lc "$u")"
    case "$u" in */*|*' '*|'') die "bad user name: $u" ;; esac
    saslpw "$u" "$u"; users+=("$u")
  done
  QUOTA="" imap_admin "$CREATE_PY" "${users[@]}"
  echo "$SELF: users ready: ${users[*]}"
}

cmd_quota() {
  local user kb="${2:?quota KiB or none}"
  user="$(lc "${1:?user}")"
  need_running
  imap_admin '
mb = "user/" + sys.argv[1]
ok(M.setquota(mb, "()" if sys.argv[2] == "none" else "(STORAGE %s)" % sys.argv[2]), "SETQUOTA")
' "$user" "$kb"
}

[ $# -ge 2 ] || usage
action="$1"; shift
DIR_ARG="$1"; shift
if [ "$action" = start ]; then mkdir -p "$DIR_ARG"; fi
[ -d "$DIR_ARG" ] || die "no such directory: $DIR_ARG"
DIR="$(abspath "$DIR_ARG")"

case "$action" in
  start)  cmd_start "$@" ;;
  stop)   cmd_stop ;;
  status) if pid="$(master_pid)"; then echo "running (pid $pid)"; else echo "stopped"; exit 3; fi ;;
  mkuser) cmd_mkuser "$@" ;;
  mkusers) cmd_mkusers "$@" ;;
  quota)  cmd_quota "$@" ;;
  env)    load_env; grep -v '^CY_' "$DIR/backend.env" ;;
  *) usage ;;
esac
