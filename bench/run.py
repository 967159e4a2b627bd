#!/usr/bin/env python3
"""pgtwist vs PgBouncer vs direct PostgreSQL: pgbench throughput and idle-client memory.

    PYTHONPATH=. python bench/run.py [--scenario NAME ...] [--rounds 3] [--duration 10]
                                     [--pool-mode session|transaction] [--clients N ...]
                                     [--markdown] [--require-pgbouncer] [--json FILE]

Everything runs on this machine: one throwaway PostgreSQL cluster (pgtwist.tools.localcluster),
one PgBouncer and one pgtwist in front of it with equivalent settings, and pgbench (or, for
idle-clients, a helper process holding raw authenticated sockets). bench/README.md explains
the method. Everything started here is stopped on exit, Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import errno
import hashlib
import json
import math
import os
import platform
import pwd
import re
import resource
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# `twistd` with the pgbalance plugin of the pgtwist under test (argv[1]: its source tree). The
# plugin installed in the venv (twisted/plugins/pgbalance.py) would otherwise shadow an exported
# revision's, and name a module that revision does not have (pgtwist.tap moved to pgtwist.service.tap).
TWISTD_FROM_SOURCE = """
import sys
from twisted import plugin
from twisted.application import app
from twisted.scripts.twistd import run
source = sys.argv.pop(1)
def plugins(interface, package=None):
    for found in plugin.getPlugins(interface, package):
        if getattr(found, "tapname", None) != "pgbalance":
            yield found
    here = {}
    with open(source + "/twisted/plugins/pgbalance.py") as f:
        exec(compile(f.read(), f.name, "exec"), here)
    yield here["pgbalance"]
app.ServerOptions._getPlugins = staticmethod(plugins)
sys.argv[0] = "twistd"
run()
"""

# The idle-client helper imports pgtwist from the frozen copy its PYTHONPATH names, not the tree.
if str(REPO) not in sys.path and sys.argv[1:2] != ["--_idle-worker"]:
    sys.path.insert(0, str(REPO))

TARGETS = ("direct", "pgbouncer", "pgtwist")
DBNAME = "pgbench"
APP_USER = "app"
MONITOR_USER, MONITOR_PASSWORD = "bench_monitor", "bench-monitor-secret"  # --replicas: the health probes' login
POOL_SIZE = 20  # default pool_size / default_pool_size (--pool-size)
DIRECT_MAX_CLIENTS = 380  # the bench primary's max_connections is 400: more clients skip `direct`
MAX_CLIENT_CONN = 10000


@dataclass(frozen=True)
class Scenario:
    name: str
    args: tuple[str, ...]  # pgbench options besides -c/-j/-T
    what: str


SCENARIOS = {
    "select": Scenario("select", ("-S", "-M", "simple"), "pgbench -S, simple query protocol"),
    "select-prepared": Scenario("select-prepared", ("-S", "-M", "prepared"), "pgbench -S -M prepared"),
    "select-extended": Scenario("select-extended", ("-S", "-M", "extended"), "pgbench -S -M extended (unnamed statements)"),
    "churn": Scenario("churn", ("-S", "-M", "simple", "-C"), "pgbench -S -C: a new connection (and login) per transaction"),
    # Writes in explicit transactions: BEGIN, three UPDATEs, a SELECT, an INSERT, END (7 round trips).
    # Rows conflict on the branch table (scale rows): clients beyond the scale wait on locks in
    # PostgreSQL, as they would directly; the pooler's CPU per transaction is still comparable.
    "tpcb": Scenario("tpcb", ("-M", "simple"), "pgbench TPC-B-like (default script): writes in BEGIN..END"),
    "tpcb-prepared": Scenario("tpcb-prepared", ("-M", "prepared"), "pgbench TPC-B-like, -M prepared"),
}
MEMORY_SCENARIOS = ("idle-clients",)
DEFAULT_SCENARIOS = ("select",)


class BenchError(Exception):
    pass


def say(*parts: object) -> None:
    print("bench:", *parts, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- processes


class Processes:
    """Every long-lived child we start; stop_all() terminates them (bounded waits, SIGKILL last)."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], *, run_as: pwd.struct_passwd | None = None, **kwargs) -> subprocess.Popen:
        if run_as is not None:
            kwargs.update(user=run_as.pw_uid, group=run_as.pw_gid,
                          extra_groups=os.getgrouplist(run_as.pw_name, run_as.pw_gid))
        # Own session: a Ctrl-C on the terminal reaches only us, and we stop children in order.
        proc = subprocess.Popen(argv, start_new_session=True, **kwargs)
        self.procs.append((name, proc))
        return proc

    def stop(self, proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 15) -> int | None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                # Each child leads its own process group (start_new_session): take its children too
                # (Pgpool-II forks workers).
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        self.procs = [(n, p) for n, p in self.procs if p is not proc]
        return proc.returncode

    def stop_all(self) -> None:
        for _name, proc in reversed(list(self.procs)):
            self.stop(proc)


def work_dir(prefix: str, what: str) -> tuple[pwd.struct_passwd | None, Path]:
    """(the OS user to run PostgreSQL and *what* as when we are root, a fresh work dir they can use)."""
    run_as = None
    if os.geteuid() == 0:
        try:
            run_as = pwd.getpwnam("postgres")
        except KeyError:
            raise BenchError(f"running as root but there is no `postgres` OS user to run {what} as") from None
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    if run_as is not None:
        os.chown(tmp, run_as.pw_uid, run_as.pw_gid)
    say(f"work dir {tmp}")
    return run_as, tmp


def wait_port(host: str, port: int, proc: subprocess.Popen, what: str, log: Path | None, timeout: float = 30,
              stderr: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with status {proc.returncode} before listening"
                             + log_tail(log) + log_tail(stderr))
        with socket.socket() as s:
            s.settimeout(1)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.1)
    raise BenchError(f"{what} did not listen on {host}:{port} within {timeout:g}s" + log_tail(log))


def log_tail(path: Path | None, lines: int = 20) -> str:
    if path is None:
        return ""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    tail = "\n".join(text.splitlines()[-lines:])
    return f"\n--- tail of {path} ---\n{tail}" if tail else ""


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise BenchError(f"no VmRSS for pid {pid}")


