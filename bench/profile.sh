#!/bin/bash
# profile.sh - a flame graph of the gateway under one benchmark shape (issue 15).
#
#   smtp-source --SMTP--> postern (perf record -g) --LMTP--> lmtp_sink.py
#
# usage: bench/profile.sh SHAPE [LABEL [BIN]]      (as root: perf needs it; never in CI)
#   SHAPE   a, b, c or d, the shapes of bench/e2e.sh
#   LABEL   names the output (default "now"): bench/flame/SHAPE-LABEL.svg and .top
#   BIN     the postern binary (default target/release/postern, built first)
# Environment: MSGS (default 5000), FREQ (perf sampling Hz, default 1999).
# Prints the top ten frames by self time (the .top file).
# COUNT=1 counts instead of sampling: heap allocations (uprobes on libc's malloc,
# calloc and realloc), system calls and context switches per message with perf stat,
# then the system calls by name per message with strace -c (written to
# bench/flame/SHAPE-LABEL.counts). perf and inferno
# (cargo install inferno) must be on PATH; perf unwinds with DWARF, so the
# release profile's line tables are enough.
# LATENCY=1 neither samples nor counts (no perf, no root): it prints the gateway's mean end of
# data -> 250 (postern_accept_latency_seconds) beside the mean group-commit fdatasync
# (postern_spool_sync_seconds), the messages per second of the sending and the gateway's
# utime+stime per message over it (deliveries still running after it are not counted: use
# e2e.sh for CPU per message). With shape d: where a single session's time goes. Then the
# same load against Postfix's smtp-sink (no disk, no delivery: every reply at once) gives this
# box's floor for the conversation, in the same invocation: a gateway that syncs once per
# message cannot do better than the floor plus one fdatasync.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
SHAPE=${1:?usage: profile.sh SHAPE [LABEL [BIN]]}
LABEL=${2:-now}
BIN=${3:-}
MSGS=${MSGS:-5000}
FREQ=${FREQ:-1999}
die() { echo "profile.sh: $*" >&2; exit 2; }
if [ "${LATENCY:-0}" = 1 ]; then
    TOOLS="smtp-source"
elif [ "${COUNT:-0}" = 1 ]; then
    TOOLS="perf strace smtp-source"
else
    TOOLS="perf smtp-source inferno-collapse-perf inferno-flamegraph"
fi
[ "${LATENCY:-0}" = 1 ] || [ "$(id -u)" = 0 ] || die "run as root (perf)"
for t in $TOOLS; do
    command -v "$t" >/dev/null || die "$t not found"
done
if [ -z "$BIN" ]; then
    (cd "$REPO" && flock /tmp/cargo.lock cargo build --release -q) || die "build failed"
    BIN=$REPO/target/release/postern
fi
case "$SHAPE" in
a) ARGS="-s 20 -r 1 -l 4096" ;;
b) ARGS="-s 20 -r 5 -l 4096" ;;
c) ARGS="-s 20 -r 1 -l 102400" ;;
d) ARGS="-s 1 -r 1 -l 4096" ;;
*) die "unknown shape $SHAPE" ;;
esac
W=$(mktemp -d /var/tmp/postern-profile.XXXXXX)
OUT=$HERE/flame
mkdir -p "$OUT"
SINK=127.0.0.1:2434 ADDR=127.0.0.1:2537 METRICS=127.0.0.1:9339
cat >"$W/postern.yaml" <<EOF
hostname: bench-postern.invalid
node_id: 1
metrics:
  address: $METRICS
spool:
  path: $W/spool
  min_free: 100MiB
listeners:
  - name: smtp
    address: $ADDR
    protocol: smtp
    trusted_networks: []
stores:
  - name: sink
    kind: lmtp
    address: $SINK
    max_connections: 20
    recipients_per_transaction: 50
routes:
  domains:
    dest.example: { store: sink, authoritative: false }
delivery:
  per_mailbox_serialization: false
