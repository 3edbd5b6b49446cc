"""figures.py -- what a reverse-mode run measured (bench/reverse/run.py): throughput, shares,
sessions on the store, losses and duplicates, from the store's deliveries and the samples
of a phase (rig.run_phase); and the printed table of every figure's median per binary.
README.md in this folder defines each figure and its target.
"""
import statistics

from rig import AckingSender, mval


# --------------------------------------------------------------------------
# figures

def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def figures(phase, deliveries, store, capacity, scn, n_gw):
    gws = phase["gateways"]
    names = [g.name for g in gws]
    mine = [d for d in deliveries if d[1] in names and d[0] <= phase["t_stop"]]
    st = store.stats
    if st.get("capacity_changes") and st.get("capacity_mean"):
        capacity = st["capacity_mean"]  # W changed: W/S averaged over the busy period
    f = {"capacity": capacity, "drained": phase["drained"]}
    # the busy period: first delivery to the last one, or to the end of the
    # run if mail was still queued then
    t_first = min((d[0] for d in mine), default=phase["t_load"])
    t_last = max((d[0] for d in mine), default=phase["t_load"])
    end = t_last if phase["drained"] else phase["t_stop"]
    keys = {(d[2], d[3]) for d in mine}
    f["delivered"] = len(mine)
    f["duplicated"] = len(mine) - len(keys)
    f["throughput"] = len(keys) / max(end - t_first, 1e-3)
    f["throughput_pct"] = 100.0 * f["throughput"] / capacity if capacity else None

    # per gateway: what it accepted (smtp-source: its counter; the Python
    # sender: the recipients that got a 250) and what the store holds from it
    accepted, got, last = {}, {}, {}
    for g, ld in zip(gws, phase["loads"]):
        acking = isinstance(ld, AckingSender)
        accepted[g.name] = len(ld.acked) if acking else int(g.total("postern_messages_accepted_total"))
        got[g.name] = {d[3] for d in mine if d[1] == g.name}
        last[g.name] = max((d[0] for d in mine if d[1] == g.name), default=None)
        f["delivered_" + g.name] = sum(1 for d in mine if d[1] == g.name)
        if acking:
            f["acked_" + g.name] = len(ld.acked)
            f["delivered_not_acked_" + g.name] = len(got[g.name] - set(ld.acked))
            f["dup_" + g.name] = f["delivered_" + g.name] - len(got[g.name])
            f["in_doubt_recovered_" + g.name] = g.total("postern_in_doubt_recovered_total")
    f["accepted"] = sum(accepted.values())
    # only a drained run can tell a loss from mail still queued
    if phase["drained"]:
        f["lost"] = sum(
            len(set(ld.acked) - got[g.name]) if isinstance(ld, AckingSender)
            else max(0, accepted[g.name] - len(got[g.name])) for g, ld in zip(gws, phase["loads"]))

    # while all compete: every gateway has mail queued (intake is much faster
    # than the store), i.e. from the first delivery until the first gateway
    # has delivered all it accepted; a gateway starved all along scores 0
    w1 = min(last[n] if last[n] and len(got[n]) >= accepted[n] else end for n in names)
    inside = [d for d in mine if t_first <= d[0] <= w1]
    f["compete_s"] = w1 - t_first
    if inside and w1 > t_first:
        f["throughput_compete"] = len(inside) / (w1 - t_first)
        for n in names:
            f["share_" + n] = 100.0 * sum(1 for d in inside if d[1] == n) / len(inside)
        f["share_dev_max"] = max(abs(f["share_" + n] * n_gw / 100.0 - 1) * 100 for n in names)
    if mine:
        f["per_second"] = {n: per_second(mine, t_first, n) for n in names}

    # sessions on the store during the busy period
    cs = [s for s in phase["conns"] if t_first <= s[0] <= end] or phase["conns"]
    if cs:
        f["sessions_peak"] = max(a + b for _, a, b in cs)
        f["sessions_mean"] = mean(a + b for _, a, b in cs)
        f["sessions_accepted_mean"] = mean(a for _, a, _ in cs)
        f["sessions_backlog_mean"] = mean(b for _, _, b in cs)
        # against the workers the store had at each sample (scenario e changes them)
        changes = sorted((t_first + c["t"], c["workers"]) for c in (st or {}).get("capacity_changes", []))
        def workers_at(t):
            w = store.workers
            for at, n in changes:
                if t >= at:
                    w = n
            return w
        f["sessions_per_worker"] = mean((a + b) / workers_at(t) for t, a, b in cs)
        f["sessions_series"] = [(round(t - t_first, 2), a, b) for t, a, b in cs]

    f["left_queued"] = sum(mval(g.last, "postern_queue_messages") for g in gws)
    f["deferred"] = sum(g.total("postern_deliveries_total", outcome="deferred") for g in gws)
    f["drain_s"] = t_last - phase["t_load"] if phase["drained"] else None
    ends = [ld.t_end for ld in phase["loads"] if ld.t_end]
    f["intake_s"] = max(ends) - phase["t_load"] if ends else None
    f["ideal_drain_s"] = (len(keys) / capacity) if capacity else None

    # how the gateways used their connections
    lhlo_n = sum(g.total("postern_lmtp_phase_seconds_count", phase="lhlo") for g in gws)
    lhlo_s = sum(g.total("postern_lmtp_phase_seconds_sum", phase="lhlo") for g in gws)
    acq_n = sum(g.total("postern_lmtp_phase_seconds_count", phase="acquire") for g in gws)
    acq_s = sum(g.total("postern_lmtp_phase_seconds_sum", phase="acquire") for g in gws)
    f["store_connects"] = sum(g.total("postern_lmtp_phase_seconds_count", phase="connect") for g in gws)
    f["store_greeted"] = lhlo_n
    f["greeting_lhlo_ms"] = 1000 * lhlo_s / lhlo_n if lhlo_n else None
    f["acquire_ms"] = 1000 * acq_s / acq_n if acq_n else None
    busy_samples = {n: [v for t, v in phase["metrics"][n] if t_first <= t <= end] for n in names}
    f["window_mean"] = mean(mean(v["window"] for v in s) for s in busy_samples.values() if s)
    f["window_max"] = max((v["window"] for s in busy_samples.values() for v in s), default=None)
    # each gateway's gauges over the run, for a look at how the windows moved
    f["series"] = {n: [(round(t - t_first, 2), v["window"], round(v["baseline"] * 1e3, 2))
                       for t, v in phase["metrics"][n]] for n in names}
    f["pooled_idle_mean"] = sum(mean(v["idle"] for v in s) or 0 for s in busy_samples.values())
    f["pooled_in_use_mean"] = sum(mean(v["in_use"] for v in s) or 0 for s in busy_samples.values())

    if st:
        f["queue_delay_ms"] = st["queue_delay_ms"]["mean"]
        f["queue_delay_p95_ms"] = st["queue_delay_ms"]["p95"]
        f["service_ms"] = st["service_ms_measured"]["mean"]
        f["timer_lateness_ms"] = st.get("timer_lateness_ms")
        # W/S with the service time the store really took (its asyncio sleep runs late on
        # a busy box): no client could get more through it
        if capacity and f["service_ms"]:
            f["throughput_pct_measured_service"] = (
                100.0 * f["throughput"] * f["service_ms"] / (capacity * store.service_ms))
        # worker time spent delivering over the busy period (backlog mode: the
        # rest is workers held by idle sessions, or idle with mail queued)
        if capacity and mine:
            f["worker_util_pct"] = 100.0 * len(mine) * f["service_ms"] / (
                capacity * store.service_ms * max(end - t_first, 1e-3))
        f["store_cpu_max_pct"] = max(st["cpu_percent_per_second"].values(), default=None)
        f["store_waiting_mean"] = st["waiting_for_worker"]["mean"]
        held = st.get("held_seconds") or {}
        total = sum(held.values())
        if total:
            for k in ("accept_to_first", "transaction", "between", "last_to_close", "unused"):
                f["held_%s_pct" % k] = 100.0 * held.get(k, 0.0) / total
        gaps = st.get("between_ms") or {}
        for k in ("mean", "p50", "p95", "p99", "max"):
            f["between_%s_ms" % k] = gaps.get(k)
        spent = st.get("between_seconds_by_ms") or {}
        if total:
            for k, label in (("<=2", "2"), ("<=5", "5"), ("<=15", "15"), ("<=50", "50"), (">50", "long")):
                f["between_in_%s_pct" % label] = 100.0 * spent.get(k, 0.0) / total
        sessions = st.get("held_sessions") or {}
        if sessions:
            f["held_sessions"] = sessions["count"]
            f["held_session_p50_s"] = sessions["held_s"]["p50"]
            f["held_session_txns_p50"] = sessions["transactions"]["p50"]
            f["held_sessions_idle_at_close"] = sessions["idle_over_10ms_at_close"]
    if mine and scn.get("capacity_at") and st.get("capacity_changes"):
        f.update(follow(mine, t_first, st["capacity_changes"][0], store.service_ms))
    if phase["killed"]:
        f["killed_at_s"] = phase["killed"]["t"]
        f["restarted_at_s"] = phase["killed"]["restarted"]
    return f


