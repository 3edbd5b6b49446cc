#!/usr/bin/env python3
"""capacity_store.py -- a fake LMTP mailbox store with a finite capacity.

Owns: the store side of the reverse-mode benchmark (bench/reverse/README.md).
It accepts any recipient and delivers nothing, but a delivery costs a worker
for --service-ms, and there are only --workers of them:

  --mode queue    sessions are greeted at once; after the final dot a delivery
                  waits (FIFO) for a free worker, holds it for the service time,
                  then every recipient gets its 250 (a threaded store).
  --mode backlog  a connection is accept()ed only when a worker is free and keeps
                  it until QUIT/close (Cyrus maxchild, Dovecot process_limit):
                  the others wait unanswered in the kernel's listen backlog.

  --capacity-at T:W  from T seconds after the first delivery on, W workers
                     (repeatable; e.g. 10:10 doubles a 5-worker store).

Output:
  --log FILE    one line per delivered recipient:
                t_end <TAB> peer <TAB> message-id <TAB> recipient
                (peer = the host after "by" in the first Received: header,
                i.e. the gateway's `hostname:`)
  --stats FILE  JSON, rewritten every --stats-interval seconds and on
                SIGTERM/SIGINT (then the process exits): sessions open (sampled
                every 10 ms: peak, mean over the busy period = first to last
                delivery), deliveries, duplicates, queueing delay (final dot ->
                worker start) and service time (mean/p50/p95/max, ms; each sleep is
                shortened by the event loop's mean lateness on a timer, so that
                the mean is --service-ms: see Store.service), worker
                utilisation, capacity (W/S averaged over the busy period),
                per-peer counts, deliveries per second, own CPU
                and event-loop lag (to show it was not the bottleneck);
                in backlog mode, where the time of the workers held by
                sessions went (held_seconds: accepted -> first MAIL,
                MAIL -> final reply, between transactions, last reply ->
                close, sessions that carried none).
  --ready FILE  written (with the pid) once listening.

Usage: capacity_store.py --listen 127.0.0.1:PORT|unix:/path --workers 5
         --service-ms 20 [--jitter 0.5] [--mode queue|backlog]
         [--capacity-at 10:10] --log FILE --stats FILE [--ready FILE]
Python 3 standard library only.
"""
import argparse
import asyncio
import collections
import json
import os
import random
import re
import resource
import signal
import socket
import time

MSGID_RE = re.compile(rb"(?im)^message-id:[ \t]*(\S+)")
BY_RE = re.compile(rb"(?ims)^received:.*?\sby\s+(\S+)")
LHLO_REPLY = (b"250-capacity-store\r\n250-PIPELINING\r\n"
              b"250-ENHANCEDSTATUSCODES\r\n250 8BITMIME\r\n")


class Workers:
    """A FIFO counting semaphore whose size can change while it is in use."""

    def __init__(self, capacity):
        self.capacity = capacity
        self.busy = 0
        self.waiters = collections.deque()

    async def acquire(self):
        if self.busy < self.capacity and not self.waiters:
            self.busy += 1
            return
        fut = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        await fut  # release() counted us in busy already

    def release(self):
        self.busy -= 1
        self._wake()

    def resize(self, capacity):
        self.capacity = capacity
        self._wake()

    def _wake(self):
        while self.waiters and self.busy < self.capacity:
            fut = self.waiters.popleft()
            if not fut.cancelled():
                self.busy += 1
                fut.set_result(None)


def pct(sorted_vals, p):
    if not sorted_vals:
        return None
    i = min(len(sorted_vals) - 1, int(round(p / 100.0 * (len(sorted_vals) - 1))))
    return sorted_vals[i]


def summary_ms(vals):
    if not vals:
        return {"n": 0, "mean": None, "p50": None, "p95": None, "p99": None, "max": None}
    s = sorted(vals)
    return {"n": len(s), "mean": round(1000 * sum(s) / len(s), 2),
            "p50": round(1000 * pct(s, 50), 2), "p95": round(1000 * pct(s, 95), 2),
            "p99": round(1000 * pct(s, 99), 2), "max": round(1000 * s[-1], 2)}


