#!/usr/bin/env bash
# dovecot.sh -- run a private, throw-away Dovecot 2.3 instance under DIR.
#
#   dovecot.sh start  DIR [LMTP_PORT] [IMAP_PORT]  (port omitted or 0 = pick a free one)
#   dovecot.sh stop   DIR
#   dovecot.sh status DIR
#   dovecot.sh mkuser DIR USER [PASSWORD] [QUOTA_KB]  (password default: USER;
#                                                      QUOTA_KB: storage quota in KiB)
#   dovecot.sh mkusers DIR USER...                     (password = user name, no quota)
#   dovecot.sh quota  DIR USER QUOTA_KB|none
#   dovecot.sh env    DIR
#
# Everything lives under DIR: etc/ (dovecot.conf, users = passwd-file
# passdb+userdb), run/ (base_dir: master.pid, internal sockets), state/,
# log/dovecot.log, mail/USER/Maildir, backend.env and the LMTP unix socket
# DIR/lmtp.sock.  Only 127.0.0.1 is listened on.  mkuser works before or
# after start (the passwd-file is re-read on change).
#
# User names: the domain is stripped and the local part lower-cased
# (auth_username_format=%Ln), and "+detail" is dropped (recipient_delimiter),
# so RCPT TO:<Alice+x@any.domain> is user "alice" -- same as the Cyrus setup.
#
# Env knobs (read at "start"):
#   DOVECOT_ANYUSER=1          accept every recipient (static userdb, mail
#                              under DIR/mail/<user>; IMAP password = user
#                              name); default: only users added by mkuser.
#   DOVECOT_RCPT_CHECK_QUOTA=1 check quota at RCPT TO (lmtp_rcpt_check_quota)
#                              instead of only after DATA.
#   DOVECOT_QUOTA_TEMPFAIL=1   over quota = 452 4.2.2 instead of 552 5.2.2.
#   DOVECOT_LMTP_PROCESS_LIMIT=N  at most N lmtp processes (one session each:
#                              client_limit 1); beyond that the master closes
#                              new connections before any greeting ("process_limit
#                              (N) reached, client connections are being
#                              dropped").  Default: Dovecot's (100).
#   DOVECOT_START_TIMEOUT      seconds to wait for the banners (default 30)
#
# Privileges: started by root, the master stays root, login processes run as
# dovenull, internal ones as dovecot, and mail is read/written as the system
# user "mail" (uid 8).  DIR gets mode 0755; every parent directory of DIR
# must be searchable by others.  Started by a non-root user, everything runs
# as that user.
#
# Adapted for postern's test suite from the shared backends kit (shared/backends/, run and
# verified on Debian 12: Cyrus IMAP 3.6.1, Dovecot 2.3.19.1); its tested logic is unchanged.
# Used by tests/common_stores (the Rust harness) and .ci/install-stores.sh.
set -euo pipefail

SELF="$(basename "$0")"
HERE="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=_lib.sh
. "$HERE/_lib.sh"
usage() { sed -n '2,11p' "$0" >&2; exit 2; }

DOVECOT=/usr/sbin/dovecot

load_env() {
  [ -r "$DIR/backend.env" ] || die "$DIR/backend.env missing (instance never started?)"
  # shellcheck disable=SC1091
  . "$DIR/backend.env"
}

master_pid() { pid_alive_with "$DIR/run/master.pid" "$DIR/etc/dovecot.conf"; }

