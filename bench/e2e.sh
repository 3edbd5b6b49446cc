#!/bin/bash
# e2e.sh - issue 5's end-to-end benchmark: smtp-source -> gateway -> LMTP sink, postern
# and Postfix measured in ONE run, interleaved rounds, medians and ratios printed.
#
#   smtp-source --SMTP--> postern | Postfix --LMTP--> lmtp_sink.py (counts msgs x rcpts)
#
# usage: bench/e2e.sh [options]            (as root: Postfix needs it; never in CI)
#   -n ROUNDS        interleaved rounds (default 3; medians over them)
#   -m MSGS          messages per run (default 10000)
#   --shapes "a b"   a: 20 sessions, 4 KiB, 1 rcpt; b: as a with 5 rcpts; c: as a with
#                    100 KiB messages; d: 1 session, 4 KiB, 1 rcpt (default "a b c d")
#   --postern BIN    the postern binary (default: target/release/postern, built first)
#   --also LABEL=BIN another postern binary to measure in the same rounds (e.g. main's
#                    build, for a before/after); may be repeated
#   --same-rcpts     every message to the same mailboxes (the shared harness's load;
#                    default: new mailboxes for every message, see "Mailboxes")
#   --serialize on|off  postern's delivery.per_mailbox_serialization (default on,
#                    postern's default)
#   --base DIR       state directory, must lie under /var (default /var/tmp/postern-e2e)
#   --out FILE       JSON lines, one per run (default BASE/e2e-DATE.jsonl)
#   --floor          also measure the box's CPU floor in every round (floor.sh: Postfix's
#                    smtp-sink receiving the load, smtp-source -L delivering it; no disk)
# The harness scripts next to this one (run.sh, lmtp_sink.py, procmon.py,
# postfix-ctl.sh, setup-postfix.sh) are the peer-comparison harness: run.sh starts
# the gateway in its own cgroup v2 and counts the CPU of every process and thread.
#
# Mailboxes. Without -N, smtp-source sends every message to the same recipients
# (1rcpt@, or 1rcpt@..5rcpt@ with -r 5). Postfix has no per-mailbox limit: its 20
# LMTP sessions deliver to one mailbox at once. postern serialises deliveries per
# mailbox by default (delivery.per_mailbox_serialization: one transaction per
# mailbox at a time), which with that load means one delivery at a time for the
# whole benchmark -- a load no real store sees. So by default both gateways get
# smtp-source -N (a new number before every recipient: every message to new
# mailboxes, as at a store with many users) and postern keeps its default
# serialisation. --same-rcpts gives the old load; add --serialize off to compare
# postern without serialisation, the contract Postfix has.
#
# Ports (chosen not to collide with the shared harness defaults): postern
# 127.0.0.1:2537, Postfix 127.0.0.1:2536, sink 127.0.0.1:2434, metrics :9337.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
ROUNDS=3 MSGS=10000 SHAPES="a b c d" BIN= SERIALIZE=true BASE=/var/tmp/postern-e2e OUT=
DISTINCT=--distinct
ALSO=()
FLOOR=0
die() { echo "e2e.sh: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
    case "$1" in
    -n) ROUNDS=$2; shift 2 ;;
    -m) MSGS=$2; shift 2 ;;
    --shapes) SHAPES=$2; shift 2 ;;
    --postern) BIN=$2; shift 2 ;;
    --also) ALSO+=("$2"); shift 2 ;;
    --serialize) case "$2" in on) SERIALIZE=true ;; off) SERIALIZE=false ;;
                 *) die "--serialize on|off" ;; esac; shift 2 ;;
    --same-rcpts) DISTINCT=; shift ;;
    --floor) FLOOR=1; shift ;;
    --base) BASE=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    -h|--help) awk 'NR>1 && !/^#/{exit} NR>1' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1" ;;
    esac
done
[ "$(id -u)" = 0 ] || die "run as root (Postfix's private instance needs it)"
command -v smtp-source >/dev/null || die "smtp-source not found (Debian package postfix)"
if [ -z "$BIN" ]; then
    (cd "$REPO" && flock /tmp/cargo.lock cargo build --release -q) || die "build failed"
    BIN=$REPO/target/release/postern
