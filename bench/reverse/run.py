#!/usr/bin/env python3
"""run.py -- reverse-mode benchmark: N postern gateways feeding ONE mailbox store.

Owns: starting the store (capacity_store.py here, or Dovecot / Cyrus through
tests/stores/{dovecot,cyrus}.sh), N gateways with their own spools, the load
(smtp-source -N per gateway; for the gateway killed in scenarios d and g a Python
sender that records every 250), sampling the store's connections
(/proc/net/tcp or /proc/net/unix, every 50 ms) and the gateways' /metrics
(every 0.5 s), and the figures and targets printed at the end.
README.md in this folder describes the scenarios, the figures and the targets.

  run.py [--scenario a,a2,b,c,d,e,f,g] [--binary NAME=PATH ...] [--messages N]
         [--repeat R] [--store-extra [NAME=]YAML] [--json FILE]

Every process started here is stopped on exit (normal, error or signal).
Python 3 standard library only; needs root for the real stores.
"""
import argparse
import email.utils
import json
import os
import re
import shutil
import signal
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
STORES_DIR = os.path.join(HERE, "..", "..", "tests", "stores")
DOMAIN = "example.com"

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

PROCS = []       # every Popen started here, stopped at exit
STORE_DIRS = []  # (script, dir) of real store instances to stop at exit


def log(msg):
    print("[%s] %s" % (time.strftime("%H:%M:%S"), msg), file=sys.stderr, flush=True)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def start(argv, logfile, env=None):
    p = subprocess.Popen(argv, stdout=logfile, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                         env=env, start_new_session=True)
    PROCS.append(p)
    return p


