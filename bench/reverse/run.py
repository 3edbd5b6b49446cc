#!/usr/bin/env python3
"""run.py -- reverse-mode benchmark: N postern gateways feeding ONE mailbox store.

Owns: the scenarios, one run of a scenario (its store, the capacity yardstick, the
gateways' phase, the figures) and the command line; rig.py has the parts (store, gateways,
load, samplers, a phase), figures.py what is measured and the printed table. README.md in
this folder describes the scenarios, the figures and the targets.

  run.py [--scenario a,a2,b,c,d,e,f,g] [--binary NAME=PATH ...] [--messages N]
         [--repeat R] [--store-extra [NAME=]YAML] [--json FILE]

Every process started here is stopped on exit (normal, error or signal).
Python 3 standard library only; needs root for the real stores.
"""
import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time

from figures import figures, report
from rig import FakeStore, RealStore, cleanup, log, run_phase

# name -> what runs. store: fake (capacity_store.py), dovecot or cyrus.
SCENARIOS = {
    "a": dict(store="fake", mode="queue", what="fake store, deliveries queue for W workers"),
    "a2": dict(store="fake", mode="backlog", hand_tuned=True,
               what="fake store, sessions wait in the listen backlog for W workers"),
    "b": dict(store="dovecot", what="Dovecot, lmtp process_limit W"),
    # 1000 per gateway, as a, a2 and b: with 400 a run lasted 4-5 s, and the gateway that
    # Cyrus served first at start-up kept its processes for reuse_limit (2 s), half of it.
    # (The builds before reverse mode need --messages 400 to drain in time.)
    "c": dict(store="cyrus", what="Cyrus, lmtp maxchild W"),
    "d": dict(store="fake", mode="queue", kill=True,
              what="fake store (queue); gateway 1 killed -9 mid-run and restarted"),
    "e": dict(store="fake", mode="queue", service_ms=50.0, capacity_at="10:10", messages=1500,
              what="fake store (queue), S=50 ms, W doubles 10 s after the first delivery"),
    "f": dict(store="dovecot", concentrator=True,
              what="Dovecot, lmtp process_limit W, behind a concentrator (mode: proxy) that "
                   "the 3 gateways deliver to"),
    # A relay cannot tell whether a delivery in flight at kill -9 was stored (RFC 1047): the
    # restarted gateway delivers its in-doubt recipients again. Cyrus drops such a second copy
    # by Message-ID and mailbox with its default duplicatesuppression: 1 (tests/stores turn it
    # off elsewhere), so here "duplicated" is what reaches the mailboxes.
    "g": dict(store="cyrus", kill=True, dupsuppress=True,
              what="Cyrus, lmtp maxchild W, its default duplicatesuppression: 1; gateway 1 "
                   "killed -9 mid-run and restarted"),
}


# --------------------------------------------------------------------------
# one run: store, (real stores: capacity with one gateway), N gateways

def one_gateway_on_a_fake_store(wd, binary, args, scn, store_extra):
    """Deliveries/s of ONE gateway with max_connections W (the operator's hand-tuned
    setting of the issue) on a fresh fake store of the same kind, as the real stores'
    capacity is measured: for a backlog store that includes the protocol's round trips
    each session's worker waits for, which W/S leaves out."""
    cwd = os.path.join(wd, "cap")
    os.mkdir(cwd)
    os.chmod(cwd, 0o755)
    store = FakeStore(cwd, args, scn)
    log("hand-tuned: one gateway, max_connections %d, %d messages" % (args.workers, args.capacity_messages))
    phase = run_phase(cwd, store, binary, args, ["gwcap"], args.workers,
                      args.capacity_messages, store_extra)
    deliveries = store.finish()
    return figures(phase, deliveries, store, None, {}, 1).get("throughput")