def gap_buckets(gaps):
    """Seconds spent in gaps up to 2, 5, 15, 50 ms and longer."""
    edges = (2, 5, 15, 50)
    out = collections.Counter()
    for g in gaps:
        ms = 1000 * g
        label = next(("<=%d" % e for e in edges if ms <= e), ">50")
        out[label] += g
    return {k: round(v, 3) for k, v in out.items()}


def held_sessions(sessions):
    """Backlog mode: how long the sessions that held a worker lasted, how many
    transactions each carried, and how they ended: how many sat idle for more than 10 ms
    after their last reply, and how many ended without QUIT."""
    if not sessions:
        return {}
    held = sorted(s[0] for s in sessions)
    txns = sorted(s[1] for s in sessions)
    return {
        "count": len(sessions),
        "held_s": {"p10": round(pct(held, 10), 3), "p50": round(pct(held, 50), 3),
                   "p90": round(pct(held, 90), 3), "max": round(held[-1], 3)},
        "transactions": {"p10": pct(txns, 10), "p50": pct(txns, 50), "p90": pct(txns, 90)},
        "idle_over_10ms_at_close": sum(1 for s in sessions if s[2] > 0.010),
        "idle_at_close_s": round(sum(s[2] for s in sessions if s[2] > 0.010), 3),
        "without_quit": sum(1 for s in sessions if not s[3]),
    }


