# _lib.sh -- helpers shared by cyrus.sh and dovecot.sh (sourced, not run).
# Adapted for postern's test suite from the shared backends kit (shared/backends/, run and
# verified on Debian 12: Cyrus IMAP 3.6.1, Dovecot 2.3.19.1); its tested logic is unchanged.
# Used by tests/common_stores (the Rust harness) and .ci/install-stores.sh.
# shellcheck shell=bash

die() { echo "$SELF: $*" >&2; exit 1; }

# Debian's python3 directly: a pyenv/asdf shim on PATH costs ~0.3 s per call
if [ -z "${PY:-}" ]; then
  if [ -x /usr/bin/python3 ]; then PY=/usr/bin/python3; else PY=python3; fi
fi

abspath() { (cd "$1" && pwd -P); }

# free_port: print a currently unused TCP port on 127.0.0.1
free_port() {
  "$PY" -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1]);s.close()'
}

# port_free PORT: succeed if nothing listens on 127.0.0.1:PORT
port_free() {
  "$PY" - "$1" <<'PY'
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
PY
}

# wait_banner KIND ADDR TIMEOUT
#   KIND lmtp|imap; ADDR a TCP port on 127.0.0.1 or a unix socket path.
#   Succeeds once the server greets with "220 " (LMTP) or "* OK" (IMAP).
wait_banner() {
  "$PY" - "$@" <<'PY'
import socket, sys, time
kind, addr, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
want = b"220 " if kind == "lmtp" else b"* OK"
deadline = time.time() + timeout
last = ""
while time.time() < deadline:
    try:
        if addr.isdigit():
            s = socket.create_connection(("127.0.0.1", int(addr)), timeout=2)
        else:
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(2)
            s.connect(addr)
        line = s.makefile("rb").readline()
        if line.startswith(want):
            s.sendall(b"QUIT\r\n" if kind == "lmtp" else b"a LOGOUT\r\n")
            s.close()
            sys.exit(0)
        last = repr(line)
        s.close()
    except OSError as e:
        last = str(e)
    time.sleep(0.05)
print(f"no {kind} banner on {addr}: {last}", file=sys.stderr)
sys.exit(1)
PY
}

# alive PID: the process exists and is not a zombie (an exited daemon whose
# parent is a lazy init can stay a zombie for seconds)
alive() {
  local st
  st="$(cut -d' ' -f3 "/proc/$1/stat" 2>/dev/null)" || return 1
  [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}

# pid_alive_with PIDFILE NEEDLE: print pid if PIDFILE names a live process
# whose command line contains NEEDLE (guards against pid reuse).
pid_alive_with() {
  local pf="$1" needle="$2" pid
  [ -r "$pf" ] || return 1
  pid="$(tr -dc 0-9 < "$pf")"
  [ -n "$pid" ] && alive "$pid" || return 1
  tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$needle" || return 1
  echo "$pid"
}

# term_and_wait PID: SIGTERM, wait up to 10 s; then SIGKILL and return 1
term_and_wait() {
  local pid="$1" i
  kill -TERM "$pid" 2>/dev/null || return 0
  for i in $(seq 1 400); do
    alive "$pid" || return 0
    sleep 0.025
  done
  echo "$SELF: pid $pid did not exit after TERM, sending KILL" >&2
  kill -KILL "$pid" 2>/dev/null || true
  return 1
}

# pids_with NEEDLE: pids of live (non-zombie) processes whose command line
# (args joined by blanks) contains NEEDLE; never the caller itself
pids_with() {
  "$PY" - "$1" "$$" <<'PY'
import os, sys
needle, me = sys.argv[1], {sys.argv[2], str(os.getpid()), str(os.getppid())}
for p in os.listdir("/proc"):
    if not p.isdigit() or p in me:
        continue
    try:
        with open("/proc/%s/cmdline" % p, "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        with open("/proc/%s/stat" % p) as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        continue
    if needle in cmd and state not in ("Z", "X"):
        print(p)
PY
}

# reap_instance NEEDLE: wait up to 5 s for the processes matching NEEDLE
# (the daemon's children, which its master TERMed) to exit, then SIGKILL
# whatever is left.  NEEDLE always contains this instance's DIR or unique
# instance name, so only our own daemons can match.
reap_instance() {
  local i left
  for i in $(seq 1 50); do
    left="$(pids_with "$1")"
    [ -z "$left" ] && return 0
    sleep 0.1
  done
  echo "$SELF: killing leftover processes: $(echo $left)" >&2
  # shellcheck disable=SC2086
  kill -KILL $left 2>/dev/null || true
}

now() { date +%s.%N; }
elapsed() { "$PY" -c "print(round($2-$1, 2))"; }