fi
[ -x "$BIN" ] || die "no binary $BIN"
mkdir -p "$BASE"
BASE=$(cd "$BASE" && pwd)
OUT=${OUT:-$BASE/e2e-$(date +%Y%m%d-%H%M%S).jsonl}
SINK=127.0.0.1:2434 PF_ADDR=127.0.0.1:2536 PT_ADDR=127.0.0.1:2537

# --- Postfix: a private instance, made once ------------------------------------------
PF=$BASE/postfix
if [ ! -f "$PF/etc/main.cf" ]; then
    "$HERE/setup-postfix.sh" "$PF" "$PF_ADDR" "$SINK" >"$BASE/setup-postfix.log" 2>&1 ||
        { cat "$BASE/setup-postfix.log" >&2; die "setup-postfix.sh failed"; }
fi

# --- postern: one config per binary; the spool is wiped at every start -----------------
write_config() {   # write_config NAME -> prints the config path
    local d=$BASE/$1
    mkdir -p "$d"
    cat >"$d/postern.yaml" <<EOF
hostname: bench-postern.invalid
node_id: 1
spool:
  path: $d/spool
  min_free: 100MiB
metrics:
  address: 127.0.0.1:9337
listeners:
  - name: smtp
    address: $PT_ADDR
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
  per_mailbox_serialization: $SERIALIZE
EOF
    "$2" check-config --config "$d/postern.yaml" >&2 || die "$2 refuses $d/postern.yaml"
    echo "$d/postern.yaml"
}
GWS=("postern=$BIN" "${ALSO[@]}")
declare -A CFG
for g in "${GWS[@]}"; do
    CFG[${g%%=*}]=$(write_config "${g%%=*}" "${g#*=}") || exit 2
done

shape_args() {
    case "$1" in
    a) echo "-s 20 -m $MSGS -r 1 -l 4096 $DISTINCT" ;;
    b) echo "-s 20 -m $MSGS -r 5 -l 4096 $DISTINCT" ;;
    c) echo "-s 20 -m $MSGS -r 1 -l 102400 $DISTINCT" ;;
    d) echo "-s 1 -m $MSGS -r 1 -l 4096 $DISTINCT" ;;
    *) die "unknown shape $1" ;;
    esac
}

RCPTS="the same recipients in every message"; [ -n "$DISTINCT" ] && RCPTS="new recipients in every message"
echo "e2e.sh: $ROUNDS rounds, shapes $SHAPES, $MSGS msgs, $RCPTS, per_mailbox_serialization=$SERIALIZE -> $OUT"
fails=0
SYSTEMS=(postfix "${GWS[@]}")
[ "$FLOOR" = 1 ] && SYSTEMS+=(floor)
for i in $(seq 1 "$ROUNDS"); do
    for sh in $SHAPES; do
        args=$(shape_args "$sh")
        for g in "${SYSTEMS[@]}"; do
            name=${g%%=*}
            echo "##### round $i/$ROUNDS shape $sh $name $(date +%T)"
            if [ "$name" = postfix ]; then
                # shellcheck disable=SC2086
                "$HERE/run.sh" --target "$PF_ADDR" --sink "$SINK" \
                    --start "$HERE/postfix-ctl.sh $PF start" --stop "$HERE/postfix-ctl.sh $PF stop" \
                    --queue-cmd "$HERE/postfix-ctl.sh $PF queue" \
                    $args --nice -10 --label "postfix/$sh" --json "$OUT" || fails=$((fails + 1))
            elif [ "$name" = floor ]; then
                # shellcheck disable=SC2086
                "$HERE/floor.sh" --label "floor/$sh" --json "$OUT" -- $args || fails=$((fails + 1))
            else
                bin=${g#*=} cfg=${CFG[$name]}
                # shellcheck disable=SC2086
                POSTERN_LOG=${POSTERN_LOG:-info} "$HERE/run.sh" --target "$PT_ADDR" --sink "$SINK" \
                    --start-fg "sh -c 'rm -rf $(dirname "$cfg")/spool; exec $bin run --config $cfg >$(dirname "$cfg")/postern.log 2>&1'" \
                    $args --nice -10 --label "$name/$sh" --json "$OUT" || fails=$((fails + 1))
            fi
        done
    done
done

# --- summary: medians, and each postern against Postfix ---------------------------------
python3 "$HERE/e2e_summary.py" "$OUT"
echo "e2e.sh: $fails failed runs; raw results in $OUT"
[ "$fails" = 0 ]