cmd_start() {
  local lmtp_port="${1:-0}" imap_port="${2:-0}"
  [ "$lmtp_port" = 0 ] && lmtp_port="$(free_port)"
  [ "$imap_port" = 0 ] && imap_port="$(free_port)"
  [ "$lmtp_port" != "$imap_port" ] || die "LMTP and IMAP port must differ"
  [ -x "$DOVECOT" ] && [ -x /usr/lib/dovecot/lmtp ] && [ -x /usr/lib/dovecot/imap ] \
    || die "dovecot-core/-lmtpd/-imapd missing (run install.sh)"

  if pid="$(master_pid)"; then die "already running (pid $pid) in $DIR"; fi
  port_free "$lmtp_port" || die "127.0.0.1:$lmtp_port is already in use"
  port_free "$imap_port" || die "127.0.0.1:$imap_port is already in use"

  local sock="$DIR/lmtp.sock"
  # unique per DIR; it prefixes every child's process title ("NAME/lmtp")
  local instance; instance="dovecot-test-$(printf '%s' "$DIR" | cksum | cut -d' ' -f1)"
  # sun_path is limited to 107 bytes; dovecot's own sockets live in DIR/run/...
  [ "${#DIR}" -lt 70 ] || die "DIR path too long for unix sockets (${#DIR} > 69 bytes): $DIR"

  mkdir -p "$DIR"/{etc,run,state,log,mail}
  [ -e "$DIR/etc/users" ] || : > "$DIR/etc/users"
  rm -f "$sock"

  local mail_user mail_group internal_user internal_group login_user chroot_line first_uid
  if [ "$(id -u)" = 0 ]; then
    mail_user=mail; mail_group=mail
    internal_user=dovecot; internal_group=dovecot; login_user=dovenull
    chroot_line=""                     # keep dovecot's default login chroot
    first_uid="$(id -u mail)"
    chmod 0755 "$DIR"
    chown "$mail_user:$mail_group" "$DIR/mail"
    chmod 0644 "$DIR/etc/users"        # read by the auth process (user dovecot)
    local u
    for u in "$mail_user" "$internal_user" "$login_user"; do
      setpriv --reuid="$u" --regid="$(id -g "$u")" --clear-groups test -x "$DIR" \
        || die "user $u cannot reach $DIR (is every parent directory searchable by others?)"
    done
  else
    mail_user="$(id -un)"; mail_group="$(id -gn)"
    internal_user="$mail_user"; internal_group="$mail_group"; login_user="$mail_user"
    chroot_line="chroot ="             # chroot needs root
    first_uid="$(id -u)"
  fi

  local lmtp_limit=""
  if [ -n "${DOVECOT_LMTP_PROCESS_LIMIT:-}" ]; then
    lmtp_limit="process_limit = $DOVECOT_LMTP_PROCESS_LIMIT"
  fi

  local userdb
  if [ "${DOVECOT_ANYUSER:-0}" = 1 ]; then
    userdb="passdb {
  driver = passwd-file
  args = scheme=PLAIN $DIR/etc/users
  result_failure = continue
  result_internalfail = continue
}
passdb {
  driver = static
  args = password=%n
}
userdb {
  driver = passwd-file
  args = $DIR/etc/users
  default_fields = uid=$mail_user gid=$mail_group home=$DIR/mail/%n
  result_failure = continue
}
userdb {
  driver = static
  args = uid=$mail_user gid=$mail_group home=$DIR/mail/%n allow_all_users=yes
}"
  else
    userdb="passdb {
  driver = passwd-file
  args = scheme=PLAIN $DIR/etc/users
}
userdb {
  driver = passwd-file
  args = $DIR/etc/users
  default_fields = uid=$mail_user gid=$mail_group home=$DIR/mail/%n
}"
  fi

  cat > "$DIR/etc/dovecot.conf" <<EOF