def process_tree(pid: int) -> list[int]:
    """*pid* and its children (pgtwist's workers under `workers = N`; Pgpool-II's forks)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [pid, *(int(c) for c in f.read().split())]
    except (OSError, ValueError):
        return [pid]


def tree_cpu_seconds(pid: int) -> float:
    """utime + stime of *pid* and its children: the whole pooler, however many processes it runs."""
    return tree_cpu_times(pid)[0]


def tree_cpu_times(pid: int) -> tuple[float, float]:
    """(utime + stime, stime) of *pid* and its children: all its CPU, and the kernel's share of
    it (system calls, and the TCP work a loopback send does for its receiver)."""
    times = [cpu_times(p) for p in process_tree(pid)]
    return sum(t[0] for t in times), sum(t[1] for t in times)


def cpu_times(pid: int) -> tuple[float, float]:
    """(utime + stime, stime) of one process (not its children)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan"), float("nan")
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick, int(fields[12]) / tick


def run_delay_seconds(pid: int) -> float:
    """Time *pid*'s threads spent runnable but waiting for a CPU (/proc/PID/schedstat, field 2)."""
    total = 0.0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return float("nan")
    return total


def loadavg() -> float:
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if target > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return target
    return soft


def client_env(password: str) -> dict[str, str]:
    """Environment for libpq clients: nothing inherited from PG*, the password only here."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(PGPASSWORD=password, PGSSLMODE="disable", PGCONNECT_TIMEOUT="10",
               PGPASSFILE="/nonexistent/pgpass", LC_ALL="C")
    return env


def find_daemon(name: str) -> str | None:
    """A server program on PATH, or in /usr/sbin where Debian puts pgbouncer and pgpool (off a user's PATH)."""
    found = shutil.which(name)
    if found:
        return found
    path = f"/usr/sbin/{name}"
    return path if os.access(path, os.X_OK) else None


def first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


# --------------------------------------------------------------------------- targets


@dataclass
class Target:
    name: str
    host: str
    port: int
    proc: subprocess.Popen | None = None  # the pooler process (None for direct)
    log: Path | None = None
    note: str = ""


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.procs = Processes()
        self.cluster = None
        self.node = None
        self.tmp: Path | None = None
        self.run_as: pwd.struct_passwd | None = None
        self.pgbouncer_bin = find_daemon("pgbouncer")
        self.verifier = ""
        self.password = ""
        self._instance = 0
        self.source = REPO  # where the pgtwist under test is imported from
        self.source_digest = ""

    def export_source(self, rev: str | None) -> None:
        """Freeze the pgtwist under test: `git archive REV`, or a copy of the working tree (rev None).

        The working tree may be edited while a run is under way; a copy taken at the start keeps
        every pgtwist process and the idle-client helper of one run on the same code."""
        dest = self.tmp / "src"
        dest.mkdir()
        if rev is None:
            skip = shutil.ignore_patterns("__pycache__", "*.pyc", "dropin.cache")
            shutil.copytree(REPO / "pgtwist", dest / "pgtwist", ignore=skip)
            shutil.copytree(REPO / "twisted", dest / "twisted", ignore=skip)
            say(f"pgtwist from the working tree (copied to {dest})")
        else:
            archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", rev, "pgtwist", "twisted"],
                                     capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
            if archive.returncode != 0:
                raise BenchError(f"git archive {rev} failed: {archive.stderr.decode(errors='replace').strip()}")
            subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True, timeout=60)
            say(f"pgtwist from git revision {rev} (exported to {dest})")
        self.source = dest
        self.source_digest = source_digest(dest)

    # -- setup ---------------------------------------------------------------------------

    def setup(self) -> None:
        from pgtwist.tools.localcluster import LocalCluster

        self.run_as, self.tmp = work_dir("pgtwist-bench-", "PgBouncer")
        self.export_source(self.args.pgtwist_rev)
        t0 = time.monotonic()
        self.cluster = LocalCluster.create(
            replicas=self.args.replicas,
            app_user=APP_USER,
            app_database=DBNAME,
            settings={"max_connections": "400", "shared_buffers": "256MB"},
        )
        self.node = self.cluster.nodes[0]
        self.password = self.cluster.app_password
        say(f"PostgreSQL primary on {self.node.addr} ({time.monotonic() - t0:.1f}s)")
        self.verifier = self.cluster.psql(
            self.node, f"SELECT rolpassword FROM pg_authid WHERE rolname = '{APP_USER}'"
        )
        if not self.verifier.startswith("SCRAM-SHA-256$"):
            raise BenchError("the app user's password is not stored as a SCRAM-SHA-256 verifier")
        t0 = time.monotonic()
        argv = ["pgbench", "-i", "-q", "-s", str(self.args.scale), *self.conn_args(self.node.host, self.node.port)]
        say(f"{' '.join(argv)}")
        proc = self.procs.start("pgbench -i", argv, env=client_env(self.password),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            out, _ = proc.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            self.procs.stop(proc, signal.SIGKILL)
            raise BenchError("pgbench -i did not finish within 900s") from None
        finally:
            self.procs.stop(proc)
        if proc.returncode != 0:
            raise BenchError(f"pgbench -i failed (exit {proc.returncode}):\n{out[-3000:]}")
        say(f"pgbench -i -s {self.args.scale} done ({time.monotonic() - t0:.1f}s)")
        if self.args.replicas:
            # pgtwist alone gets the replicas (read/write split, read-your-writes); PgBouncer and
            # `direct` keep the primary. The probes need a secret that can answer a node on its own.
            self.cluster.psql(self.node, f"CREATE ROLE {MONITOR_USER} LOGIN PASSWORD '{MONITOR_PASSWORD}' IN ROLE pg_monitor")
            self.cluster.wait_replicas_caught_up(300)
            say(f"{self.args.replicas} streaming replica(s) caught up: "
                + ", ".join(n.addr for n in self.cluster.nodes[1:]))

    def conn_args(self, host: str, port: int) -> list[str]:
        return ["-h", host, "-p", str(port), "-U", APP_USER, DBNAME]

    def _owned_file(self, name: str, text: str, mode: int = 0o600) -> Path:
        path = self.tmp / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        if self.run_as is not None:
            os.chown(path, self.run_as.pw_uid, self.run_as.pw_gid)
        return path

    def start_pgbouncer(self, pool_mode: str) -> Target:
        from pgtwist.tools.localcluster import free_port

        self._instance += 1
        tag = f"pgbouncer{self._instance}"
        port = free_port()
        # trust: PgBouncer needs the plain password to log in to the server itself.
        secret = self.verifier if self.args.auth == "scram" else self.password
        self._owned_file(f"{tag}.users", f'"{APP_USER}" "{secret}"\n')
        log = self.tmp / f"{tag}.log"
        ini = self._owned_file(
            f"{tag}.ini",
            "[databases]\n"
            f"{DBNAME} = host={self.node.host} port={self.node.port} dbname={DBNAME}\n"
            "\n[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {port}\n"
            "unix_socket_dir =\n"
            f"auth_type = {'scram-sha-256' if self.args.auth == 'scram' else 'trust'}\n"
            f"auth_file = {self.tmp / (tag + '.users')}\n"
            f"pool_mode = {pool_mode}\n"
            f"default_pool_size = {self.args.pool_size}\n"
            f"max_client_conn = {MAX_CLIENT_CONN}\n"
            "server_reset_query = DISCARD ALL\n"
            f"logfile = {log}\n"
            "pidfile =\n"
            # Both poolers equally quiet: no log line per connect / disconnect.
            "log_connections = 0\n"
            "log_disconnections = 0\n"
            "listen_backlog = 4096\n",
        )
        proc = self.procs.start(tag, [self.pgbouncer_bin, str(ini)], run_as=self.run_as, cwd=self.tmp,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port("127.0.0.1", port, proc, "PgBouncer", log)
        return Target("pgbouncer", "127.0.0.1", port, proc, log)

    def start_pgtwist(self, pool_mode: str, profile: Path | None = None) -> Target:
        from pgtwist.tools.localcluster import free_port

        self._instance += 1
        tag = f"pgtwist{self._instance}"
        workers = '"auto"' if self.args.workers == "auto" else self.args.workers
        port = free_port()
        conf = self._owned_file(
            f"{tag}.toml",
            f'listen = "127.0.0.1:{port}"\n'
            f'pool_mode = "{pool_mode}"\n'
            f"pool_size = {self.args.pool_size}\n"
            f"max_client_conn = {MAX_CLIENT_CONN}\n"
            f'auth_type = "{"scram-sha-256" if self.args.auth == "scram" else "trust"}"\n'
            'server_reset_query = "DISCARD ALL"\n'
            # As PgBouncer's log_connections / log_disconnections = 0 above (revisions that predate
            # the keys log no less: they are left out for them).
            + ("log_connections = false\nlog_disconnections = false\n" if self._knows("log_connections") else "")
            + (f"workers = {workers}\n" if self.args.workers != 1 else "")
            + (f'health_user = "{MONITOR_USER}"\n' if self.args.replicas else "")
            + f"\n[databases.{DBNAME}]\n"
            f'dbname = "{DBNAME}"\n'
            f"nodes = [{', '.join(repr(n.addr) for n in self.cluster.nodes)}]\n"
            f"\n[users.{APP_USER}]\n"
            f"password = '{self.verifier if self.args.auth == 'scram' else self.password}'\n"
            + (f"\n[users.{MONITOR_USER}]\npassword = '{MONITOR_PASSWORD}'\n" if self.args.replicas else ""),
        )
        log = self.tmp / f"{tag}.log"
        # `python -m twisted.scripts.twistd` does nothing (that module has no __main__ block).
        argv = [sys.executable, "-c", TWISTD_FROM_SOURCE, str(self.source), "-n", "--pidfile=", f"--logfile={log}"]
        if profile is not None:
            argv += [f"--profile={profile}", "--profiler=cprofile", "--savestats"]
        argv += ["pgbalance", "--config", str(conf)]
        env = dict(os.environ)
        others = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != REPO]
        env["PYTHONPATH"] = os.pathsep.join([str(self.source)] + others)
        stderr = self.tmp / f"{tag}.stderr"
        with open(stderr, "wb") as err:
            proc = self.procs.start(tag, argv, env=env, cwd=self.tmp, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=err)
        wait_port("127.0.0.1", port, proc, "pgtwist", log, stderr=stderr)
        notes = ["under cProfile"] if profile else []
        if self.args.workers != 1:
            # The supervisor's socket accepts before its workers run: wait for all of them, so
            # that no round measures a worker's start-up.
            n = self.args.workers if self.args.workers != "auto" else len(os.sched_getaffinity(0))
            deadline = time.monotonic() + 60
            while log.read_text(errors="replace").count(f"of {n} listening on") < n:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise BenchError(f"pgtwist's {n} workers did not all start:\n{log_tail(log)}")
                time.sleep(0.1)
            notes.append(f"workers = {self.args.workers} (CPU: the supervisor and every worker)")
        return Target("pgtwist", "127.0.0.1", port, proc, log, note="; ".join(notes))

    def _knows(self, key: str) -> bool:
        """Whether the pgtwist under test (maybe an older --pgtwist-rev) has config key *key*."""
        return f'"{key}"' in (self.source / "pgtwist" / "config.py").read_text()

    def stop_target(self, target: Target) -> None:
        if target.proc is not None:
            self.procs.stop(target.proc)

    # -- pgbench ---------------------------------------------------------------------------

    def pgbench(self, target: Target, scenario: Scenario, prepared_fallback: bool, clients: int) -> dict:
        args = list(scenario.args)
        note = target.note
        if prepared_fallback and target.name == "pgbouncer" and "prepared" in args:
            args[args.index("prepared")] = "extended"
            note = "-M extended (PgBouncer 1.18 cannot run -M prepared in transaction mode)"
        argv = ["pgbench", "-n", *args, "-c", str(clients), "-j", str(min(self.args.pgbench_jobs, clients)),
                "-T", str(self.args.duration), *self.conn_args(target.host, target.port)]
        cpu0, sys0 = tree_cpu_times(target.proc.pid) if target.proc else (float("nan"), float("nan"))
        wait0 = sum(map(run_delay_seconds, process_tree(target.proc.pid))) if target.proc else float("nan")
        t0 = time.monotonic()
        proc = self.procs.start("pgbench", argv, env=client_env(self.password), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = proc.communicate(timeout=self.args.duration + 120)
            timed_out = False
        except subprocess.TimeoutExpired:
            self.procs.stop(proc, signal.SIGINT)
            out, err, timed_out = "", "", True
        finally:
            self.procs.stop(proc)
        wall = time.monotonic() - t0
        cpu1, sys1 = tree_cpu_times(target.proc.pid) if target.proc else (float("nan"), float("nan"))
        cpu, kernel = cpu1 - cpu0, sys1 - sys0
        runq = (sum(map(run_delay_seconds, process_tree(target.proc.pid))) - wait0) if target.proc else float("nan")
        result = parse_pgbench(out)
        result.update(target=target.name, scenario=scenario.name, clients=clients, returncode=proc.returncode, note=note,
                      argv=" ".join(argv), pooler_cpu_s=cpu, pooler_sys_s=kernel, pooler_runq_wait_s=runq, wall_s=wall,
                      loadavg_after=loadavg())
        return judge_pgbench(result, proc, timed_out, self.args.duration, target.name, target.proc, out, err)

    # -- idle clients --------------------------------------------------------------------

    def idle_clients(self, target: Target, n: int) -> dict:
        """Hold *n* authenticated idle clients on *target*; RSS of the pooler before and after."""
        worker_env = client_env(self.password)
        worker_env["PYTHONPATH"] = str(self.source)

        def open_clients(count: int, timeout: float) -> tuple[subprocess.Popen, dict]:
            argv = [sys.executable, str(Path(__file__).resolve()), "--_idle-worker", target.host, str(target.port),
                    APP_USER, DBNAME, str(count), str(timeout)]
            proc = self.procs.start("idle clients", argv, env=worker_env, stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            deadline = time.monotonic() + timeout + 30
            report = None
            sel = selectors.DefaultSelector()
            sel.register(proc.stdout, selectors.EVENT_READ)
            try:
                while report is None and time.monotonic() < deadline:
                    if not sel.select(timeout=1):
                        if proc.poll() is not None:
                            break
                        continue
                    line = proc.stdout.readline()
                    if not line:
                        break
                    if line.startswith("{"):
                        report = json.loads(line)
            finally:
                sel.close()
            if report is None:
                err = ""
                if proc.poll() is not None:
                    err = proc.stderr.read()[-2000:]
                self.procs.stop(proc, signal.SIGKILL)
                raise BenchError(f"idle-client worker for {target.name} gave no report within {timeout + 30:g}s {err}")
            return proc, report

        # Warm up: the first login creates the pool and its first server connection.
        warm, warm_report = open_clients(1, 30)
        time.sleep(0.5)
        self.procs.stop(warm)
        time.sleep(1.0)
        before = sum(map(rss_bytes, process_tree(target.proc.pid)))
        cpu0 = tree_cpu_seconds(target.proc.pid)
        t0 = time.monotonic()
        proc, report = open_clients(n, self.args.idle_timeout)
        try:
            elapsed = time.monotonic() - t0
            time.sleep(2.0)  # let the pooler settle (deferred frees, buffers)
            after = sum(map(rss_bytes, process_tree(target.proc.pid)))
            cpu = tree_cpu_seconds(target.proc.pid) - cpu0
        finally:
            self.procs.stop(proc)  # the worker closes its sockets when stdin closes or on SIGTERM
        held = report["authenticated"]
        return {
            "target": target.name,
            "clients": n,
            "authenticated": held,
            "ready": report["ready"],
            "failed": report["failed"],
            "errors": report["errors"][:5],
            "rss_before": before,
            "rss_after": after,
            "bytes_per_client": (after - before) / held if held else None,
            "login_seconds": elapsed,
            "login_cpu_s": cpu,
            "warmup_ok": warm_report["ready"] == 1,
        }


# --------------------------------------------------------------------------- pgbench output

_TPS = re.compile(r"^tps = ([0-9.]+) \((without initial connection time|including reconnection times|excluding connections establishing|including connections establishing)\)", re.M)
_FAILED = re.compile(r"^number of failed transactions: (\d+)", re.M)
_PROCESSED = re.compile(r"^number of transactions actually processed: (\d+)", re.M)
_LATENCY = re.compile(r"^latency average = ([0-9.]+) ms", re.M)


def judge_pgbench(result: dict, proc, timed_out: bool, duration: int, target_name: str, target_proc, out: str, err: str) -> dict:
    """Add to a parsed pgbench *result* what went wrong ("problem", and the output's tail as "detail")."""
    problems = []
    if timed_out:
        problems.append(f"pgbench did not finish within {duration + 120}s")
    elif proc.returncode != 0:
        problems.append(f"pgbench exit {proc.returncode}")
    if result["failed"]:
        problems.append(f"{result['failed']} failed transactions")
    if result["tps"] is None and not timed_out:
        problems.append("no tps line in pgbench output")
    if target_proc is not None and target_proc.poll() is not None:
        problems.append(f"{target_name} exited with status {target_proc.returncode}")
    result["problem"] = "; ".join(problems)
    if problems:
        result["detail"] = (err.strip() or out.strip())[-1500:]
    return result


def parse_pgbench(out: str) -> dict:
    tps = _TPS.search(out)
    failed = _FAILED.search(out)
    processed = _PROCESSED.search(out)
    latency = _LATENCY.search(out)
    return {
        "tps": float(tps.group(1)) if tps else None,
        "tps_kind": tps.group(2) if tps else None,
        "failed": int(failed.group(1)) if failed else 0,
        "transactions": int(processed.group(1)) if processed else None,
        "latency_ms": float(latency.group(1)) if latency else None,
    }


# --------------------------------------------------------------------------- idle-client worker


def idle_worker(argv: list[str]) -> int:
    """Child process: open N authenticated connections, print a JSON report, hold them until stdin closes."""
    from pgtwist.auth import ScramClientExchange
    from pgtwist.wire import messages as m
    from pgtwist.wire import protocol as p
    from pgtwist.wire.framing import pop_message

    host, port, user, dbname, n, timeout = argv[0], int(argv[1]), argv[2], argv[3], int(argv[4]), float(argv[5])
    password = os.environ.get("PGPASSWORD", "")
    raise_nofile()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    window = 64  # logins in flight at once
    sel = selectors.DefaultSelector()
    startup = m.startup_message({"user": user, "database": dbname})
    state: dict[int, dict] = {}
    held: list[socket.socket] = []
    counts = {"authenticated": 0, "ready": 0, "failed": 0}
    errors: list[str] = []
    started = 0
    in_login = 0

    def fail(sock: socket.socket, why: str) -> None:
        nonlocal in_login
        st = state.pop(sock.fileno(), None)
        with contextlib.suppress(KeyError, ValueError):
            sel.unregister(sock)
        if st is not None and not st["auth"]:
            in_login -= 1
        if st is not None and st["auth"]:
            counts["authenticated"] -= 1
        counts["failed"] += 1
        if len(errors) < 20:
            errors.append(why)
        sock.close()

    def start_one() -> None:
        nonlocal started, in_login
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        rc = s.connect_ex((host, port))
        started += 1
        in_login += 1
        state[s.fileno()] = {"sock": s, "buf": bytearray(), "scram": None, "auth": False, "connected": False}
        if rc not in (0, errno.EINPROGRESS):
            fail(s, f"connect: {os.strerror(rc)}")
            return
        sel.register(s, selectors.EVENT_WRITE)

    def handle(sock: socket.socket, events: int) -> None:
        nonlocal in_login
        st = state.get(sock.fileno())
        if st is None:
            return
        if not st["connected"]:
            rc = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if rc:
                fail(sock, f"connect: {os.strerror(rc)}")
                return
            st["connected"] = True
            sock.sendall(startup)
            sel.modify(sock, selectors.EVENT_READ)
            return
        try:
            data = sock.recv(65536)
        except OSError as e:
            fail(sock, f"recv: {e}")
            return
        if not data:
            fail(sock, "closed by the pooler")
            return
        st["buf"] += data
        while (msg := pop_message(st["buf"], 1 << 20)) is not None:
            msg_type, body = msg
            if msg_type == p.AUTHENTICATION:
                code, payload = m.decode_authentication(body)
                if code == p.AUTH_SASL:
                    scram = st["scram"] = ScramClientExchange(password=password)
                    mech = scram.mechanism(m.decode_sasl_mechanisms(payload))
                    sock.sendall(m.sasl_initial_response(mech, scram.first()))
                elif code == p.AUTH_SASL_CONTINUE:
                    sock.sendall(m.password_message(st["scram"].handle_server_first(payload)))
                elif code == p.AUTH_SASL_FINAL:
                    st["scram"].handle_server_final(payload)
                elif code == p.AUTH_OK:
                    st["auth"] = True
                    counts["authenticated"] += 1
                    in_login -= 1
                else:
                    fail(sock, f"unsupported authentication request {code}")
                    return
            elif msg_type == p.ERROR_RESPONSE:
                fields = m.decode_fields(body)
                fail(sock, f"{fields.get('C')} {fields.get('M')}")
                return
            elif msg_type == p.READY_FOR_QUERY:
                counts["ready"] += 1
                held.append(sock)
                state.pop(sock.fileno(), None)
                sel.unregister(sock)
                return

    deadline = time.monotonic() + timeout
    last_progress = time.monotonic()
    while time.monotonic() < deadline:
        while started < n and in_login < window:
            start_one()
        if started >= n and in_login == 0:
            # Everyone is authenticated (or failed); give ReadyForQuery a moment to arrive.
            if time.monotonic() - last_progress > 1.0:
                break
        before = counts["ready"] + counts["authenticated"]
        for key, events in sel.select(timeout=0.2):
            handle(key.fileobj, events)
        if counts["ready"] + counts["authenticated"] != before:
            last_progress = time.monotonic()
    report = {
        "authenticated": counts["authenticated"],
        "ready": counts["ready"],
        "failed": counts["failed"] + sum(1 for st in state.values() if not st["auth"]),
        "errors": errors,
    }
    print(json.dumps(report), flush=True)
    sys.stdin.read()  # hold everything until the parent closes our stdin
    return 0


# --------------------------------------------------------------------------- reporting


def fmt_tps(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def fmt_ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{a / b:.2f}"


def summarize(results: list[dict], target: str) -> dict:
    runs = [r for r in results if r["target"] == target]
    good = [r["tps"] for r in runs if not r["problem"] and r["tps"] is not None]
    cpu = [r["pooler_cpu_s"] / r["wall_s"] for r in runs if r["pooler_cpu_s"] == r["pooler_cpu_s"] and r["wall_s"]]
    # Pooler CPU per transaction: steadier than tps on a shared box (a starved pooler is slow, not costly).
    runq = [r["pooler_runq_wait_s"] / r["wall_s"] for r in runs
            if r["pooler_runq_wait_s"] == r["pooler_runq_wait_s"] and r["wall_s"]]
    us = [1e6 * r["pooler_cpu_s"] / r["transactions"] for r in runs
          if r["pooler_cpu_s"] == r["pooler_cpu_s"] and r["transactions"] and not r["problem"]]
    sys_us = [1e6 * r["pooler_sys_s"] / r["transactions"] for r in runs
              if not math.isnan(r.get("pooler_sys_s", math.nan)) and r["transactions"] and not r["problem"]]
    return {
        "runs": len(runs),
        "failed_runs": sum(1 for r in runs if r["problem"]),
        "median": statistics.median(good) if good else None,
        "min": min(good) if good else None,
        "max": max(good) if good else None,
        "all": [r["tps"] for r in runs],
        "cpu": statistics.median(cpu) if cpu else None,
        "cpu_us_per_tx": statistics.median(us) if us else None,
        "sys_us_per_tx": statistics.median(sys_us) if sys_us else None,
        "runq": statistics.median(runq) if runq else None,
        "notes": sorted({r["note"] for r in runs if r["note"]}),
        "problems": [r["problem"] for r in runs if r["problem"]],
    }


def print_tps_table(scenario: Scenario, mode: str, results: list[dict], targets: list[str], args, clients: int) -> dict:
    summaries = {t: summarize(results, t) for t in targets}
    print()
    print(f"== {scenario.name} [{mode} mode]: {scenario.what}; -c {clients} -j {min(args.pgbench_jobs, clients)} "
          f"-T {args.duration}, pool {args.pool_size}, {args.auth} auth, {args.rounds} round(s)"
          + (f"; pgtwist also has {args.replicas} replica(s)" if args.replicas else ""))
    print(f"{'target':<10} {'median tps':>11} {'min':>9} {'max':>9}  {'pooler CPU':>10} {'CPU us/tx':>9} "
          f"{'of it sys':>9} {'runq wait':>9}  runs (tps per round)")
    for t in targets:
        s = summaries[t]
        per_run = ", ".join(fmt_tps(x) for x in s["all"])
        cpu = "-" if s["cpu"] is None else f"{100 * s['cpu']:.0f}%"
        us = "-" if s["cpu_us_per_tx"] is None else f"{s['cpu_us_per_tx']:.1f}"
        kernel = "-" if s["sys_us_per_tx"] is None else f"{s['sys_us_per_tx']:.1f}"
        runq = "-" if s["runq"] is None else f"{100 * s['runq']:.0f}%"
        flag = f"  FAILED {s['failed_runs']}/{s['runs']}" if s["failed_runs"] else ""
        print(f"{t:<10} {fmt_tps(s['median']):>11} {fmt_tps(s['min']):>9} {fmt_tps(s['max']):>9}  {cpu:>10} {us:>9} "
              f"{kernel:>9} {runq:>9}  [{per_run}]{flag}")
        for note in s["notes"]:
            print(f"{'':<10} note: {note}")
        for problem in s["problems"][:3]:
            print(f"{'':<10} problem: {problem}")
    med = {t: summaries[t]["median"] for t in targets}
    parts = []
    if "pgtwist" in med and "pgbouncer" in med:
        parts.append(f"pgtwist/pgbouncer = {fmt_ratio(med['pgtwist'], med['pgbouncer'])}")
    if "pgtwist" in med and "direct" in med:
        parts.append(f"pgtwist/direct = {fmt_ratio(med['pgtwist'], med['direct'])}")
    if "pgbouncer" in med and "direct" in med:
        parts.append(f"pgbouncer/direct = {fmt_ratio(med['pgbouncer'], med['direct'])}")
    if parts:
        print("ratios of medians: " + ", ".join(parts))
    return summaries


def print_memory_table(rows: list[dict]) -> None:
    print()
    print("== idle-clients: pooler RSS growth per idle authenticated client (VmRSS, fresh pooler per run)")
    print(f"{'target':<10} {'clients':>8} {'auth ok':>8} {'ready':>6} {'failed':>6} {'RSS before':>11} "
          f"{'RSS after':>11} {'bytes/client':>13} {'login s':>8}")
    for r in rows:
        bpc = "-" if r["bytes_per_client"] is None else f"{r['bytes_per_client']:,.0f}"
        print(f"{r['target']:<10} {r['clients']:>8} {r['authenticated']:>8} {r['ready']:>6} {r['failed']:>6} "
              f"{r['rss_before'] / 2**20:>9.1f}Mi {r['rss_after'] / 2**20:>9.1f}Mi {bpc:>13} {r['login_seconds']:>8.1f}")
        for e in r["errors"][:3]:
            print(f"{'':<10} error: {e}")
    by_n: dict[int, dict] = {}
    for r in rows:
        by_n.setdefault(r["clients"], {})[r["target"]] = r["bytes_per_client"]
    for n, d in by_n.items():
        if d.get("pgtwist") and d.get("pgbouncer"):
            print(f"{n} clients: pgtwist/pgbouncer bytes per client = {d['pgtwist'] / d['pgbouncer']:.1f}")
    if any(r["target"] == "pgtwist" and r["ready"] < r["authenticated"] for r in rows):
        print("note: 'ready' counts clients that got ReadyForQuery. In session mode pgtwist finishes a client's "
              "login only once a server connection is free, so past pool_size the clients sit authenticated but "
              "waiting; PgBouncer sends ReadyForQuery without a server.")


def source_digest(root: Path) -> str:
    """sha256 over the pgtwist sources under *root* (names and contents), first 12 hex digits."""
    digest = hashlib.sha256()
    for path in sorted((root / "pgtwist").rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def machine_info(pgbouncer_bin: str | None, rev: str | None = None) -> dict:
    from pgtwist.tools.localcluster import find_bindir

    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "unknown"
    with contextlib.suppress(OSError):
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    try:
        import twisted

        tw = twisted.__version__
    except Exception:
        tw = "unknown"
    git = first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=30).stdout.strip()
    try:
        bindir = find_bindir()
        postgres = first_line([str(bindir / "postgres"), "--version"])
    except Exception:
        postgres = "unknown"
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg_start": loadavg(),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory": mem,
        "kernel": platform.release(),
        "os": first_line(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "python": platform.python_version(),
        "twisted": tw,
        "postgres": postgres,
        "pgbench": first_line(["pgbench", "--version"]),
        "pgbouncer": first_line([pgbouncer_bin, "--version"]) if pgbouncer_bin else "PgBouncer not installed",
        "pgtwist": (
            first_line(["git", "-C", str(REPO), "rev-parse", "--short", rev]) + " (git archive, not the working tree)"
            if rev else git + (" + uncommitted changes" if dirty else "")
        ),
    }


def print_markdown(info: dict, args, tps_sections: list, memory_rows: list[dict]) -> None:
    print()
    print(f"Measured {info['date']} on {info['nproc']} CPU(s) ({info['cpu']}), {info['memory']} RAM, "
          f"{info['os']}, kernel {info['kernel']}.  ")
    print(f"PostgreSQL: {info['postgres']}; {info['pgbench']}; {info['pgbouncer']}; Python {info['python']}, "
          f"Twisted {info['twisted']}; pgtwist {info['pgtwist']}.  ")
    print(f"1-min load average {info['loadavg_start']:.1f} when the run started, {info.get('loadavg_end', 0):.1f} when it "
          "ended (other work shared the machine).  ")
    if tps_sections:
        print(f"pgbench -c {'/'.join(map(str, args.pgbench_clients))} -j {args.pgbench_jobs} -T {args.duration}, "
              f"scale {args.scale}, {args.rounds} alternating round(s) per target, median reported; "
              f"pool_size / default_pool_size {args.pool_size}; {args.auth} authentication for clients. "
              "With -C (churn) every transaction is a new connection and login, so CPU per transaction is CPU per login.")
    if tps_sections:
        print()
        print("| scenario | pool mode | clients / pool | direct tps | PgBouncer tps | pgtwist tps | pgtwist / PgBouncer "
              "| pgtwist / direct | PgBouncer CPU (µs/tx) | pgtwist CPU (µs/tx) |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for scenario, mode, clients, s in tps_sections:
            def cell(t, s=s):  # (called within this iteration)
                if t not in s:
                    return "n/a"
                x = s[t]
                text = fmt_tps(x["median"])
                if x["failed_runs"]:
                    text += f" ({x['failed_runs']}/{x['runs']} runs failed)"
                if x["notes"]:
                    text += " *"
                return text

            def cpu(t, s=s):
                if t not in s or s[t]["cpu"] is None:
                    return "-"
                us = s[t]["cpu_us_per_tx"]
                return f"{100 * s[t]['cpu']:.0f}%" + ("" if us is None else f" ({us:.0f})")

            med = {t: s[t]["median"] for t in s}
            print(f"| {scenario.name} (`{' '.join(scenario.args)}`) | {mode} | {clients} / {args.pool_size} "
                  f"| {cell('direct')} | {cell('pgbouncer')} "
                  f"| {cell('pgtwist')} | {fmt_ratio(med.get('pgtwist'), med.get('pgbouncer'))} "
                  f"| {fmt_ratio(med.get('pgtwist'), med.get('direct'))} | {cpu('pgbouncer')} | {cpu('pgtwist')} |")
        notes = sorted({n for _, _, _, s in tps_sections for t in s.values() for n in t["notes"]})
        for n in notes:
            print(f"\n\\* PgBouncer ran {n}.")
        print()
        print("Per-round tps (direct / PgBouncer / pgtwist):")
        print()
        for scenario, mode, clients, s in tps_sections:
            rounds = "; ".join(f"{t}: " + ", ".join(fmt_tps(x) for x in s[t]["all"]) for t in s)
            print(f"- {scenario.name} [{mode}, {clients} clients]: {rounds}")
    if memory_rows:
        print()
        print("| idle clients | target | authenticated | got ReadyForQuery | RSS before | RSS after | bytes per idle client |")
        print("|---:|---|---:|---:|---:|---:|---:|")
        for r in memory_rows:
            bpc = "-" if r["bytes_per_client"] is None else f"{r['bytes_per_client']:,.0f}"
            print(f"| {r['clients']} | {r['target']} | {r['authenticated']} | {r['ready']} | "
                  f"{r['rss_before'] / 2**20:.1f} MiB | {r['rss_after'] / 2**20:.1f} MiB | {bpc} |")


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="bench/run.py",
        description="Compare pgtwist with PgBouncer and direct PostgreSQL (pgbench tps, idle-client memory).",
    )
    ap.add_argument("--scenario", action="append", choices=[*SCENARIOS, *MEMORY_SCENARIOS],
                    help=f"repeatable; default: {', '.join(DEFAULT_SCENARIOS)}")
    ap.add_argument("--pool-mode", choices=("session", "transaction"), default="session")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per scenario (default 3)")
    ap.add_argument("--duration", type=int, default=10, help="seconds per pgbench run (default 10)")
    ap.add_argument("--pgbench-clients", type=int, action="append",
                    help="pgbench -c; repeatable to sweep client counts (default 16). Above the pool size, clients "
                         f"wait for server connections: the regime a pooler exists for. Above {DIRECT_MAX_CLIENTS} "
                         "the `direct` target is skipped (max_connections)")
    ap.add_argument("--pool-size", type=int, default=POOL_SIZE,
                    help=f"pool_size (pgtwist) and default_pool_size (PgBouncer) (default {POOL_SIZE})")
    ap.add_argument("--auth", choices=("scram", "trust"), default="scram",
                    help="how both poolers authenticate clients (default scram: SCRAM-SHA-256)")
    ap.add_argument("--pgbench-jobs", type=int, default=2, help="pgbench -j (default 2)")
    ap.add_argument("--workers", default="1", help='pgtwist `workers`: a number or "auto" (default 1); pooler CPU '
                                                    "then sums the supervisor and its workers")
    ap.add_argument("--replicas", type=int, default=0,
                    help="streaming replicas beside the primary (default 0); pgtwist routes reads to them "
                         "(read-your-writes included), PgBouncer and direct use the primary alone")
    ap.add_argument("--scale", type=int, default=10, help="pgbench -i -s (default 10)")
    ap.add_argument("--clients", type=int, action="append",
                    help="idle-clients: number of idle connections; repeatable (default 4000)")
    ap.add_argument("--idle-timeout", type=float, default=300, help="idle-clients: seconds allowed to log them all in")
    ap.add_argument("--targets", default=",".join(TARGETS), help="comma-separated subset of direct,pgbouncer,pgtwist")
    ap.add_argument("--require-pgbouncer", action="store_true", help="fail instead of skipping PgBouncer when missing")
    ap.add_argument("--markdown", action="store_true", help="also print Markdown tables (for docs/BENCHMARKS.md)")
    ap.add_argument("--json", type=Path, help="write every raw result to this file")
    ap.add_argument("--profile", type=Path,
                    help="run pgtwist under cProfile, save the stats here and print the top functions "
                         "(slows pgtwist: its figures are then not comparable)")
    ap.add_argument("--pgtwist-rev", metavar="REV",
                    help="benchmark pgtwist as committed at this git revision (e.g. HEAD) instead of the working tree")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (configs, logs) for inspection")
    args = ap.parse_args(argv)
    args.scenario = list(dict.fromkeys(args.scenario or DEFAULT_SCENARIOS))
    args.clients = list(dict.fromkeys(args.clients or [4000]))
    args.pgbench_clients = list(dict.fromkeys(args.pgbench_clients or [16]))
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if args.workers != "auto":
        try:
            args.workers = int(args.workers)
        except ValueError:
            ap.error('--workers: a number or "auto"')
        if args.workers < 1:
            ap.error("--workers must be >= 1")
    bad = [t for t in args.targets if t not in TARGETS]
    if bad or not args.targets:
        ap.error(f"--targets: unknown {', '.join(bad) or '(empty)'}; choose from {', '.join(TARGETS)}")
    if args.rounds < 1 or args.duration < 1:
        ap.error("--rounds and --duration must be >= 1")
    if args.profile is not None:
        args.profile = args.profile.absolute()
    return args


def run(args: argparse.Namespace) -> int:
    bench = Bench(args)
    targets = list(args.targets)
    if not shutil.which("pgbench") and any(s in SCENARIOS for s in args.scenario):
        raise BenchError("pgbench not found: apt-get install postgresql-client (or postgresql)")
    if "pgbouncer" in targets and bench.pgbouncer_bin is None:
        msg = ("PgBouncer is not installed; get it with `apt-get install pgbouncer` "
               "(as root: apt-get update && apt-get install -y pgbouncer)")
        if args.require_pgbouncer:
            raise BenchError(msg)
        say(msg + "; running without it (ratios vs direct only)")
        targets.remove("pgbouncer")
    limit = raise_nofile()
    if "idle-clients" in args.scenario and limit < max(args.clients) + 1000:
        say(f"warning: RLIMIT_NOFILE is {limit}; {max(args.clients)} idle clients may not fit")
    mode = args.pool_mode
    info = machine_info(bench.pgbouncer_bin, args.pgtwist_rev)
    say(f"{info['nproc']} CPU(s), {info['postgres']}, {info['pgbouncer']}, pgtwist {info['pgtwist']}")
    tps_sections = []
    memory_rows: list[dict] = []
    raw: list[dict] = []
    try:
        bench.setup()
        info["pgtwist"] += f", sources sha256 {bench.source_digest}"
        tps_scenarios = [SCENARIOS[s] for s in args.scenario if s in SCENARIOS]
        if tps_scenarios:
            live: dict[str, Target] = {"direct": Target("direct", bench.node.host, bench.node.port)}
            if "pgbouncer" in targets:
                live["pgbouncer"] = bench.start_pgbouncer(mode)
            if "pgtwist" in targets:
                live["pgtwist"] = bench.start_pgtwist(mode, args.profile)
            for t in targets:
                say(f"{t}: {live[t].host}:{live[t].port}" + (f" (pid {live[t].proc.pid})" if live[t].proc else ""))
            fallback = mode == "transaction"
            for scenario in tps_scenarios:
                for clients in args.pgbench_clients:
                    # PostgreSQL cannot take more clients than max_connections: direct drops out there.
                    here = [t for t in targets if t != "direct" or clients <= DIRECT_MAX_CLIENTS]
                    results = []
                    for rnd in range(1, args.rounds + 1):
                        for t in here:
                            r = bench.pgbench(live[t], scenario, fallback, clients)
                            r["round"] = rnd
                            results.append(r)
                            state = r["problem"] or "ok"
                            say(f"{scenario.name} -c {clients} round {rnd}/{args.rounds} {t:<9} "
                                f"tps {fmt_tps(r['tps']):>8}  {state}")
                            if r.get("detail") and r["problem"]:
                                say("  " + r["detail"].replace("\n", "\n  ")[-800:])
                    raw += results
                    summary = print_tps_table(scenario, mode, results, here, args, clients)
                    tps_sections.append((scenario, mode, clients, summary))
            for t in ("pgbouncer", "pgtwist"):
                if t in live:
                    bench.stop_target(live[t])
            if args.profile is not None and "pgtwist" in live:
                print_profile(args.profile)
        if "idle-clients" in args.scenario:
            for n in args.clients:
                for t in targets:
                    if t == "direct":
                        continue  # PostgreSQL forks a backend per client: not a pooler comparison
                    target = bench.start_pgbouncer(mode) if t == "pgbouncer" else bench.start_pgtwist(mode)
                    try:
                        say(f"idle-clients: {n} clients on {t} (pid {target.proc.pid})")
                        row = bench.idle_clients(target, n)
                        row["pool_mode"] = mode
                        memory_rows.append(row)
                        say(f"  {row['authenticated']} authenticated, {row['ready']} ready, {row['failed']} failed, "
                            f"{row['bytes_per_client'] or 0:,.0f} bytes/client")
                    finally:
                        bench.stop_target(target)
            raw += memory_rows
            print_memory_table(memory_rows)
        info["loadavg_end"] = loadavg()
        print()
        print(f"machine: {info['nproc']} CPU(s) {info['cpu']}, {info['memory']}, {info['os']}; {info['date']}; "
              f"1-min load average {info['loadavg_start']:.1f} at start, {info['loadavg_end']:.1f} at end")
        print(f"versions: {info['postgres']}; {info['pgbouncer']}; Python {info['python']}; "
              f"Twisted {info['twisted']}; pgtwist {info['pgtwist']}")
        if args.markdown:
            print_markdown(info, args, tps_sections, memory_rows)
        if args.json:
            args.json.write_text(json.dumps({"machine": info, "results": raw}, indent=1, default=str))
    finally:
        cleanup(bench)
    failed = any(x["failed_runs"] for _, _, _, s in tps_sections for x in s.values())
    return 1 if failed else 0


def print_profile(path: Path) -> None:
    import pstats

    if not path.exists():
        say(f"no profile written to {path}")
        return
    print()
    print(f"== pgtwist cProfile ({path}), top 30 by own time")
    stats = pstats.Stats(str(path))
    stats.sort_stats("tottime").print_stats(30)


def cleanup(bench: Bench) -> None:
    # A second Ctrl-C must not cut the cleanup short; every wait in it is bounded.
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    old_term = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        bench.procs.stop_all()
        if bench.cluster is not None:
            try:
                bench.cluster.destroy()
            except Exception as e:  # noqa: BLE001 - report and go on cleaning
                say(f"destroying the cluster failed: {e}")
        if bench.tmp is not None and not bench.args.keep:
            shutil.rmtree(bench.tmp, ignore_errors=True)
        elif bench.tmp is not None:
            say(f"kept {bench.tmp}")
    finally:
        signal.signal(signal.SIGINT, old)
        signal.signal(signal.SIGTERM, old_term)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_idle-worker"]:
        return idle_worker(argv[1:])
    args = parse_args(argv)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return run(args)
    except KeyboardInterrupt:
        say("interrupted; everything started has been stopped")
        return 130
    except BenchError as e:
        say(f"error: {e}")
        return 1
    except Exception as e:
        from pgtwist.tools.localcluster import LocalClusterError

        if isinstance(e, LocalClusterError):
            say(f"error: {e}")
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