def per_second(mine, t_first, peer=None):
    """Deliveries (of one gateway, or all) per second since t_first."""
    out = [0] * (int(max(d[0] for d in mine) - t_first) + 1)
    for d in mine:
        if peer is None or d[1] == peer:
            out[int(d[0] - t_first)] += 1
    return out


def follow(mine, t_first, change, service_ms):
    """Capacity change: seconds until the 2-s delivery rate reaches 90% of it."""
    t_change, new_cap = change["t"], change["workers"] * 1000.0 / service_ms
    per_s = per_second(mine, t_first)
    end = len(per_s) - 1  # the last second is partial
    out = {"capacity_after": new_cap,
           "rate_before": mean(per_s[max(0, int(t_change) - 5):int(t_change)])}
    for k in range(int(t_change) + 1, end):  # buckets k-1 and k: [k-1, k+1)
        if (per_s[k - 1] + per_s[k]) / 2.0 >= 0.9 * new_cap:
            out["follow_s"] = k + 1 - t_change
            out["rate_after"] = mean(per_s[k - 1:end])
            break
    return out


# --------------------------------------------------------------------------
# report

ROWS = [  # (key, label, format)
    ("capacity", "capacity (deliveries/s)", "%.0f"),
    ("throughput", "throughput over the busy period (/s)", "%.0f"),
    ("throughput_pct", "  = % of capacity            [>= 90]", "%.0f"),
    ("capacity_again", "real store: capacity measured after (/s)", "%.0f"),
    ("throughput_pct_both", "  throughput as % of the two's mean", "%.0f"),
    ("throughput_pct_measured_service", "  = % of W / measured service time", "%.0f"),
    ("hand_tuned", "one gateway at W conns (/s)", "%.0f"),
    ("throughput_pct_hand_tuned", "  = throughput as % of it", "%.0f"),
    ("throughput_compete", "throughput while all compete (/s)", "%.0f"),
    ("sessions_peak", "store sessions peak (conns)", "%.0f"),
    ("sessions_mean", "store sessions mean", "%.1f"),
    ("sessions_per_worker", "  = x workers                [<= 2]", "%.2f"),
    ("sessions_accepted_mean", "  accepted (served) mean", "%.1f"),
    ("sessions_backlog_mean", "  waiting in listen backlog mean", "%.1f"),
    ("queue_delay_ms", "store queueing delay mean (ms)", "%.1f"),
    ("queue_delay_p95_ms", "store queueing delay p95 (ms)", "%.1f"),
    ("service_ms", "store service time mean (ms)  [delay <= 2x]", "%.1f"),
    ("timer_lateness_ms", "  its timer's lateness, corrected (ms)", "%.2f"),
    ("worker_util_pct", "store worker utilisation (%)", "%.0f"),
    ("held_transaction_pct", "  held: MAIL -> final reply (%)", "%.0f"),
    ("held_accept_to_first_pct", "  accepted -> first MAIL (%)", "%.0f"),
    ("held_between_pct", "  between transactions (%)", "%.0f"),
    ("between_mean_ms", "    each gap, mean (ms)", "%.2f"),
    ("between_p50_ms", "    each gap, median (ms)", "%.2f"),
    ("between_p95_ms", "    each gap, p95 (ms)", "%.2f"),
    ("between_p99_ms", "    each gap, p99 (ms)", "%.2f"),
    ("between_max_ms", "    each gap, max (ms)", "%.2f"),
    ("between_in_2_pct", "    in gaps <= 2 ms (% of held)", "%.1f"),
    ("between_in_5_pct", "    in gaps 2-5 ms (% of held)", "%.1f"),
    ("between_in_15_pct", "    in gaps 5-15 ms (% of held)", "%.1f"),
    ("between_in_50_pct", "    in gaps 15-50 ms (% of held)", "%.1f"),
    ("between_in_long_pct", "    in gaps > 50 ms (% of held)", "%.1f"),
    ("held_last_to_close_pct", "  last reply -> close (%)", "%.0f"),
    ("held_unused_pct", "  sessions with no transaction (%)", "%.0f"),
    ("held_sessions", "sessions that held a worker", "%.0f"),
    ("held_session_p50_s", "  each held it, median (s)", "%.2f"),
    ("held_session_txns_p50", "  transactions each, median", "%.0f"),
    ("held_sessions_idle_at_close", "  idle > 10 ms before the close", "%.0f"),
    ("share_dev_max", "max share deviation from 1/N (%) [<= 20]", "%.0f"),
    ("compete_s", "all-compete window (s)", "%.1f"),
    ("accepted", "messages accepted (250)", "%.0f"),
    ("delivered", "deliveries at the store", "%.0f"),
    ("delivered_by", None, "%.0f"),
    ("lost", "lost                          [0]", "%.0f"),
    ("duplicated", "duplicated", "%.0f"),
    ("left_queued", "still queued at the end", "%.0f"),
    ("deferred", "deferred attempts", "%.0f"),
    ("intake_s", "intake done after (s)", "%.1f"),
    ("drain_s", "drained after (s)", "%.1f"),
    ("ideal_drain_s", "  at capacity it would take (s)", "%.1f"),
    ("store_connects", "store connections made (connect)", "%.0f"),
    ("store_greeted", "  of which greeted (LHLO done)", "%.0f"),
    ("greeting_lhlo_ms", "connect->greeting+LHLO mean (ms)", "%.1f"),
    ("acquire_ms", "wait for a pooled connection mean (ms)", "%.1f"),
    ("window_mean", "gateway window mean", "%.1f"),
    ("window_max", "gateway window max", "%.0f"),
    ("pooled_in_use_mean", "pooled conns in use (sum of gws)", "%.1f"),
    ("pooled_idle_mean", "pooled conns idle (sum of gws)", "%.1f"),
    ("store_cpu_max_pct", "fake store CPU max (%/s)", "%.0f"),
    ("rate_before", "rate before capacity change (/s)", "%.0f"),
    ("capacity_after", "capacity after the change (/s)", "%.0f"),
    ("follow_s", "throughput follows after (s) [<= 30]", "%.1f"),
    ("rate_after", "rate after following (/s)", "%.0f"),
    ("killed_at_s", "gw1 killed -9 at (s)", "%.1f"),
    ("restarted_at_s", "gw1 accepting again at (s)", "%.1f"),
    ("in_doubt_recovered_gw1", "gw1 in doubt recovered at restart", "%.0f"),
    ("acked_gw1", "gw1 messages acknowledged (250)", "%.0f"),
    ("dup_gw1", "gw1 duplicated  [<= in doubt recovered]", "%.0f"),
    ("delivered_not_acked_gw1", "gw1 delivered without a 250 (in flight)", "%.0f"),
]


