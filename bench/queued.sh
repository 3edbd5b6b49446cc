#!/bin/bash
# queued.sh - a big queue for a dead store (issue 15): the gateway's memory with N
# messages queued, and its restart (recovery and queue load) with a cold page cache.
#
#   smtp-source --SMTP--> postern --LMTP--> 127.0.0.1:1 (refused: every message waits)
#
# usage: bench/queued.sh [-m MSGS] [-l BYTES] [--postern BIN] [--base DIR]
#   -m MSGS         messages to queue (default 100000), 1 recipient each, new mailboxes
#   -l BYTES        message size (default 4096)
#   --postern BIN   the binary (default target/release/postern, built first)
#   --base DIR      state directory (default /var/tmp/postern-queued; the spool is
#                   wiped at the start)
# As root (it drops the page cache with /proc/sys/vm/drop_caches). Prints:
#   queued:    messages in the queue, the time it took, RSS and peak RSS of the gateway
#   listed:    the same after the daemon answered `postern queue list` for all of them
#   restart:   time from exec to the first SMTP banner, the spool's own recovery time
#              and the time until the scheduler had loaded the queue, RSS after it
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
MSGS=100000 SIZE=4096 BIN= BASE=/var/tmp/postern-queued
die() { echo "queued.sh: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
    case "$1" in
    -m) MSGS=$2; shift 2 ;;
    -l) SIZE=$2; shift 2 ;;
    --postern) BIN=$2; shift 2 ;;
    --base) BASE=$2; shift 2 ;;
    -h|--help) awk 'NR>1 && !/^#/{exit} NR>1' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1" ;;
    esac
done
[ "$(id -u)" = 0 ] || die "run as root (drop_caches)"
command -v smtp-source >/dev/null || die "smtp-source not found (Debian package postfix)"
if [ -z "$BIN" ]; then
    (cd "$REPO" && flock /tmp/cargo.lock cargo build --release -q) || die "build failed"
    BIN=$REPO/target/release/postern
fi
ADDR=127.0.0.1:2538
rm -rf "$BASE"; mkdir -p "$BASE"
cat >"$BASE/postern.yaml" <<EOF
hostname: bench-postern.invalid
node_id: 1
spool:
  path: $BASE/spool
  min_free: 100MiB
listeners:
  - name: smtp
    address: $ADDR
    protocol: smtp
    trusted_networks: []
stores:
  - name: dead
    kind: lmtp
    address: 127.0.0.1:1
routes:
  domains:
    dest.example: { store: dead, authoritative: false }
delivery:
  per_mailbox_serialization: false
EOF
"$BIN" check-config --config "$BASE/postern.yaml" >/dev/null || die "config refused"
GW=
cleanup() { [ -n "$GW" ] && kill "$GW" 2>/dev/null; wait 2>/dev/null; }
trap cleanup EXIT
rss() { awk '/^VmRSS/{r=$2} /^VmHWM/{h=$2} END{printf "%.1f MiB (peak %.1f MiB)", r/1024, h/1024}' "/proc/$1/status"; }
banner() {   # waits (30 s at most) for the SMTP banner
    for _ in $(seq 3000); do
        timeout 5 bash -c 'exec 3<>/dev/tcp/127.0.0.1/2538 && head -c 3 <&3' 2>/dev/null | grep -q 220 &&
            return 0
        sleep 0.01
    done
    return 1
}
now() { date +%s.%N; }

"$BIN" run --config "$BASE/postern.yaml" >"$BASE/postern-1.log" 2>&1 &
GW=$!
banner || die "no banner"
t0=$(now)
smtp-source -N -s 20 -m "$MSGS" -l "$SIZE" -f bench@source.example -t rcpt@dest.example "$ADDR" ||
    die "smtp-source failed"
t1=$(now)
sleep 5
held=$(rss "$GW")
# The count comes from the admin socket, whose answer (every message, one JSON document)
# is built in the daemon's memory: its cost is shown apart.
queued=$("$BIN" queue list --json --config "$BASE/postern.yaml" 2>/dev/null | wc -l)
printf 'queued:   %d messages of %d bytes in %.1f s; gateway RSS %s\n' \
    "$queued" "$SIZE" "$(echo "$t1 - $t0" | bc)" "$held"
printf 'listed:   gateway RSS %s after answering postern queue list\n' "$(rss "$GW")"
kill -TERM "$GW"; wait "$GW"; GW=
sync; echo 3 >/proc/sys/vm/drop_caches
t0=$(now)
"$BIN" run --config "$BASE/postern.yaml" >"$BASE/postern-2.log" 2>&1 &
GW=$!
banner || die "no banner after the restart"
t1=$(now)
for _ in $(seq 600); do grep -q 'queue loaded' "$BASE/postern-2.log" && break; sleep 0.05; done
t2=$(now)
rec=$(grep -o 'elapsed_ms=[0-9]*' "$BASE/postern-2.log" | head -1 | cut -d= -f2)
printf 'restart:  banner after %.2f s (cold page cache); spool recovery %s ms; queue loaded after %.2f s; RSS %s\n' \
    "$(echo "$t1 - $t0" | bc)" "$rec" "$(echo "$t2 - $t0" | bc)" "$(rss "$GW")"
sleep 3
printf 'settled:  RSS %s\n' "$(rss "$GW")"