class Store:
    def __init__(self, args):
        self.args = args
        self.workers = Workers(args.workers)
        self.t0 = time.time()
        self.t_first = None
        self.t_last = None
        self.sessions_open = 0
        self.sessions_total = 0
        self.in_service = 0
        self.waiting = 0
        self.deliveries = 0
        self.transactions = 0
        self.seen = {}  # (message-id, recipient) -> times delivered
        self.duplicates = 0
        self.per_peer = collections.Counter()
        self.queue_delays = []
        self.service_times = []
        self.lateness = 0.0  # the event loop's running mean lateness on a timer (s)
        self.buckets = collections.Counter()  # second since first delivery -> deliveries
        self.samples = []  # (t, sessions open, in service, waiting for a worker)
        self.lag = []
        self.cpu_buckets = {}
        self.capacity_changes = []
        self.tasks = set()
        # backlog mode: where the time of workers held by sessions goes (seconds):
        # accepted -> first MAIL, service, between transactions, last one -> close,
        # sessions that never carried a transaction
        self.held = collections.Counter()
        self.gaps = []  # backlog mode: each wait between two transactions of a session
        # backlog mode: each session that held a worker: (seconds held, transactions,
        # seconds from its last reply to the close, ended by QUIT)
        self.held_sessions = []
        self.log = open(args.log, "a", buffering=1 << 16) if args.log else None

    # --- sessions -------------------------------------------------------
    async def session(self, reader, writer, holds_worker):
        self.sessions_open += 1
        self.sessions_total += 1
        mark = {"accepted": time.time(), "last_end": None, "txns": 0, "quit": False}
        try:
            await self.converse(reader, writer, holds_worker, mark)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self.sessions_open -= 1
            if holds_worker:
                self.workers.release()
                now = time.time()
                if mark["last_end"] is None:
                    self.held["unused"] += now - mark["accepted"]
                else:
                    self.held["last_to_close"] += now - mark["last_end"]
                self.held_sessions.append((
                    now - mark["accepted"], mark["txns"],
                    now - (mark["last_end"] or mark["accepted"]), mark["quit"]))
            writer.close()

    async def converse(self, reader, writer, holds_worker, mark):
        writer.write(b"220 capacity-store LMTP ready\r\n")
        sender, rcpts = None, []
        while True:
            line = await reader.readline()
            if not line:
                return
            verb = line[:4].upper()
            if verb == b"MAIL" and holds_worker:
                now = time.time()
                if mark["last_end"] is None:
                    self.held["accept_to_first"] += now - mark["accepted"]
                else:
                    self.held["between"] += now - mark["last_end"]
                    self.gaps.append(now - mark["last_end"])
                mark["txn_start"] = now
            if verb in (b"LHLO", b"EHLO"):
                sender, rcpts = None, []
                writer.write(LHLO_REPLY)
            elif verb == b"HELO":
                writer.write(b"250 capacity-store\r\n")
            elif verb == b"MAIL":
                sender, rcpts = line, []
                writer.write(b"250 2.1.0 Ok\r\n")
            elif verb == b"RCPT":
                if sender is None:
                    writer.write(b"503 5.5.1 MAIL first\r\n")
                else:
                    rcpts.append(self.address(line))
                    writer.write(b"250 2.1.5 Ok\r\n")
            elif verb == b"DATA":
                if not rcpts:
                    writer.write(b"503 5.5.1 RCPT first\r\n")
                    continue
                writer.write(b"354 Go ahead\r\n")
                first = await reader.readline()
                body = b"" if first == b".\r\n" else first + await reader.readuntil(b"\r\n.\r\n")
                await self.deliver(body, rcpts, writer, holds_worker)
                if holds_worker:
                    now = time.time()
                    self.held["transaction"] += now - mark.get("txn_start", now)
                    mark["last_end"] = now
                    mark["txns"] += 1
                sender, rcpts = None, []
            elif verb == b"RSET":
                sender, rcpts = None, []
                writer.write(b"250 2.0.0 Ok\r\n")
            elif verb == b"NOOP":
                writer.write(b"250 2.0.0 Ok\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 2.0.0 Bye\r\n")
                mark["quit"] = True
                await writer.drain()
                return
            else:
                writer.write(b"502 5.5.2 Command not implemented\r\n")

    async def service(self, svc):
        """Holds a worker for `svc` seconds on average. asyncio wakes a timer late:
        epoll's timeout is rounded up to the millisecond, and the loop first runs what
        else is ready (about 1 ms on a busy 2-core box, measured: 20 ms asked, 20.9-21.1
        taken). Uncorrected, the store's capacity would be W / (S + that lateness), not the
        W / S it is run with. So each sleep is shortened by the lateness seen so far (a
        running mean): single services vary by the loop's jitter, their mean is S.
        --uncorrected-timer sleeps S and takes the lateness (the store before 2026-12-07)."""
        if self.args.uncorrected_timer:
            await asyncio.sleep(svc)
            return
        asked = max(0.0, svc - self.lateness)
        t0 = time.monotonic()
        await asyncio.sleep(asked)
        late = time.monotonic() - t0 - asked
        self.lateness += 0.05 * (late - self.lateness)

    @staticmethod
    def address(line):
        a, b = line.find(b"<"), line.find(b">")
        return line[a + 1:b].decode("utf-8", "replace") if 0 <= a < b else "?"

    async def deliver(self, body, rcpts, writer, holds_worker):
        t_dot = time.time()
        if not holds_worker:
            self.waiting += 1
            await self.workers.acquire()
            self.waiting -= 1
        t_start = time.time()
        self.in_service += 1
        svc = self.args.service_ms / 1000.0
        if self.args.jitter:
            svc *= 1 + self.args.jitter * random.uniform(-1, 1)
        try:
            await self.service(svc)
        finally:
            self.in_service -= 1
            if not holds_worker:
                self.workers.release()
        t_end = time.time()
        end = body.find(b"\r\n\r\n")
        head = body[:end + 2] if end >= 0 else body[:8192]
        m = MSGID_RE.search(head)
        msgid = m.group(1).decode("utf-8", "replace") if m else "-"
        m = BY_RE.search(head)
        peer = m.group(1).decode("utf-8", "replace").rstrip(";") if m else "?"
        if self.t_first is None:
            self.t_first = t_end
            self.schedule_capacity_changes()
        self.t_last = t_end
        self.transactions += 1
        self.queue_delays.append(t_start - t_dot)
        self.service_times.append(t_end - t_start)
        self.buckets[int(t_end - self.t_first)] += len(rcpts)
        out = []
        for r in rcpts:
            key = (msgid, r)
            n = self.seen.get(key, 0)
            self.seen[key] = n + 1
            if n:
                self.duplicates += 1
            self.deliveries += 1
            self.per_peer[peer] += 1
            out.append(b"250 2.0.0 <%s> delivered\r\n" % r.encode())
            if self.log:
                self.log.write("%.6f\t%s\t%s\t%s\n" % (t_end, peer, msgid, r))
        writer.write(b"".join(out))

    def schedule_capacity_changes(self):
        loop = asyncio.get_running_loop()
        for at, w in self.args.capacity_at:
            loop.call_later(at, self.change_capacity, w)

    def change_capacity(self, w):
        self.capacity_changes.append({"t": round(time.time() - self.t_first, 3), "workers": w})
        self.workers.resize(w)

    # --- listening ------------------------------------------------------
    def listen_socket(self):
        addr = self.args.listen
        if addr.startswith("unix:"):
            path = addr[5:]
            if os.path.exists(path):
                os.unlink(path)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(path)
            os.chmod(path, 0o666)
        else:
            host, port = addr.rsplit(":", 1)
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, int(port)))
        s.listen(self.args.backlog)
        s.setblocking(False)
        return s

    async def open(self, conn):
        if conn.family == socket.AF_UNIX:
            return await asyncio.open_unix_connection(sock=conn, limit=1 << 24)
        return await asyncio.open_connection(sock=conn, limit=1 << 24)

    async def serve(self, lsock):
        loop = asyncio.get_running_loop()
        holds = self.args.mode == "backlog"
        while True:
            if holds:
                await self.workers.acquire()  # accept only with a free worker
            try:
                conn, _ = await loop.sock_accept(lsock)
                reader, writer = await self.open(conn)
            except OSError:
                if holds:
                    self.workers.release()
                continue
            task = loop.create_task(self.session(reader, writer, holds))
            self.tasks.add(task)  # the loop keeps only a weak reference
            task.add_done_callback(self.tasks.discard)

    # --- measurement ----------------------------------------------------
    async def sampler(self):
        step = 0.01
        nxt = time.time() + step
        while True:
            await asyncio.sleep(max(0.0, nxt - time.time()))
            now = time.time()
            self.lag.append(now - nxt)
            nxt += step
            if now > nxt:  # fell behind: do not try to catch up
                nxt = now + step
            self.samples.append((now, self.sessions_open, self.in_service, self.waiting))

    async def writer_loop(self):
        last_cpu, last_t = self.cpu(), time.time()
        while True:
            await asyncio.sleep(self.args.stats_interval)
            cpu, now = self.cpu(), time.time()
            self.cpu_buckets[int(now - self.t0)] = round(100 * (cpu - last_cpu) / (now - last_t), 1)
            last_cpu, last_t = cpu, now
            self.write_stats()

    @staticmethod
    def cpu():
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    def window_samples(self):
        if self.t_first is None:
            return []
        return [s for s in self.samples if self.t_first <= s[0] <= self.t_last]

    def stats(self):
        ws = self.window_samples() or self.samples
        busy = self.t_last - self.t_first if self.t_first is not None else 0.0

        def peak_mean(i):
            if not ws:
                return {"peak": 0, "mean": 0.0}
            return {"peak": max(s[i] for s in ws), "mean": round(sum(s[i] for s in ws) / len(ws), 2)}

        service_total = sum(self.service_times)
        worker_seconds = self.worker_seconds()
        lag = sorted(self.lag)
        return {
            "mode": self.args.mode, "workers": self.args.workers,
            "workers_now": self.workers.capacity, "service_ms": self.args.service_ms,
            "jitter": self.args.jitter, "capacity_changes": self.capacity_changes,
            "t_start": self.t0, "t_first": self.t_first, "t_last": self.t_last,
            "busy_seconds": round(busy, 3),
            "sessions_total": self.sessions_total,
            "sessions_open": peak_mean(1),
            "in_service": peak_mean(2),
            "waiting_for_worker": peak_mean(3),
            "transactions": self.transactions,
            "deliveries": self.deliveries,
            "unique": len(self.seen),
            "duplicates": self.duplicates,
            "per_peer": dict(self.per_peer),
            "queue_delay_ms": summary_ms(self.queue_delays),
            "service_ms_measured": summary_ms(self.service_times),
            "timer_lateness_ms": round(1000 * self.lateness, 3),
            # share of the workers' time spent servicing a delivery (backlog
            # mode: the rest is a worker held by an idle session)
            "worker_utilisation": round(service_total / worker_seconds, 3) if worker_seconds else None,
            # deliveries/s the workers allow, averaged over the busy period
            "capacity_mean": round(worker_seconds / busy / (self.args.service_ms / 1000.0), 1) if busy else None,
            "per_second": [self.buckets.get(i, 0) for i in range(int(busy) + 1)] if self.t_first else [],
            "held_seconds": {k: round(v, 3) for k, v in self.held.items()},
            "between_ms": summary_ms(self.gaps),
            # where the time between transactions went: seconds in gaps of each size
            "between_seconds_by_ms": gap_buckets(self.gaps),
            "held_sessions": held_sessions(self.held_sessions),
            "cpu_percent_per_second": self.cpu_buckets,
            "cpu_seconds": round(self.cpu(), 3),
            "loop_lag_ms": {"mean": round(1000 * sum(lag) / len(lag), 2) if lag else None,
                            "p99": round(1000 * pct(lag, 99), 2) if lag else None},
        }

    def worker_seconds(self):
        """Worker-seconds available between the first and the last delivery
        (capacity changes included)."""
        if self.t_first is None or self.t_last == self.t_first:
            return 0.0
        changes = sorted(self.args.capacity_at)
        total, w, t = 0.0, self.args.workers, 0.0
        end = self.t_last - self.t_first
        for at, nw in changes:
            if at >= end:
                break
            total += w * (at - t)
            w, t = nw, at
        return total + w * (end - t)

    def write_stats(self):
        if self.log:
            self.log.flush()
        if not self.args.stats:
            return
        tmp = self.args.stats + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.stats(), f)
            f.write("\n")
        os.replace(tmp, self.args.stats)