def median(vals):
    vals = [v for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return statistics.median(vals) if vals else None


def report(name, what, results, binaries, repeat):
    """Prints scenario `name` (`what` it runs): every figure's median per binary."""
    print("\n== scenario %s: %s%s" % (name, what, " (median of %d)" % repeat if repeat > 1 else ""))
    cols = [b for b, _ in binaries]
    share_keys = sorted({k for b in cols for r in results[b] for k in r if k.startswith("share_")
                         and k != "share_dev_max"})
    by_keys = sorted({k for b in cols for r in results[b] for k in r if k.startswith("delivered_gw")})
    rows = []
    for key, label, fmt in ROWS:
        if key == "share_dev_max":
            rows += [(k, "share of %s while all compete (%%)" % k[6:], "%.1f") for k in share_keys]
        if key == "delivered_by":
            rows += [(k, "  by %s" % k[10:], fmt) for k in by_keys]
        else:
            rows.append((key, label, fmt))
    print("%-46s" % "" + "".join("%14s" % c for c in cols))
    for key, label, fmt in rows:
        vals = [median(r.get(key) for r in results[b]) for b in cols]
        if all(v is None for v in vals):
            continue
        print("%-46s" % label + "".join("%14s" % (fmt % v if v is not None else "-") for v in vals))
    for b in cols:
        for r in results[b]:
            if r.get("error"):
                print("  %s: run failed: %s" % (b, r["error"]))
            elif not r.get("drained", True):
                print("  %s: NOT drained within --timeout (%.0f left queued; losses unknown)"
                      % (b, r.get("left_queued") or 0))
            if r.get("load_errors"):
                print("  %s: load: %s" % (b, r["load_errors"]))
