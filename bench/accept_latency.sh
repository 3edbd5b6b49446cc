#!/bin/bash
# accept_latency.sh - where a single session's time per message goes (issue 15, shape d):
# smtp-source -s SESS (default 1) sends MSGS 4 KiB messages to one postern that delivers to
# lmtp_sink.py; printed: the gateway's mean end-of-data -> 250 (postern_accept_latency_seconds)
# beside the mean group-commit fdatasync (postern_spool_sync_seconds), the messages per second
# of the sending, and the gateway's utime+stime per message over the sending (deliveries
# still running after it are not counted: use e2e.sh for CPU per message).
#
# usage: bench/accept_latency.sh BIN [MSGS [SESS]]   (ports as e2e.sh: 2537, sink 2434, metrics 9339)
set -uo pipefail
BIN=${1:?usage: accept_latency.sh BIN [MSGS [SESS]]}; MSGS=${2:-3000}; S=${3:-1}
HERE=$(cd "$(dirname "$0")" && pwd)
W=$(mktemp -d /var/tmp/accept-latency.XXXXXX)
SINK=127.0.0.1:2434 ADDR=127.0.0.1:2537
cat >"$W/postern.yaml" <<EOC
hostname: bench-postern.invalid
node_id: 1
metrics:
  address: 127.0.0.1:9339
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
routes:
  domains:
    dest.example: { store: sink, authoritative: false }
delivery:
  per_mailbox_serialization: false
EOC
metrics() {
    python3 -c 'import urllib.request, sys; sys.stdout.write(urllib.request.urlopen("http://127.0.0.1:9339/metrics").read().decode())'
}
cleanup() {
    [ -n "${GW:-}" ] && kill "$GW" 2>/dev/null
    [ -n "${SK:-}" ] && kill "$SK" 2>/dev/null
    wait 2>/dev/null
    rm -rf "$W"
}
trap cleanup EXIT
# utime + stime of the whole process (every thread), in clock ticks; fields after "(comm) "
cputicks() { sed 's/^.*) //' "/proc/$GW/stat" | awk '{print $12 + $13}'; }
python3 "$HERE/lmtp_sink.py" --listen "$SINK" --state-dir "$W" >/dev/null 2>&1 &
SK=$!
POSTERN_LOG=info "$BIN" run --config "$W/postern.yaml" >"$W/postern.log" 2>&1 &
GW=$!
for _ in $(seq 100); do
    [ -f "$W/sink.ready" ] && (exec 3<>/dev/tcp/127.0.0.1/2537) 2>/dev/null && break
    sleep 0.1
done
smtp-source -N -s 1 -m 200 -f bench@source.example -t rcpt@dest.example -l 4096 -c "$ADDR" >/dev/null 2>&1
metrics >"$W/m0"
T0=$(date +%s.%N); C0=$(cputicks)
smtp-source -N -s "$S" -m "$MSGS" -f bench@source.example -t rcpt@dest.example -l 4096 "$ADDR" >/dev/null 2>&1
T1=$(date +%s.%N); C1=$(cputicks)
sleep 1
metrics >"$W/m1"
python3 - "$W/m0" "$W/m1" "$MSGS" "$T0" "$T1" "$C0" "$C1" "$(getconf CLK_TCK)" <<'PY'
import sys,re
def load(p):
    d={}
    for l in open(p):
        if l.startswith('#'): continue
        m=re.match(r'(\S+?)(\{.*\})? (\S+)$',l.strip())
        if m: d[m.group(1)+(m.group(2) or '')]=float(m.group(3))
    return d
a,b=load(sys.argv[1]),load(sys.argv[2]); n=int(sys.argv[3]); t=float(sys.argv[5])-float(sys.argv[4]); cpu=(int(sys.argv[7])-int(sys.argv[6]))/int(sys.argv[8])
def delta(prefix):
    s=sum(v-a.get(k,0) for k,v in b.items() if k.startswith(prefix+'_sum'))
    c=sum(v-a.get(k,0) for k,v in b.items() if k.startswith(prefix+'_count'))
    return s,c
for name in ('postern_accept_latency_seconds','postern_spool_sync_seconds'):
    s,c=delta(name); print('%-36s n=%6d mean %.3f ms'%(name,c,1000*s/max(c,1)))
print('msg/s %.0f  per msg %.3f ms  CPU %.3f ms/msg (utime+stime of postern)'%(n/t,1000*t/n,1000*cpu/n))
PY
