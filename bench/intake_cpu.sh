#!/bin/bash
# intake_cpu.sh - the gateway's CPU per message with delivery on and off, so that a shape's
# cost splits into intake (SMTP session, spool, commit) and delivery (scheduler, LMTP, ledger).
#
# usage: intake_cpu.sh BINARY MESSAGES [SESSIONS [ROUNDS]]
#   smtp-source -s SESSIONS (1: shape d) -l 4096 -N, one message per connection, to a postern
#   on 127.0.0.1:2538 whose store is bench/lmtp_sink.py on 127.0.0.1:2435; each round runs
#   with `delivery.enabled: true` then `false`. Prints msg/s (smtp-source's wall time) and
#   the gateway's user+system CPU (/proc/PID/stat) per message. Loopback only; stops what it
#   started.
set -eu
BIN=$1 N=$2 S=${3:-1} R=${4:-3}
HERE=$(cd "$(dirname "$0")" && pwd)
W=$(mktemp -d /tmp/intake-cpu.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
one() {
    local del=$1 d=$W/$1-$2
    mkdir -p "$d/sink"
    cat > "$d/postern.yaml" <<Y
hostname: bench-postern.invalid
node_id: 1
spool: { path: $d/spool, min_free: 100MiB }
metrics: { address: 127.0.0.1:9338 }
listeners:
  - { name: smtp, address: 127.0.0.1:2538, protocol: smtp, trusted_networks: [] }
stores:
  - { name: sink, kind: lmtp, address: 127.0.0.1:2435, max_connections: 20 }
routes:
  domains:
    dest.example: { store: sink, authoritative: false }
delivery:
  enabled: $del
  per_mailbox_serialization: false
Y
    python3 "$HERE/lmtp_sink.py" --listen 127.0.0.1:2435 --state-dir "$d/sink" > /dev/null 2>&1 &
    local sink=$!
    POSTERN_LOG=info "$BIN" run --config "$d/postern.yaml" > "$d/postern.log" 2>&1 &
    local gw=$!
    PIDS=("$sink" "$gw")
    for _ in $(seq 50); do (echo > /dev/tcp/127.0.0.1/2538) 2>/dev/null && break; sleep 0.1; done
    local a t0 t1 b
    a=$(cpu "$gw"); t0=$(date +%s.%N)
    smtp-source -s "$S" -l 4096 -m "$N" -N -f from@src.example -t to@dest.example 127.0.0.1:2538
    t1=$(date +%s.%N); sleep 1; b=$(cpu "$gw")
    kill "$gw" "$sink"; wait "$gw" "$sink" 2>/dev/null || true
    python3 -c "import os; tk = os.sysconf('SC_CLK_TCK'); print('delivery %-5s  %6.0f msg/s  %.3f ms CPU/msg' % ('$del', $N / ($t1 - $t0), ($b - $a) * 1000 / tk / $N))"
}
for i in $(seq "$R"); do one true "$i"; one false "$i"; done