EOF
cleanup() {
    [ -n "${GW:-}" ] && kill "$GW" 2>/dev/null
    [ -n "${SK:-}" ] && kill "$SK" 2>/dev/null
    wait 2>/dev/null
    rm -rf "$W"
}
trap cleanup EXIT
python3 "$HERE/lmtp_sink.py" --listen "$SINK" --state-dir "$W" >/dev/null 2>&1 &
SK=$!
POSTERN_LOG=info "$BIN" run --config "$W/postern.yaml" >"$W/postern.log" 2>&1 &
GW=$!
for _ in $(seq 100); do
    [ -f "$W/sink.ready" ] && (exec 3<>/dev/tcp/127.0.0.1/2537) 2>/dev/null && break
    sleep 0.1
done
# Warm up (connections, pools, page cache), then record only the measured load.
smtp-source -N -s 2 -m 200 -f bench@source.example -t rcpt@dest.example $ARGS -c "$ADDR" >/dev/null 2>&1
if [ "${LATENCY:-0}" = 1 ]; then
    metrics() {
        python3 -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen("http://" + sys.argv[1] + "/metrics").read().decode())' "$METRICS"
    }
    # utime + stime of the whole process (every thread), in clock ticks; fields after "(comm) "
    cputicks() { sed 's/^.*) //' "/proc/$GW/stat" | awk '{print $12 + $13}'; }
    metrics >"$W/m0"
    T0=$(date +%s.%N) C0=$(cputicks)
    # shellcheck disable=SC2086
    smtp-source -N -m "$MSGS" -f bench@source.example -t rcpt@dest.example $ARGS "$ADDR" >/dev/null 2>&1
    T1=$(date +%s.%N) C1=$(cputicks)
    sleep 1
    metrics >"$W/m1"
    python3 - "$W/m0" "$W/m1" "$MSGS" "$T0" "$T1" "$C0" "$C1" "$(getconf CLK_TCK)" <<'PY'
import re, sys
def load(path):
    out = {}
    for line in open(path):
        m = re.match(r"(\S+?)(\{.*\})? (\S+)$", line.strip())
        if m and not line.startswith("#"):
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out
before, after = load(sys.argv[1]), load(sys.argv[2])
n = int(sys.argv[3])
secs = float(sys.argv[5]) - float(sys.argv[4])
cpu = (int(sys.argv[7]) - int(sys.argv[6])) / int(sys.argv[8])
def delta(name, part):
    return sum(v - before.get(k, 0) for k, v in after.items() if k.startswith(name + part))
for name in ("postern_accept_latency_seconds", "postern_spool_sync_seconds"):
    count = delta(name, "_count")
    print("%-36s n=%6d mean %.3f ms" % (name, count, 1000 * delta(name, "_sum") / max(count, 1)))
print("msg/s %.0f  per msg %.3f ms  CPU %.3f ms/msg (utime+stime of postern)" % (n / secs, 1000 * secs / n, 1000 * cpu / n))
PY
    command -v smtp-sink >/dev/null || { echo "floor: smtp-sink not found"; exit 0; }
    kill "$GW" 2>/dev/null; wait "$GW" 2>/dev/null; GW=
    FLOOR=127.0.0.1:2538
    AS=(); [ "$(id -u)" = 0 ] && AS=(-u nobody)
    smtp-sink "${AS[@]}" "$FLOOR" 1000 >/dev/null 2>&1 &
    FS=$!
    for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/2538) 2>/dev/null && break; sleep 0.1; done
    # shellcheck disable=SC2086
    smtp-source -N -s 2 -m 200 -f bench@source.example -t rcpt@dest.example $ARGS "$FLOOR" >/dev/null 2>&1
    T0=$(date +%s.%N)
    # shellcheck disable=SC2086
    smtp-source -N -m "$MSGS" -f bench@source.example -t rcpt@dest.example $ARGS "$FLOOR" >/dev/null 2>&1
    RC=$?
    T1=$(date +%s.%N)
    kill "$FS" 2>/dev/null
    [ "$RC" = 0 ] || { echo "floor: smtp-source against smtp-sink on $FLOOR failed (exit $RC)"; exit 1; }
    python3 -c 'import sys; n = int(sys.argv[3]); s = float(sys.argv[2]) - float(sys.argv[1]); print("floor (smtp-sink, same load) msg/s %.0f  per msg %.3f ms" % (n / s, 1000 * s / n))' "$T0" "$T1" "$MSGS"
    exit 0