# generated by dovecot.sh -- private test instance
base_dir = $DIR/run
state_dir = $DIR/state
instance_name = $instance
log_path = $DIR/log/dovecot.log
info_log_path = $DIR/log/dovecot.log
debug_log_path = $DIR/log/dovecot.log
protocols = imap lmtp
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_username_format = %Ln
auth_cache_size = 0
hostname = localhost
postmaster_address = postmaster@localhost
default_internal_user = $internal_user
default_internal_group = $internal_group
default_login_user = $login_user
mail_uid = $mail_user
mail_gid = $mail_group
first_valid_uid = $first_uid
first_valid_gid = 0
mail_location = maildir:~/Maildir
mail_plugins = \$mail_plugins quota
recipient_delimiter = +
lmtp_save_to_detail_mailbox = no
lmtp_rcpt_check_quota = $([ "${DOVECOT_RCPT_CHECK_QUOTA:-0}" = 1 ] && echo yes || echo no)
quota_full_tempfail = $([ "${DOVECOT_QUOTA_TEMPFAIL:-0}" = 1 ] && echo yes || echo no)
namespace inbox {
  inbox = yes
  separator = /
}
$userdb
plugin {
  quota = maildir:User quota
  quota_rule = *:storage=0
}
protocol imap {
  mail_plugins = \$mail_plugins imap_quota
}
service imap-login {
  $chroot_line
  inet_listener imap {
    address = 127.0.0.1
    port = $imap_port
  }
  inet_listener imaps {
    port = 0
  }
}
service lmtp {
  $lmtp_limit
  inet_listener lmtp {
    address = 127.0.0.1
    port = $lmtp_port
  }
  unix_listener $sock {
    mode = 0666
  }
}
service imap-urlauth-login {
  $chroot_line
}
service anvil {
  $chroot_line
}
EOF

  cat > "$DIR/backend.env" <<EOF
BACKEND=dovecot
LMTP_HOST=127.0.0.1
LMTP_PORT=$lmtp_port
LMTP_SOCKET=$sock
LMTP_TCP_AUTH=0
IMAP_HOST=127.0.0.1
IMAP_PORT=$imap_port
MAIL_OWNER=$mail_user
INSTANCE=$instance
LOG_FILE=$DIR/log/dovecot.log
EOF

  doveconf -c "$DIR/etc/dovecot.conf" -n >/dev/null || die "doveconf rejected $DIR/etc/dovecot.conf"

  local t0; t0="$(now)"
  "$DOVECOT" -c "$DIR/etc/dovecot.conf"

  local to="${DOVECOT_START_TIMEOUT:-30}"
  if ! wait_banner lmtp "$lmtp_port" "$to" || ! wait_banner imap "$imap_port" "$to" \
     || ! wait_banner lmtp "$sock" "$to"; then
    echo "$SELF: start failed; $DIR/log/dovecot.log:" >&2
    tail -20 "$DIR/log/dovecot.log" >&2 || true
    cmd_stop >/dev/null 2>&1 || true
    exit 1
  fi
  echo "STARTUP_SECONDS=$(elapsed "$t0" "$(now)")" >> "$DIR/backend.env"
  cat "$DIR/backend.env"
}

cmd_stop() {
  local pid
  if ! pid="$(master_pid)"; then
    echo "$SELF: not running in $DIR"
    return 0
  fi
  # the master stops all its children on TERM; make sure they are gone too
  # (their process titles start with "INSTANCE/") so the ports are free
  term_and_wait "$pid" || true
  load_env
  reap_instance "$INSTANCE/"
  rm -f "$DIR/lmtp.sock"
  echo "$SELF: stopped (pid $pid)"
}

