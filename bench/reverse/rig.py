"""rig.py -- the parts of a reverse-mode run (bench/reverse/run.py): the store (the fake
capacity_store.py here, or Dovecot / Cyrus through tests/stores/*.sh), postern gateways with
their own spools and ports, a concentrator, the load (smtp-source, or a Python sender that
records every 250), samplers of the store's connections and the gateways' /metrics, and
one phase: gateways up, load, wait for the drain.

Every process started here is registered and stopped by cleanup() (normal exit, error or
signal). Python 3 standard library only.
"""
import email.utils
import json
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
STORES_DIR = os.path.join(HERE, "..", "..", "tests", "stores")
DOMAIN = "example.com"

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
