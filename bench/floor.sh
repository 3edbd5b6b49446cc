#!/bin/bash
# floor.sh - the box's CPU floor for a gateway under one load: what the cheapest possible
# programs spend on the two conversations every gateway has, with no disk, no queue and no
# routing. Run by e2e.sh --floor in the same rounds as Postfix and postern.
#
#   receive:  smtp-source --SMTP--> smtp-sink            (CPU of smtp-sink, per message)
#   deliver:  smtp-source -L -d --LMTP--> smtp-sink -L   (CPU of smtp-source, per message)
#
# smtp-sink and smtp-source are Postfix's C test programs: one process, one event loop,
# every reply at once. The receive half is the shape's own load (smtp-source's arguments as
# given); the deliver half is the same messages sent over 20 kept LMTP connections, as a
# gateway with a connection pool delivers them (smtp-source does not pipeline, so it makes
# more round trips than postern's LMTP client: the deliver half is, if anything, high).
# On loopback the sender also runs the receiver's TCP input, for every program alike.
#
# usage: bench/floor.sh --label TEXT --json FILE -- SMTP_SOURCE_ARGS...
#   (SMTP_SOURCE_ARGS: -s, -m, -r, -l and -N as e2e.sh gives them; -m is required)
# Ports: receive 127.0.0.1:2537 (e2e.sh's postern port, free between runs), deliver
# 127.0.0.1:2435. Writes one JSON line with mta_cpu_ms_per_msg = receive + deliver.
set -uo pipefail
LABEL= JSON=
while [ $# -gt 0 ]; do
    case "$1" in
    --label) LABEL=$2; shift 2 ;;
    --json) JSON=$2; shift 2 ;;
    --) shift; break ;;
    *) echo "floor.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
[ -n "$LABEL" ] && [ -n "$JSON" ] || { echo "floor.sh: --label and --json are required" >&2; exit 2; }
ARGS=("$@")
MSGS= RCPTS=1 SIZE=4096 DISTINCT=
for ((i = 0; i < ${#ARGS[@]}; i++)); do
    case "${ARGS[i]}" in
    -m) MSGS=${ARGS[i + 1]} ;;
    -r) RCPTS=${ARGS[i + 1]} ;;
    -l) SIZE=${ARGS[i + 1]} ;;
    -N|--distinct) DISTINCT=-N ;;
    esac
done
[ -n "$MSGS" ] || { echo "floor.sh: no -m in the load" >&2; exit 2; }
# e2e.sh passes run.sh's --distinct; smtp-source calls it -N.
SRC_ARGS=()
for a in "${ARGS[@]}"; do [ "$a" = --distinct ] && SRC_ARGS+=(-N) || SRC_ARGS+=("$a"); done
RECV=127.0.0.1:2537 DELIV=127.0.0.1:2435
AS=(); [ "$(id -u)" = 0 ] && AS=(-u nobody)

wait_port() {
    for _ in $(seq 50); do (exec 3<>"/dev/tcp/${1%:*}/${1#*:}") 2>/dev/null && return 0; sleep 0.1; done
    return 1
}
cpu_ns() { awk '{print $1}' "/proc/$1/schedstat"; }   # time on a CPU of a one-thread process

# --- receive: the shape's load against smtp-sink -----------------------------------------
nice -n -10 smtp-sink "${AS[@]}" "$RECV" 1000 >/dev/null 2>&1 &
SINK=$!
wait_port "$RECV" || { kill "$SINK" 2>/dev/null; echo "floor.sh: smtp-sink did not listen on $RECV" >&2; exit 1; }
t0=$(cpu_ns "$SINK") w0=$(date +%s.%N)
nice -n -10 smtp-source -f bench@source.example -t rcpt@dest.example "${SRC_ARGS[@]}" "$RECV" >/dev/null 2>&1
rc1=$?
w1=$(date +%s.%N) t1=$(cpu_ns "$SINK")
kill "$SINK" 2>/dev/null; wait "$SINK" 2>/dev/null

# --- deliver: the same messages over 20 kept LMTP connections ----------------------------
nice -n -10 smtp-sink -L "${AS[@]}" "$DELIV" 1000 >/dev/null 2>&1 &
SINK=$!
wait_port "$DELIV" || { kill "$SINK" 2>/dev/null; echo "floor.sh: smtp-sink -L did not listen on $DELIV" >&2; exit 1; }
TIMES=$(mktemp)
w2=$(date +%s.%N)
# shellcheck disable=SC2086
( TIMEFORMAT='%U %S'; { time nice -n -10 smtp-source -L -d -s 20 -m "$MSGS" -r "$RCPTS" -l "$SIZE" $DISTINCT \
    -f bench@source.example -t rcpt@dest.example "$DELIV" >/dev/null 2>&1; } 2>"$TIMES" )
rc2=$?
w3=$(date +%s.%N)
kill "$SINK" 2>/dev/null; wait "$SINK" 2>/dev/null
read -r du ds <"$TIMES"; rm -f "$TIMES"

python3 - "$LABEL" "$JSON" "$MSGS" "$RCPTS" "$SIZE" "$t0" "$t1" "$w0" "$w1" "$w2" "$w3" \
    "${du:-0}" "${ds:-0}" "$rc1" "$rc2" <<'EOF'
import json, sys, time
label, out = sys.argv[1], sys.argv[2]
msgs, rcpts, size = (int(x) for x in sys.argv[3:6])
t0, t1, w0, w1, w2, w3, du, ds = (float(x) for x in sys.argv[6:14])
rc1, rc2 = int(sys.argv[14]), int(sys.argv[15])
receive = (t1 - t0) / 1e6 / msgs
deliver = 1000 * (du + ds) / msgs
r = {"label": label, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "messages": msgs,
     "rcpts_per_msg": rcpts, "size": size, "complete": rc1 == 0 and rc2 == 0,
     "source_rc": rc1, "deliver_rc": rc2,
     "accept_s": round(w1 - w0, 3), "accept_rate": round(msgs / (w1 - w0), 1),
     "e2e_rate": round(msgs / (w1 - w0), 1), "e2e_deliv_rate": round(msgs * rcpts / (w3 - w2), 1),
     "receive_cpu_ms_per_msg": round(receive, 4), "deliver_cpu_ms_per_msg": round(deliver, 4),
     "mta_cpu_ms_per_msg": round(receive + deliver, 4), "disk_flushes": 0}
with open(out, "a") as f:
    f.write(json.dumps(r) + "\n")
print("floor %s: receive (smtp-sink) %.3f ms/msg, deliver (smtp-source -L -d) %.3f ms/msg, sum %.3f"
      % (label, receive, deliver, receive + deliver))
sys.exit(0 if r["complete"] else 1)
EOF
