#!/usr/bin/env python3
"""e2e_summary.py OUT.jsonl: medians per gateway and shape, and postern against Postfix."""
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
by = {}
for r in runs:
    by.setdefault(r["label"], []).append(r)
def med(rs, k):
    v = [r[k] for r in rs if r.get(k) is not None]
    return statistics.median(v) if v else float("nan")
def row(rs):
    n = len(rs)
    return dict(n=n, ok=sum(1 for r in rs if r["complete"]),
                acc=med(rs, "accept_rate"), e2e=med(rs, "e2e_rate"), dps=med(rs, "e2e_deliv_rate"),
                cpu=med(rs, "mta_cpu_ms_per_msg"),
                fl=statistics.median([r["disk_flushes"] / r["messages"] for r in rs]),
                sess=med(rs, "sink_sessions"), foreign=med(rs, "foreign_cores"))
print()
print("| run | n | complete | accept msg/s | e2e msg/s | e2e deliv/s | CPU ms/msg | flushes/msg | LMTP sessions | foreign cores |")
print("|---|---|---|---|---|---|---|---|---|---|")
rows = {k: row(v) for k, v in sorted(by.items())}
for k, x in rows.items():
    print("| %s | %d | %d/%d | %.0f | %.0f | %.0f | %.2f | %.2f | %.0f | %.2f |" % (
        k, x["n"], x["ok"], x["n"], x["acc"], x["e2e"], x["dps"], x["cpu"], x["fl"], x["sess"], x["foreign"]))
print()
print("Against Postfix (medians of the same rounds): e2e msg/s ratio (target >= 10), CPU/msg ratio (target <= 0.10)")
for k, x in rows.items():
    gw, shape = k.split("/", 1)
    pf = rows.get("postfix/" + shape)
    if gw in ("postfix", "floor") or not pf:
        continue
    print("  %-16s shape %s: %.2fx Postfix's msg/s, %.3fx its CPU per message" % (
        gw, shape, x["e2e"] / pf["e2e"], x["cpu"] / pf["cpu"]))
floors = {k.split("/", 1)[1]: v for k, v in by.items() if k.startswith("floor/")}
if floors:
    print()
    print("The box's floor (floor.sh: smtp-sink receiving, smtp-source -L delivering; no disk), medians:")
    for shape, rs in sorted(floors.items()):
        f = rows["floor/" + shape]["cpu"]
        pf = rows.get("postfix/" + shape)
        print("  shape %s: receive %.3f + deliver %.3f = %.3f ms/msg%s" % (
            shape, med(rs, "receive_cpu_ms_per_msg"), med(rs, "deliver_cpu_ms_per_msg"), f,
            " = %.3fx Postfix's CPU per message" % (f / pf["cpu"]) if pf else ""))
        for k, x in rows.items():
            gw, s = k.split("/", 1)
            if s == shape and gw not in ("postfix", "floor"):
                print("    %-14s %.2fx the floor" % (gw, x["cpu"] / f))