# set_users USER PASSWORD QUOTA_KB [USER PASSWORD QUOTA_KB ...]
#   (QUOTA_KB empty or "none" = unlimited)
# Dovecot's passwd-file driver re-stat()s the file at most once per second
# and reloads it only if its size or mtime (whole seconds) changed.  So the
# new file always gets an mtime different from the old one, and if the
# instance is running we wait (typically 0.1-1 s) until the auth process
# reports every new entry.  Before "start" this is instant.
set_users() {
  local f="$DIR/etc/users" tmp="$DIR/etc/users.tmp.$$" old_mtime new_mtime
  local -a names=() rules=()
  [ -e "$f" ] || : > "$f"        # (no touch: that would reset the mtime)
  old_mtime="$(stat -c %Y "$f")"
  cp "$f" "$tmp"
  while [ $# -ge 3 ]; do
    local user="$1" pw="$2" quota="$3" rule="" extra=""; shift 3
    case "$user$pw" in *:*|*$'\n'*|*' '*) die "user/password must not contain ':', blanks or newlines" ;; esac
    if [ -n "$quota" ] && [ "$quota" != none ]; then
      rule="*:storage=${quota}K"; extra="userdb_quota_rule=$rule"
    fi
    awk -F: -v u="$user" '$1 != u' "$tmp" > "$tmp.2"
    echo "${user}:{PLAIN}${pw}::::::${extra}" >> "$tmp.2"
    mv -f "$tmp.2" "$tmp"
    names+=("$user"); rules+=("$rule")
  done
  chmod 0644 "$tmp"
  new_mtime="$(date +%s)"
  [ "$new_mtime" -gt "$old_mtime" ] || new_mtime=$((old_mtime + 1))
  touch -d "@$new_mtime" "$tmp"
  mv -f "$tmp" "$f"
  master_pid >/dev/null || return 0
  local i j=0 got
  for i in $(seq 1 100); do
    while [ "$j" -lt "${#names[@]}" ] \
      && got="$(doveadm -c "$DIR/etc/dovecot.conf" user -f quota_rule "${names[$j]}" 2>/dev/null)" \
      && [ "$got" = "${rules[$j]}" ]; do
      j=$((j + 1))
    done
    [ "$j" -lt "${#names[@]}" ] || return 0
    sleep 0.05
  done
  # (a "kill -HUP" of the master would force a re-read, but a reload aborts
  #  sessions in flight, so it is not done behind the caller's back)
  die "dovecot did not pick up the passwd-file change for ${names[$j]} within ~5 s"
}

lc() { printf '%s' "$1" | tr '[:upper:]' '[:lower:]'; }

cmd_mkuser() {
  local user pw quota="${3:-}"
  user="$(lc "${1:?user}")"
  pw="${2:-$user}"
  set_users "$user" "$pw" "$quota"
  echo "$SELF: user $user ready${quota:+ (quota ${quota}KiB)}"
}

cmd_mkusers() {
  local -a args=()
  local u
  for u in "$@"; do args+=("$(lc "$u")" "$(lc "$u")" ""); done
  [ ${#args[@]} -gt 0 ] || die "mkusers: no users given"
  set_users "${args[@]}"
  echo "$SELF: users ready: $*"
}

cmd_quota() {
  local user kb="${2:?quota KiB or none}" line pw
  user="$(lc "${1:?user}")"
  line="$(awk -F: -v u="$user" '$1 == u' "$DIR/etc/users" 2>/dev/null)"
  [ -n "$line" ] || die "no such user: $user"
  pw="$(printf '%s' "$line" | cut -d: -f2)"; pw="${pw#\{PLAIN\}}"
  set_users "$user" "$pw" "$kb"
}

[ $# -ge 2 ] || usage
action="$1"; shift
DIR_ARG="$1"; shift
case "$action" in start|mkuser|mkusers) mkdir -p "$DIR_ARG" ;; esac
[ -d "$DIR_ARG" ] || die "no such directory: $DIR_ARG"
DIR="$(abspath "$DIR_ARG")"

case "$action" in
  start)  cmd_start "$@" ;;
  stop)   cmd_stop ;;
  status) if pid="$(master_pid)"; then echo "running (pid $pid)"; else echo "stopped"; exit 3; fi ;;
  mkuser) mkdir -p "$DIR/etc"; cmd_mkuser "$@" ;;
  mkusers) mkdir -p "$DIR/etc"; cmd_mkusers "$@" ;;
  quota)  cmd_quota "$@" ;;
  env)    load_env; cat "$DIR/backend.env" ;;
  *) usage ;;
esac