fi

if [ "${COUNT:-0}" = 1 ]; then
    LIBC=$(awk '$6 ~ /libc\.so/ {print $6; exit}' "/proc/$GW/maps")
    for f in malloc calloc realloc; do
        perf probe -q -d "probe_libc:$f" 2>/dev/null
        perf probe -q -x "$LIBC" --add "$f" 2>/dev/null || die "perf probe $f failed"
    done
    perf stat -x, -e probe_libc:malloc,probe_libc:calloc,probe_libc:realloc \
        -e raw_syscalls:sys_enter,context-switches -p "$GW" -o "$W/stat" &
    PERF=$!
    sleep 0.5
    # shellcheck disable=SC2086
    smtp-source -N -m "$MSGS" -f bench@source.example -t rcpt@dest.example $ARGS "$ADDR" >/dev/null 2>&1
    sleep 1
    kill -INT "$PERF"; wait "$PERF" 2>/dev/null
    for f in malloc calloc realloc; do perf probe -q -d "probe_libc:$f" 2>/dev/null; done
    strace -c -f -q -p "$GW" -o "$W/strace" &
    ST=$!
    sleep 0.5
    # shellcheck disable=SC2086
    smtp-source -N -m "$MSGS" -f bench@source.example -t rcpt@dest.example $ARGS "$ADDR" >/dev/null 2>&1
    sleep 1
    kill -INT "$ST"; wait "$ST" 2>/dev/null
    {
        echo "shape $SHAPE ($LABEL), $MSGS messages, per message:"
        awk -F, -v n="$MSGS" '$3 ~ /[a-z]/ {a[$3]=$1} END {
            printf "  heap allocations %.1f (malloc %.1f, calloc %.1f, realloc %.1f)\n",
                (a["probe_libc:malloc"]+a["probe_libc:calloc"]+a["probe_libc:realloc"])/n,
                a["probe_libc:malloc"]/n, a["probe_libc:calloc"]/n, a["probe_libc:realloc"]/n
            printf "  system calls %.1f, context switches %.1f\n", a["raw_syscalls:sys_enter"]/n, a["context-switches"]/n
        }' "$W/stat"
        echo "  system calls by name (strace -c, a second run of the same load):"
        awk -v n="$MSGS" '$1 ~ /^[0-9.]+$/ && NF >= 5 { name=$NF; calls=$4; if (calls ~ /^[0-9]+$/) printf "    %-16s %6.2f\n", name, calls/n }' "$W/strace" |
            sort -k2 -rn | head -15
    } >"$OUT/$SHAPE-$LABEL.counts"
    cat "$OUT/$SHAPE-$LABEL.counts"
    exit 0
fi
perf record -q -F "$FREQ" -g --call-graph dwarf,16384 -p "$GW" -o "$W/perf.data" 2>/dev/null &
PERF=$!
sleep 0.5
# shellcheck disable=SC2086
smtp-source -N -m "$MSGS" -f bench@source.example -t rcpt@dest.example $ARGS "$ADDR" >/dev/null 2>&1
sleep 1
kill -INT "$PERF"; wait "$PERF" 2>/dev/null
perf script -i "$W/perf.data" 2>/dev/null | inferno-collapse-perf 2>/dev/null >"$W/folded"
# Frames under 2 px are left out: the graph stays a few hundred KiB.
inferno-flamegraph --minwidth 2 --title "postern, shape $SHAPE ($LABEL)" <"$W/folded" >"$OUT/$SHAPE-$LABEL.svg"
perf report -i "$W/perf.data" --no-children --sort symbol --stdio -g none 2>/dev/null |
    grep -v '^#' | grep -v '^$' | grep '%' | head -10 | sed 's/ *-* *-* *$//' >"$OUT/$SHAPE-$LABEL.top"
echo "profile.sh: shape $SHAPE ($LABEL): $OUT/$SHAPE-$LABEL.svg; top frames by self time:"
cat "$OUT/$SHAPE-$LABEL.top"
