#!/usr/bin/env bash
# The Debian package, end to end: build it with cargo-deb, install it with dpkg, check what
# it installed (owners, modes, conffile, the postern user, the unit), run the installed
# binary as the postern user with the unit's only capability, then purge it.
#
# Needs root and dpkg (Debian). Never starts a systemd service (CI has no init; .ci/run puts
# a policy-rc.d in place, and the package neither enables nor starts the unit anyway).
# Leaves the machine as it found it: the package purged, the postern user and group and
# the test's spool removed (a real purge keeps the user and a used spool).
#
#   bash .ci/package-test.sh            # from the checkout, as root: `cargo deb` (release)
#   POSTERN_PACKAGE_BINARY=target/debug/postern bash .ci/package-test.sh   # package that binary
set -euo pipefail
cd "$(dirname "$0")/.."

fail() { echo "package test: FAILED: $*" >&2; exit 1; }
note() { printf 'package test: %s\n' "$*"; }
# owner:group mode of a path, as stat prints them.
perms() { stat -c '%U:%G %a' "$1"; }
expect_perms() {
    local got
    got=$(perms "$1") || fail "$1 is missing"
    [ "$got" = "$2" ] || fail "$1 is $got, want $2"
    note "$1 $got"
}

[ "$(id -u)" = 0 ] || fail "run as root (dpkg -i)"
command -v dpkg >/dev/null || fail "dpkg is missing (Debian only)"
if dpkg -s postern >/dev/null 2>&1; then
    fail "a postern package is already installed; purge it first (dpkg --purge postern)"
fi
if getent passwd postern >/dev/null; then
    fail "a postern user already exists; this test creates and removes its own"
fi
if [ -e /var/spool/postern ]; then
    fail "/var/spool/postern already exists; this test creates and removes its own"
fi

cleanup() {
    if [ -n "${pid:-}" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
    dpkg --purge postern >/dev/null 2>&1 || true
    rm -rf /var/spool/postern
    if getent passwd postern >/dev/null; then userdel postern || true; fi
    if getent group postern >/dev/null; then groupdel postern || true; fi
    if [ -n "${work:-}" ]; then rm -rf "$work"; fi
}
trap cleanup EXIT
work=$(mktemp -d)

# --- build ---
if ! command -v cargo-deb >/dev/null 2>&1; then
    note "installing cargo-deb"
    cargo install cargo-deb --locked --quiet
fi
start=$SECONDS
if [ -n "${POSTERN_PACKAGE_BINARY:-}" ]; then
    # Package a binary built already (CI: the test suite's debug build) instead of a
    # release build of a few minutes: the package, its scripts, unit and config are the
    # same; only the binary's optimisation differs. cargo-deb reads target/release/ from
    # CARGO_TARGET_DIR: a scratch one holding the copy, so the real target/ is untouched.
    [ -x "$POSTERN_PACKAGE_BINARY" ] || fail "POSTERN_PACKAGE_BINARY=$POSTERN_PACKAGE_BINARY is not a binary"
    mkdir -p "$work/target/release"
    cp "$POSTERN_PACKAGE_BINARY" "$work/target/release/postern"
    deb=$(CARGO_TARGET_DIR="$work/target" cargo deb --no-build --fast --output "$work" 2>"$work/build.log" | tail -n 1) \
        || { tail -n 40 "$work/build.log"; fail "cargo deb --no-build"; }
    note "packaging $POSTERN_PACKAGE_BINARY (not a release build)"
else
    deb=$(cargo deb --fast 2>"$work/build.log" | tail -n 1) || { tail -n 40 "$work/build.log"; fail "cargo deb"; }
fi
[ -f "$deb" ] || { tail -n 40 "$work/build.log"; fail "cargo deb made no package (got '$deb')"; }
note "built $deb in $((SECONDS - start))s"

# --- install ---
dpkg -i "$deb" >"$work/dpkg.log" 2>&1 || { cat "$work/dpkg.log"; fail "dpkg -i"; }
[ "$(dpkg-query -W -f='${Status}' postern)" = "install ok installed" ] || fail "not installed"
note "installed $(dpkg-query -W -f='${Package} ${Version}' postern)"

# --- what it installed ---
unit=$(dpkg -L postern | grep '/systemd/system/postern.service$') || fail "no unit in the package"
expect_perms /usr/bin/postern "root:root 755"
expect_perms /etc/postern/postern.yaml "root:root 644"
expect_perms /var/spool/postern "postern:postern 750"
expect_perms "$unit" "root:root 644"
dpkg-query -W -f='${Conffiles}\n' postern | grep -q '^ /etc/postern/postern.yaml ' \
    || fail "/etc/postern/postern.yaml is not a conffile"
note "/etc/postern/postern.yaml is a conffile"
cmp -s /etc/postern/postern.yaml config/server.yaml || fail "/etc/postern/postern.yaml is not config/server.yaml"
[ -f /usr/share/doc/postern/README.md ] || fail "no README in /usr/share/doc/postern"

IFS=: read -r _ _ uid gid _ home shell < <(getent passwd postern) || fail "no postern user"
[ "$uid" -lt 1000 ] || fail "postern is not a system user (uid $uid)"
[ "$(getent group postern | cut -d: -f3)" = "$gid" ] || fail "postern's primary group is not postern"
[ "$shell" = /usr/sbin/nologin ] || fail "postern's shell is $shell"
[ "$home" = /var/spool/postern ] || fail "postern's home is $home"
note "user postern: uid $uid, group postern ($gid), home $home, shell $shell"

# --- the installed config and unit ---
out=$(/usr/bin/postern check-config --config /etc/postern/postern.yaml 2>&1) || fail "check-config: $out"
note "$out"
# The daemon's user can read it too.
runuser -u postern -- /usr/bin/postern check-config --config /etc/postern/postern.yaml >/dev/null 2>&1 \
    || fail "check-config as the postern user"
if command -v systemd-analyze >/dev/null 2>&1; then
    # Installed, ExecStart names a real binary: verify the unit as it is, no substitution.
    complaints=$(systemd-analyze verify --man=no --recursive-errors=no "$unit" 2>&1) || true
    [ -z "$complaints" ] || fail "systemd-analyze verify $unit: $complaints"
    note "systemd-analyze verify $unit: clean"
elif [ -n "${POSTERN_REQUIRE_CLIENTS:-}" ]; then
    fail "systemd-analyze is missing"
fi

# --- the installed binary as the unit runs it: user postern, CAP_NET_BIND_SERVICE only ---
# The package's config with the port-25 listener moved to a free privileged loopback port
# and the metrics on an ephemeral one; the real spool and admin socket.
port=$(python3 -c 'import socket
for p in range(1000, 1023):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p)); print(p); break
    except OSError: pass
    finally: s.close()')