def run_once(name, scn, binary, args, store_extra, edge_extra=""):
    wd = tempfile.mkdtemp(prefix="pb-", dir="/tmp")
    os.chmod(wd, 0o755)  # the stores' users must reach their directory
    try:
        store = (FakeStore if scn["store"] == "fake" else RealStore)(wd, args, scn)
        messages = args.messages or scn.get("messages", 1000)
        if scn["store"] == "fake":
            capacity, cap = store.capacity(), None
            if scn.get("hand_tuned"):
                hand_tuned = one_gateway_on_a_fake_store(wd, binary, args, scn, store_extra)
        else:
            log("capacity: one gateway, max_connections %d, %d messages" % (args.workers, args.capacity_messages))
            cap_phase = run_phase(wd, store, binary, args, ["gwcap"], args.workers,
                                  args.capacity_messages, store_extra)
            cap = figures(cap_phase, store.deliveries(), store, None, {}, 1)
            capacity = cap.get("throughput")
        log("%d gateways x %d messages -> %s" % (args.gateways, messages, store.address))
        phase = run_phase(wd, store, binary, args, ["gw%d" % (i + 1) for i in range(args.gateways)],
                          args.max_connections, messages, store_extra,
                          kill_at=args.kill_at if scn.get("kill") else None,
                          ack_rate=capacity / args.gateways if scn.get("kill") else None,
                          concentrator=bool(scn.get("concentrator")), edge_extra=edge_extra)
        cap_after = None
        if scn["store"] != "fake":
            # Once more after the run: one gateway's rate at a real store moves by up to 2x
            # between runs, so one measurement is a poor yardstick.
            log("capacity again: one gateway, max_connections %d, %d messages"
                % (args.workers, args.capacity_messages))
            after_phase = run_phase(wd, store, binary, args, ["gwcap2"], args.workers,
                                    args.capacity_messages, store_extra)
            cap_after = figures(after_phase, store.deliveries(), store, None, {}, 1).get("throughput")
        deliveries = store.finish()
        f = figures(phase, deliveries, store, capacity, scn, args.gateways)
        if cap_after and capacity:
            f["capacity_again"] = cap_after
            f["throughput_pct_both"] = 100.0 * f["throughput"] / ((capacity + cap_after) / 2)
        if scn.get("hand_tuned") and hand_tuned:
            f["hand_tuned"] = hand_tuned
            f["throughput_pct_hand_tuned"] = 100.0 * f["throughput"] / hand_tuned
        if cap:
            f["capacity_drained"] = cap.get("drained")
            f["capacity_per_second"] = cap.get("per_second", {}).get("gwcap")
        f["load_errors"] = "; ".join(e for e in (ld.errors() for ld in phase["loads"]) if e)
        f["workdir"] = wd
        return f
    finally:
        cleanup()
        if not args.keep:
            shutil.rmtree(wd, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description="reverse-mode benchmark (see README.md)")
    ap.add_argument("--scenario", action="append", help="a,a2,b,c,d,e,f,g (repeatable) [a,a2,b,c]")
    ap.add_argument("--binary", action="append", metavar="NAME=PATH",
                    help="postern binary (repeatable: run side by side) [postern=target/release/postern]")
    ap.add_argument("--messages", type=int, help="messages per gateway [1000; e: 1500]")
    ap.add_argument("--repeat", type=int, default=1, help="runs per scenario and binary; medians")
    ap.add_argument("--gateways", type=int, default=3)
    ap.add_argument("--sessions", type=int, default=5, help="SMTP sessions per gateway (smtp-source -s)")
    ap.add_argument("--pace", type=int, default=0,
                    help="seconds each SMTP session waits between messages (smtp-source -w): "
                         "steady intake, e.g. --sessions 75 --pace 1 is 75 msg/s per gateway")
    ap.add_argument("--size", type=int, default=4096, help="message body bytes (smtp-source -l)")
    ap.add_argument("--max-connections", type=int, default=20, help="each gateway's store max_connections")
    ap.add_argument("--workers", type=int, default=5,
                    help="store capacity: fake store W, Dovecot process_limit, Cyrus maxchild")
    ap.add_argument("--service-ms", type=float, default=20.0, help="fake store service time [20; e: 50]")
    ap.add_argument("--jitter", type=float, default=0.0, help="fake store service time +- fraction")
    ap.add_argument("--uncorrected-timer", action="store_true",
                    help="fake store: sleep the service time as asked and take asyncio's lateness "
                         "(about 1 ms: the store's real capacity is then below W/S)")
    ap.add_argument("--capacity-at", help="T:W for scenario e [10:10]")
    ap.add_argument("--kill-at", type=float, default=3.0, help="scenarios d and g: seconds after the load starts")
    ap.add_argument("--capacity-messages", type=int, default=600,
                    help="real stores: messages of the one-gateway capacity measurement")
    ap.add_argument("--transport", choices=("unix", "tcp"), default="unix", help="to the store")
    ap.add_argument("--timeout", type=float, default=45.0, help="seconds per phase until drained")
    ap.add_argument("--edge-extra", action="append", default=[], metavar="[NAME=]YAML",
                    help="scenario f: YAML added to the edges' store entry (their store is the "
                         "concentrator), after --store-extra, for binary NAME only")
    ap.add_argument("--store-extra", action="append", default=[], metavar="[NAME=]YAML",
                    help="YAML added to the gateways' store entry (for binary NAME only)")
    ap.add_argument("--json", help="append one JSON line per run here")
    ap.add_argument("--keep", action="store_true", help="keep the /tmp/pb-* work directories")
    args = ap.parse_args()

    scenarios = [s for arg in (args.scenario or ["a,a2,b,c"]) for s in arg.split(",") if s]
    for s in scenarios:
        if s not in SCENARIOS:
            ap.error("unknown scenario %s" % s)
    binaries = [tuple(b.split("=", 1)) for b in (args.binary or ["postern=target/release/postern"])]
    for b, path in binaries:
        if not os.access(path, os.X_OK):
            ap.error("not an executable: %s" % path)
    extra = {b: [] for b, _ in binaries}
    edge_extra = {b: [] for b, _ in binaries}
    for given, into in ((args.store_extra, extra), (args.edge_extra, edge_extra)):
        for e in given:
            head, _, rest = e.partition("=")
            for b in into:
                if head not in into:
                    into[b].append(e)
                elif head == b:
                    into[b].append(rest)
    if not shutil.which("smtp-source"):
        sys.exit("smtp-source not found (Debian package postfix)")

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    results = {s: {b: [] for b, _ in binaries} for s in scenarios}
    try:
        for rep in range(args.repeat):
            for s in scenarios:
                for b, path in binaries:
                    log("scenario %s, %s, run %d/%d" % (s, b, rep + 1, args.repeat))
                    t0 = time.time()
                    try:
                        r = run_once(s, SCENARIOS[s], path, args, "\n".join(extra[b]),
                                     "\n".join(edge_extra[b]))
                    except RuntimeError as e:
                        r = {"error": str(e)}
                        log("  failed: %s" % e)
                    r.update(scenario=s, binary=b, path=path, repeat=rep + 1, seconds=time.time() - t0)
                    results[s][b].append(r)
                    if args.json:
                        with open(args.json, "a") as f:
                            f.write(json.dumps(r) + "\n")
    finally:
        cleanup()
    for s in scenarios:
        report(s, SCENARIOS[s]["what"], results[s], binaries, args.repeat)


if __name__ == "__main__":
    main()