def capacity_at(text):
    t, w = text.split(":")
    return float(t), int(w)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--listen", required=True, help="127.0.0.1:PORT or unix:/path")
    ap.add_argument("--workers", type=int, default=5)
    ap.add_argument("--service-ms", type=float, default=20.0)
    ap.add_argument("--jitter", type=float, default=0.0, help="0.5 = service time +-50%%")
    ap.add_argument("--mode", choices=("queue", "backlog"), default="queue")
    ap.add_argument("--capacity-at", type=capacity_at, action="append", default=[],
                    metavar="T:W", help="W workers from T s after the first delivery")
    ap.add_argument("--backlog", type=int, default=128, help="listen(2) backlog")
    ap.add_argument("--log", help="per-delivery log file")
    ap.add_argument("--stats", help="stats JSON file")
    ap.add_argument("--stats-interval", type=float, default=1.0)
    ap.add_argument("--ready", help="file written once listening")
    ap.add_argument("--uncorrected-timer", action="store_true",
                    help="sleep the service time as asked, and take the event loop's lateness")
    args = ap.parse_args()

    store = Store(args)

    async def run():
        loop = asyncio.get_running_loop()
        stop = loop.create_future()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
        lsock = store.listen_socket()
        tasks = [loop.create_task(c) for c in (store.serve(lsock), store.sampler(), store.writer_loop())]
        if args.ready:
            with open(args.ready, "w") as f:
                f.write("%d\n" % os.getpid())
        await stop
        for t in tasks:
            t.cancel()
        store.write_stats()

    asyncio.run(run())


if __name__ == "__main__":
    main()