[ -n "$port" ] || fail "no free port below 1024 on 127.0.0.1"
sed -e "s/address: 0.0.0.0:25/address: 127.0.0.1:$port/" \
    -e "s/address: 127.0.0.1:9325/address: 127.0.0.1:0/" \
    /etc/postern/postern.yaml >"$work/postern.yaml"
chmod 644 "$work/postern.yaml"
chmod 755 "$work"
as_postern=(setpriv --reuid=postern --regid=postern --init-groups)
umask 027   # UMask=0027, as in the unit
unprivileged_start=$(cat /proc/sys/net/ipv4/ip_unprivileged_port_start 2>/dev/null || echo 1024)
if [ "$unprivileged_start" -gt "$port" ]; then
    # Without the capability the privileged port is refused: the unit's
    # AmbientCapabilities= is what makes it work.
    if "${as_postern[@]}" /usr/bin/postern run --config "$work/postern.yaml" >"$work/nocap.log" 2>&1; then
        fail "postern bound port $port without CAP_NET_BIND_SERVICE"
    fi
    grep -q "Permission denied" "$work/nocap.log" || { cat "$work/nocap.log"; fail "expected EACCES on port $port"; }
    note "without CAP_NET_BIND_SERVICE: port $port refused"
fi
"${as_postern[@]}" --inh-caps=+net_bind_service --ambient-caps=+net_bind_service \
    --bounding-set=-all,+net_bind_service \
    /usr/bin/postern run --config "$work/postern.yaml" >"$work/run.log" 2>&1 &
pid=$!
for _ in $(seq 100); do
    grep -q '"listening"\|listening' "$work/run.log" && break
    kill -0 "$pid" 2>/dev/null || { cat "$work/run.log"; fail "postern exited"; }
    sleep 0.1
done
grep -q "listening" "$work/run.log" || { cat "$work/run.log"; fail "postern did not listen on $port"; }
banner=$(python3 -c "import socket; s = socket.create_connection(('127.0.0.1', $port), 10); print(s.recv(512).decode().strip())")
case "$banner" in 220*) note "port $port as postern: $banner" ;; *) fail "banner: $banner" ;; esac
# root's queue tool talks to the postern-owned admin socket.
queue=$(/usr/bin/postern queue --config "$work/postern.yaml" list 2>&1) || fail "postern queue list: $queue"
note "postern queue list: $(echo "$queue" | tail -n 1)"
expect_perms /var/spool/postern/admin.sock "postern:postern 600"
bad=$(find /var/spool/postern -mindepth 1 \( ! -user postern -o -perm /o=rwx \) -printf '%p %u %m\n')
[ -z "$bad" ] || fail "spool files not postern's or open to others: $bad"
note "spool files: postern's, nothing for others"
kill -TERM "$pid"
wait "$pid" || fail "postern exited $? after SIGTERM"
pid=

# --- purge ---
dpkg --purge postern >"$work/purge.log" 2>&1 || { cat "$work/purge.log"; fail "dpkg --purge"; }
for gone in /usr/bin/postern /etc/postern/postern.yaml "$unit"; do
    [ ! -e "$gone" ] || fail "$gone is still there after purge"
done
[ -d /var/spool/postern ] || fail "purge removed a used spool"
grep -q "not empty" "$work/purge.log" || fail "purge did not say why it kept the spool"
note "purged: binary, config and unit gone; the used spool kept, as it says"

echo "package test: ok, every check passed"