def stop(*procs):
    """All at once: SIGTERM, a second SIGTERM after 2 s (postern then exits at
    once), SIGKILL after 5 s."""
    for sig, wait in ((signal.SIGTERM, 2.0), (signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
        running = [p for p in procs if p.poll() is None]
        for p in running:
            p.send_signal(sig)
        deadline = time.time() + wait
        for p in running:
            try:
                p.wait(max(0.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
    for p in procs:
        if p in PROCS:
            PROCS.remove(p)


def cleanup():
    for p in list(PROCS):
        try:
            p.kill()
            p.wait(5)
        except (OSError, subprocess.TimeoutExpired):
            pass
    PROCS.clear()
    for script, d in list(STORE_DIRS):
        subprocess.run(["bash", script, "stop", d], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=False)
    STORE_DIRS.clear()


def wait_until(pred, timeout, step=0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


# --------------------------------------------------------------------------
# stores

class FakeStore:
    """capacity_store.py: deliveries come from its per-delivery log."""

    def __init__(self, wd, args, scn):
        self.sock = os.path.join(wd, "store.sock")
        self.port = None if args.transport == "unix" else free_port()
        self.address = "unix:" + self.sock if self.port is None else "127.0.0.1:%d" % self.port
        self.workers = args.workers
        self.service_ms = scn.get("service_ms", args.service_ms)
        cap_at = args.capacity_at or scn.get("capacity_at")
        self.stats_path = os.path.join(wd, "store-stats.json")
        self.log_path = os.path.join(wd, "store-deliveries.log")
        ready = os.path.join(wd, "store.ready")
        argv = [sys.executable, os.path.join(HERE, "capacity_store.py"), "--listen", self.address,
                "--mode", scn["mode"], "--workers", str(self.workers),
                "--service-ms", str(self.service_ms), "--jitter", str(args.jitter),
                "--log", self.log_path, "--stats", self.stats_path, "--ready", ready]
        if cap_at:
            argv += ["--capacity-at", cap_at]
        if args.uncorrected_timer:
            argv.append("--uncorrected-timer")
        self.proc = start(argv, open(os.path.join(wd, "store.out"), "w"))
        if not wait_until(lambda: os.path.exists(ready), 10):
            raise RuntimeError("capacity_store.py did not start (see %s/store.out)" % wd)
        self.stats = {}

    def capacity(self):
        return self.workers * 1000.0 / self.service_ms

    def deliveries(self):
        """[(t, peer, message-id, recipient)] so far."""
        out = []
        if os.path.exists(self.log_path):
            with open(self.log_path) as f:
                for line in f:
                    parts = line.rstrip("\n").split("\t")
                    if len(parts) == 4:
                        out.append((float(parts[0]), parts[1], parts[2], parts[3]))
        return out

    def finish(self):
        stop(self.proc)
        with open(self.stats_path) as f:
            self.stats = json.load(f)
        return self.deliveries()


# the postern Received: header names the gateway and the recipient
POSTERN_RECEIVED = re.compile(rb"\sby (\S+) \(postern(?: node \d+)?\)[^;]*?\sfor <([^>]+)>", re.S)
MESSAGE_ID = re.compile(rb"(?im)^message-id:[ \t]*(\S+)")


class RealStore:
    """Dovecot or Cyrus via tests/stores/*.sh; deliveries are the message files
    (time = mtime; gateway and recipient from postern's Received: header)."""

    def __init__(self, wd, args, scn):
        self.kind = scn["store"]
        self.dir = os.path.join(wd, "s")
        self.script = os.path.abspath(os.path.join(STORES_DIR, self.kind + ".sh"))
        env = dict(os.environ)
        if self.kind == "dovecot":
            env.update(DOVECOT_ANYUSER="1", DOVECOT_LMTP_PROCESS_LIMIT=str(args.workers))
        else:
            env.update(CYRUS_AUTOCREATE="1", CYRUS_LMTP_MAXCHILD=str(args.workers),
                       CYRUS_DUPSUPPRESS="1" if scn.get("dupsuppress") else "0")
        with open(os.path.join(wd, "store.out"), "w") as out:
            rc = subprocess.run(["bash", self.script, "start", self.dir], stdout=out,
                                stderr=subprocess.STDOUT, env=env, check=False).returncode
        STORE_DIRS.append((self.script, self.dir))
        if rc != 0:
            raise RuntimeError("%s.sh start failed (see %s/store.out)" % (self.kind, wd))
        kv = dict(line.split("=", 1) for line in open(os.path.join(self.dir, "backend.env"))
                  .read().split() if "=" in line)
        self.sock = kv["LMTP_SOCKET"]
        self.port = None if args.transport == "unix" else int(kv["LMTP_PORT"])
        self.address = "unix:" + self.sock if self.port is None else "127.0.0.1:%d" % self.port
        self.workers = args.workers
        self.stats = {}

    def message_files(self):
        if self.kind == "dovecot":
            root = os.path.join(self.dir, "mail")
            for user in os.listdir(root) if os.path.isdir(root) else ():
                for sub in ("new", "cur"):
                    d = os.path.join(root, user, "Maildir", sub)
                    if os.path.isdir(d):
                        for name in os.listdir(d):
                            yield os.path.join(d, name)
        else:
            for d, _, files in os.walk(os.path.join(self.dir, "spool")):
                for name in files:
                    if name.endswith(".") and name[:-1].isdigit():
                        yield os.path.join(d, name)

    def deliveries(self):
        out = []
        for path in self.message_files():
            try:
                t = os.stat(path).st_mtime
                with open(path, "rb") as f:
                    head = f.read(8192)
            except OSError:
                continue  # renamed new/ -> cur/ meanwhile
            ends = [i for i in (head.find(b"\r\n\r\n"), head.find(b"\n\n")) if i >= 0]
            head = head[:min(ends, default=len(head))]  # Dovecot stores LF, Cyrus CRLF
            # The last of our Received fields is the first hop: the edge gateway (a
            # concentrator in front of the store adds its own above it).
            found = list(POSTERN_RECEIVED.finditer(head))
            m = found[-1] if found else None
            mid = MESSAGE_ID.search(head)
            out.append((t, m.group(1).decode() if m else "?", mid.group(1).decode() if mid else "-",
                        m.group(2).decode() if m else "?"))
        return out

    def finish(self):
        d = self.deliveries()
        subprocess.run(["bash", self.script, "stop", self.dir], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=False)
        STORE_DIRS.remove((self.script, self.dir))
        return d


class ConnSampler(threading.Thread):
    """Connections to the store every 50 ms from /proc/net/{tcp,unix} (what
    `ss -t`/`ss -x` read): accepted ones, and ones still waiting in the listen
    backlog (no socket inode yet: no process has accept()ed them)."""

    def __init__(self, store):
        super().__init__(daemon=True)
        self.store = store
        self.samples = []  # (t, accepted, backlog)
        self.halt = threading.Event()

    def count(self):
        acc = backlog = 0
        if self.store.port is None:
            with open("/proc/net/unix") as f:
                next(f)
                for line in f:
                    p = line.split()
                    # Num RefCount Protocol Flags Type St Inode Path
                    if len(p) == 8 and p[7] == self.store.sock and p[3] != "00010000":
                        if p[5] == "03" and p[6] != "0":
                            acc += 1
                        elif p[5] in ("02", "03"):
                            backlog += 1
        else:
            local = "0100007F:%04X" % self.store.port
            with open("/proc/net/tcp") as f:
                next(f)
                for line in f:
                    p = line.split()
                    if p[1] == local and p[3] == "01":
                        if p[9] == "0":
                            backlog += 1
                        else:
                            acc += 1
        return acc, backlog

    def run(self):
        while not self.halt.wait(0.05):
            acc, backlog = self.count()
            self.samples.append((time.time(), acc, backlog))


# --------------------------------------------------------------------------
# gateways

METRIC_LINE = re.compile(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$")
LABEL = re.compile(r'(\w+)="([^"]*)"')


def scrape(port):
    """/metrics as {name: [(labels, value)]}, or None."""
    try:
        with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=1.0) as r:
            text = r.read().decode()
    except (OSError, ValueError):
        return None
    out = {}
    for line in text.splitlines():
        m = METRIC_LINE.match(line)
        if m:
            out.setdefault(m.group(1), []).append((dict(LABEL.findall(m.group(2) or "")),
                                                   float(m.group(3))))
    return out


def mval(m, name, **labels):
    if not m:
        return 0.0
    return sum(v for lab, v in m.get(name, ()) if all(lab.get(k) == w for k, w in labels.items()))


class Gateway:
    def __init__(self, wd, name, node_id, binary, store_addr, max_connections, store_extra,
                 listener=None):
        self.name = name
        self.binary = binary
        self.dir = os.path.join(wd, name)
        os.makedirs(os.path.join(self.dir, "spool"))
        self.smtp_port = free_port()
        self.metrics_port = free_port()
        self.cfg = os.path.join(self.dir, "postern.yaml")
        extra = "".join("    %s\n" % line for line in store_extra.splitlines()) if store_extra else ""
        with open(self.cfg, "w") as f:
            f.write("""hostname: %(name)s
node_id: %(node)d
spool:
  path: %(dir)s/spool
metrics:
  address: 127.0.0.1:%(mport)d
listeners:
%(listener)sstores:
  - name: store
    kind: lmtp
    address: %(store)s
    max_connections: %(maxc)d
%(extra)sroutes:
  domains:
    %(domain)s: { store: store }
""" % dict(name=name, node=node_id, dir=self.dir, mport=self.metrics_port, store=store_addr,
           maxc=max_connections, extra=extra, domain=DOMAIN,
           listener=listener or ("  - name: smtp\n    address: 127.0.0.1:%d\n    protocol: smtp\n"
                                 % self.smtp_port)))
        r = subprocess.run([binary, "check-config", "--config", self.cfg], capture_output=True,
                           text=True, check=False)
        if r.returncode != 0:
            raise RuntimeError("%s check-config: %s" % (binary, (r.stdout + r.stderr).strip()))
        self.proc = None
        self.last = None      # last good scrape of the running process
        self.finals = []      # last scrape of each earlier incarnation (killed)

    def start(self):
        env = dict(os.environ, POSTERN_LOG=os.environ.get("POSTERN_LOG", "info"))
        self.proc = start([self.binary, "run", "--config", self.cfg],
                          open(os.path.join(self.dir, "postern.log"), "a"), env=env)
        if not wait_until(self.greets, 15, 0.1):
            raise RuntimeError("%s did not start (see %s/postern.log)" % (self.name, self.dir))

    def greets(self):
        try:
            with socket.create_connection(("127.0.0.1", self.smtp_port), timeout=1) as s:
                ok = s.recv(512).startswith(b"220")
                s.sendall(b"QUIT\r\n")
                return ok and scrape(self.metrics_port) is not None
        except OSError:
            return False

    def kill9(self):
        self.proc.kill()
        self.proc.wait()
        PROCS.remove(self.proc)
        self.finals.append(self.last)
        self.last = None

    def final_scrape(self):
        m = scrape(self.metrics_port)
        if m:
            self.last = m

    def total(self, name, **labels):
        """A counter summed over every incarnation of the process."""
        return sum(mval(m, name, **labels) for m in self.finals + [self.last])


class Concentrator(Gateway):
    """A postern beside the store: an LMTP listener on a unix socket in `mode: proxy`
    (cut-through), relaying every transaction to the store through one window. The edge
    gateways deliver to it instead of to the store."""

    def __init__(self, wd, binary, store_addr, max_connections, store_extra):
        self.sock = os.path.join(wd, "conc", "lmtp.sock")
        listener = ("  - name: lmtp\n    address: unix:%s\n    protocol: lmtp\n    mode: proxy\n"
                    % self.sock)
        super().__init__(wd, "conc", 99, binary, store_addr, max_connections, store_extra,
                         listener=listener)
        self.smtp_port = None

    def greets(self):
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(1)
                s.connect(self.sock)
                ok = s.recv(512).startswith(b"220")
                s.sendall(b"QUIT\r\n")
                return ok and scrape(self.metrics_port) is not None
        except OSError:
            return False


class MetricsPoller(threading.Thread):
    """Each gateway's /metrics every 0.5 s: window and pooled connections (the
    binary may refresh these gauges less often: today's every 5 s)."""

    def __init__(self, gateways):
        super().__init__(daemon=True)
        self.gateways = gateways
        self.samples = {g.name: [] for g in gateways}  # name -> [(t, {key: value})]
        self.halt = threading.Event()

    def run(self):
        while not self.halt.wait(0.5):
            for g in self.gateways:
                m = scrape(g.metrics_port)
                if m is None:
                    continue
                g.last = m
                self.samples[g.name].append((time.time(), {
                    "window": mval(m, "postern_store_window"),
                    "baseline": mval(m, "postern_store_latency_baseline_seconds"),
                    "in_use": mval(m, "postern_store_connections", state="in_use"),
                    "idle": mval(m, "postern_store_connections", state="idle"),
                }))

    def drained(self):
        """Every gateway answered since the last check and has no message left
        (postern_queue_messages is live; the per-store gauges lag by seconds)."""
        return all(g.last is not None and mval(g.last, "postern_queue_messages") == 0
                   for g in self.gateways)


# --------------------------------------------------------------------------
# load

class SmtpSource:
    def __init__(self, wd, gw, tag, args, messages):
        self.argv = ["smtp-source", "-s", str(args.sessions), "-m", str(messages), "-N",
                     "-l", str(args.size), "-f", "sender@example.org",
                     "-t", "%s@%s" % (tag, DOMAIN), "127.0.0.1:%d" % gw.smtp_port]
        if args.pace:
            self.argv[1:1] = ["-w", str(args.pace)]
        self.out = os.path.join(wd, "load-%s.out" % gw.name)
        self.proc = None
        self.t_end = None

    def start(self):
        self.proc = start(self.argv, open(self.out, "w"))

    def done(self):
        if self.proc.poll() is not None and self.t_end is None:
            self.t_end = time.time()
            PROCS.remove(self.proc)
        return self.proc.poll() is not None

    def abort(self):
        if not self.done():
            stop(self.proc)
            self.t_end = time.time()

    def errors(self):
        if self.proc.returncode:
            return open(self.out).read().strip()[-200:] or "exit %d" % self.proc.returncode
        return ""


class AckingSender:
    """SMTP load for one gateway that records which recipients got a 250
    (smtp-source cannot say), reconnecting while the gateway is down. Paced
    at `rate` messages/s so that a kill lands while mail is still arriving."""

    def __init__(self, gw, tag, args, messages, deadline, rate):
        self.gw, self.tag, self.messages, self.deadline = gw, tag, messages, deadline
        self.rate = rate
        self.t0 = None
        self.body = "X" * 76 + "\r\n"
        self.body *= max(1, args.size // len(self.body))
        self.lock = threading.Lock()
        self.next = 1
        self.acked = []
        self.failures = 0
        self.threads = [threading.Thread(target=self.worker, daemon=True) for _ in range(args.sessions)]
        self.t_end = None

    def start(self):
        self.t0 = time.time()
        for t in self.threads:
            t.start()

    def connect(self):
        while time.time() < self.deadline:
            try:
                c = smtplib.SMTP("127.0.0.1", self.gw.smtp_port, timeout=10)
                c.ehlo("bench")
                return c
            except (OSError, smtplib.SMTPException):
                time.sleep(0.05)
        return None

    def worker(self):
        conn = None
        while time.time() < self.deadline:
            with self.lock:
                n = self.next
                if n > self.messages:
                    break
                self.next += 1
            time.sleep(max(0.0, self.t0 + (n - 1) / self.rate - time.time()))
            conn = conn or self.connect()
            if conn is None:
                break
            rcpt = "%d%s@%s" % (n, self.tag, DOMAIN)
            # Date and Message-Id as every message has (RFC 5322 3.6): Cyrus's duplicate
            # suppression keys on both, and adds a Date of its own to a message without one.
            msg = ("From: <sender@example.org>\r\nTo: <%s>\r\nDate: %s\r\n"
                   "Message-Id: <%d.%s@bench.invalid>\r\nSubject: %d\r\n\r\n%s"
                   % (rcpt, email.utils.formatdate(), n, self.tag, n, self.body))
            try:
                conn.sendmail("sender@example.org", [rcpt], msg)
                with self.lock:
                    self.acked.append(rcpt)
            except (OSError, smtplib.SMTPException):
                with self.lock:
                    self.failures += 1
                conn = None
        if conn is not None:
            try:
                conn.quit()
            except (OSError, smtplib.SMTPException):
                pass

    def done(self):
        alive = any(t.is_alive() for t in self.threads)
        if not alive and self.t_end is None:
            self.t_end = time.time()
        return not alive

    def abort(self):
        self.deadline = 0
        for t in self.threads:
            t.join(15)
        self.done()

    def errors(self):
        return "%d failed sends (gateway down)" % self.failures if self.failures else ""


# --------------------------------------------------------------------------
# one phase: gateways, load, wait for the drain

def run_phase(wd, store, binary, args, names, max_connections, messages, store_extra,
              kill_at=None, ack_rate=None, concentrator=False, edge_extra=""):
    """Start gateways `names`, load each with `messages`, wait until every one
    has delivered everything (or --timeout), stop them. Returns what happened.
    kill_at: the first gateway, loaded by an AckingSender at ack_rate, is
    killed -9 that many seconds after the load starts, and restarted."""
    conc = None
    target = store.address
    if concentrator:
        conc = Concentrator(wd, binary, store.address, max_connections, store_extra)
        conc.start()
        target = "unix:" + conc.sock
    gw_extra = store_extra
    if concentrator and edge_extra:
        gw_extra = "\n".join(x for x in (store_extra, edge_extra) if x)
    gws = [Gateway(wd, n, i + 1, binary, target, max_connections, gw_extra)
           for i, n in enumerate(names)]
    for g in gws:
        g.start()
    conns, poller = ConnSampler(store), MetricsPoller(gws)
    conns.start()
    poller.start()
    t_load = time.time()
    deadline = t_load + args.timeout
    loads = []
    for i, g in enumerate(gws):
        tag = g.name.replace("gw", "g")
        if kill_at is not None and i == 0:
            loads.append(AckingSender(g, tag, args, messages, deadline, ack_rate))
        else:
            loads.append(SmtpSource(wd, g, tag, args, messages))
    for ld in loads:
        ld.start()
    killed = None
    drained = False
    while time.time() < deadline:
        time.sleep(0.2)
        if kill_at is not None and killed is None and time.time() >= t_load + kill_at:
            g = gws[0]
            killed = {"t": time.time() - t_load}
            g.kill9()
            log("killed %s -9" % g.name)
            time.sleep(1.0)
            g.start()
            killed["restarted"] = time.time() - t_load
        if all(ld.done() for ld in loads):
            for g in gws:
                g.last = None
            time.sleep(0.6)  # a fresh scrape of every gateway
            if poller.drained():
                drained = True
                break
    for ld in loads:
        ld.abort()
    for g in gws:
        g.final_scrape()
    t_stop = time.time()  # deliveries after this (gateways shutting down) do not count
    stop(*[g.proc for g in gws])
    if conc is not None:
        conc.final_scrape()
        stop(conc.proc)
    conns.halt.set()
    poller.halt.set()
    conns.join()
    poller.join()
    return dict(gateways=gws, loads=loads, conns=conns.samples, metrics=poller.samples,
                t_load=t_load, t_stop=t_stop, drained=drained, killed=killed)


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


def report(name, results, binaries, repeat):
    scn = SCENARIOS[name]
    print("\n== scenario %s: %s%s" % (name, scn["what"], " (median of %d)" % repeat if repeat > 1 else ""))
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


def main():
    ap = argparse.ArgumentParser(description="reverse-mode benchmark (see README.md)")
    ap.add_argument("--scenario", action="append", help="a,a2,b,c,d,e (repeatable) [a,a2,b,c]")
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
        report(s, results[s], binaries, args.repeat)


if __name__ == "__main__":
    main()
