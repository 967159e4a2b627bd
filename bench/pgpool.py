#!/usr/bin/env python3
"""pgtwist vs Pgpool-II as read/write-splitting load balancers: pgbench -S through each, one primary + one replica.

    PYTHONPATH=. python bench/pgpool.py [--rounds 3] [--duration 10] [--clients 16] [--jobs 2]
                                        [--scale 10] [--protocol simple|extended|prepared]
                                        [--json FILE] [--keep]

Everything runs on this machine: one throwaway PostgreSQL primary with one streaming replica
(pgtwist.tools.localcluster), Pgpool-II (Debian package pgpool2) in streaming-replication mode with
load_balance_mode = on, and pgtwist in transaction pooling mode with routing on (reads to the
replica, writes to the primary). Both stay up for the whole run; pgbench rounds alternate
between them (the order flips each round). Both authenticate clients with SCRAM-SHA-256 and
log in to the nodes with the app user's password (Pgpool-II from a TEXT entry in pool_passwd).
As root, PostgreSQL and Pgpool-II run as the `postgres` OS user. Everything started here is
stopped on exit, Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import pwd
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

sys.path.insert(0, str(Path(__file__).resolve().parent))
# The process, port and pgbench plumbing is bench/run.py's; this file adds Pgpool-II and the split.
from run import (  # noqa: E402
    BenchError,
    Processes,
    client_env,
    find_daemon,
    first_line,
    judge_pgbench,
    loadavg,
    parse_pgbench,
    say,
    wait_port,
    work_dir,
)

HOST = "127.0.0.1"
DBNAME = "pgbench"
APP_USER = "app"
POOL_SIZE = 20  # pgtwist: server connections per node
PGPOOL_CHILDREN = 32  # Pgpool-II: num_init_children (>= pgbench clients), one backend connection set each


# --------------------------------------------------------------------------- processes


def cpu_seconds_tree(pid: int) -> float:
    """utime + stime of *pid* and its live children (Pgpool-II is a parent plus one process per client slot)."""
    total = 0.0
    pids = [pid]
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError, IndexError, ValueError):
                    with open(f"/proc/{entry}/stat") as f:
                        if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                            pids.append(int(entry))
    for p in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


# --------------------------------------------------------------------------- the bench


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.procs = Processes()
        self.cluster = None
        self.tmp: Path | None = None
        self.run_as: pwd.struct_passwd | None = None
        self.pgpool_bin = find_daemon("pgpool")
        self.targets: dict[str, dict] = {}

    # -- setup ---------------------------------------------------------------------------

    def setup(self) -> None:
        from pgtwist.tools.localcluster import LocalCluster

        if self.pgpool_bin is None:
            raise BenchError("pgpool not found: apt-get install pgpool2")
        if not shutil.which("pgbench"):
            raise BenchError("pgbench not found: apt-get install postgresql-client (or postgresql)")
        self.run_as, self.tmp = work_dir("pgtwist-pgpool-", "Pgpool-II")
        # A copy of the tree: edits made while the bench runs do not change the pgtwist under test.
        src = self.tmp / "src"
        skip = shutil.ignore_patterns("__pycache__", "*.pyc", "dropin.cache")
        shutil.copytree(REPO / "pgtwist", src / "pgtwist", ignore=skip)
        shutil.copytree(REPO / "twisted", src / "twisted", ignore=skip)
        t0 = time.monotonic()
        self.cluster = LocalCluster.create(
            replicas=1,
            app_user=APP_USER,
            app_database=DBNAME,
            settings={"max_connections": "400", "shared_buffers": "256MB"},
        )
        primary, replica = self.cluster.nodes
        say(f"PostgreSQL primary {primary.addr}, replica {replica.addr} ({time.monotonic() - t0:.1f}s)")
        t0 = time.monotonic()
        self.run_client(["pgbench", "-i", "-q", "-s", str(self.args.scale), "-h", primary.host, "-p", str(primary.port),
                         "-U", APP_USER, DBNAME], "pgbench -i", 900)
        self.cluster.wait_replicas_caught_up(300)
        say(f"pgbench -i -s {self.args.scale} done, replica caught up ({time.monotonic() - t0:.1f}s)")

    def run_client(self, argv: list[str], what: str, timeout: float) -> str:
        proc = self.procs.start("pgbench", argv, env=client_env(self.cluster.app_password), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.procs.stop(proc, signal.SIGKILL)
            raise BenchError(f"{what} did not finish within {timeout:g}s") from None
        finally:
            self.procs.stop(proc)
        if proc.returncode != 0:
            raise BenchError(f"{what} failed (exit {proc.returncode}):\n{out[-3000:]}")
        return out

    def owned_file(self, name: str, text: str, mode: int = 0o600) -> Path:
        path = self.tmp / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        if self.run_as is not None:
            os.chown(path, self.run_as.pw_uid, self.run_as.pw_gid)
        return path

    def start_pgpool(self) -> None:
        from pgtwist.tools.localcluster import free_port

        primary, replica = self.cluster.nodes
        port, pcp_port = free_port(), free_port()
        while pcp_port == port:
            pcp_port = free_port()
        password = self.cluster.app_password
        self.owned_file("pool_passwd", f"{APP_USER}:TEXT{password}\n")
        self.owned_file("pool_hba.conf", "local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n")
        self.owned_file("pcp.conf", "")
        backends = ""
        for i, (node, name) in enumerate(((primary, "primary"), (replica, "replica"))):
            backends += (
                f"backend_hostname{i} = '{node.host}'\n"
                f"backend_port{i} = {node.port}\n"
                f"backend_weight{i} = 1\n"
                f"backend_data_directory{i} = '{node.datadir}'\n"
                f"backend_flag{i} = 'DISALLOW_TO_FAILOVER'\n"
                f"backend_application_name{i} = '{name}'\n"
            )
        conf = self.owned_file(
            "pgpool.conf",
            "backend_clustering_mode = 'streaming_replication'\n"
            "listen_addresses = '127.0.0.1'\n"
            f"port = {port}\n"
            f"socket_dir = '{self.tmp}'\n"
            "pcp_listen_addresses = ''\n"
            f"pcp_port = {pcp_port}\n"
            f"pcp_socket_dir = '{self.tmp}'\n"
            + backends
            + "enable_pool_hba = on\n"
            f"pool_passwd = '{self.tmp / 'pool_passwd'}'\n"
            f"num_init_children = {PGPOOL_CHILDREN}\n"
            "max_pool = 1\n"
            "child_life_time = 0\n"
            "child_max_connections = 0\n"
            "connection_life_time = 0\n"
            "client_idle_limit = 0\n"
            "connection_cache = on\n"
            "load_balance_mode = on\n"
            "statement_level_load_balance = off\n"
            # Primary detection at start needs a login; no periodic lag checks or health checks.
            "sr_check_period = 0\n"
            f"sr_check_user = '{APP_USER}'\n"
            f"sr_check_password = '{password}'\n"
            f"sr_check_database = '{DBNAME}'\n"
            "health_check_period = 0\n"
            "failover_on_backend_error = off\n"
            "use_watchdog = off\n"
            "memory_cache_enabled = off\n"
            "log_destination = 'stderr'\n"
            "log_min_messages = warning\n"
            "log_connections = off\n"
            "log_statement = off\n"
            "log_per_node_statement = off\n"
            f"logdir = '{self.tmp}'\n"
            f"pid_file_name = '{self.tmp / 'pgpool.pid'}'\n",
        )
        log = self.tmp / "pgpool.log"
        with open(log, "wb") as out:
            if self.run_as is not None:
                os.chown(log, self.run_as.pw_uid, self.run_as.pw_gid)
            proc = self.procs.start(
                "pgpool",
                [self.pgpool_bin, "-n", "-D", "-f", str(conf), "-a", str(self.tmp / "pool_hba.conf"),
                 "-F", str(self.tmp / "pcp.conf")],
                run_as=self.run_as, cwd=self.tmp, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            )
        wait_port(HOST, port, proc, "Pgpool-II", log)
        self.targets["pgpool"] = {"port": port, "proc": proc, "log": log}

    def start_pgtwist(self) -> None:
        from pgtwist.tools.localcluster import free_port

        primary, replica = self.cluster.nodes
        port = free_port()
        conf = self.owned_file(
            "pgtwist.toml",
            f'listen = "127.0.0.1:{port}"\n'
            'pool_mode = "transaction"\n'
            f"pool_size = {POOL_SIZE}\n"
            'auth_type = "scram-sha-256"\n'
            "health_check_interval = 1.0\n"
            f"\n[databases.{DBNAME}]\n"
            f'dbname = "{DBNAME}"\n'
            f'nodes = ["{primary.addr}", "{replica.addr}"]\n'
            f"\n[users.{APP_USER}]\n"
            f"password = '{self.cluster.app_password}'\n",
        )
        log = self.tmp / "pgtwist.log"
        argv = [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()",
                "-n", "--pidfile=", f"--logfile={log}", "pgbalance", "--config", str(conf)]
        env = dict(os.environ)
        others = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != REPO]
        env["PYTHONPATH"] = os.pathsep.join([str(self.tmp / "src")] + others)
        proc = self.procs.start("pgtwist", argv, env=env, cwd=self.tmp, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(HOST, port, proc, "pgtwist", log)
        self.targets["pgtwist"] = {"port": port, "proc": proc, "log": log}

    # -- measuring -------------------------------------------------------------------------

    def served_by(self, target: str) -> set[str]:
        """Which nodes answer `SELECT inet_server_port()` through *target* over a few connections."""
        ports = {node.port: node.name for node in self.cluster.nodes}
        seen = set()
        for _ in range(4):
            out = self.run_client(["psql", "-X", "-A", "-t", "-h", "127.0.0.1", "-p", str(self.targets[target]["port"]),
                                   "-U", APP_USER, "-d", DBNAME, "-c", "SELECT inet_server_port()",
                                   "-c", "SELECT inet_server_port()"], f"psql through {target}", 60)
            seen.update(ports.get(int(x), x) for x in out.split())
        return seen

    def pgbench(self, target: str, duration: int) -> dict:
        t = self.targets[target]
        argv = ["pgbench", "-n", "-S", "-M", self.args.protocol, "-c", str(self.args.clients), "-j", str(self.args.jobs),
                "-T", str(duration), "-h", "127.0.0.1", "-p", str(t["port"]), "-U", APP_USER, DBNAME]
        cpu0 = cpu_seconds_tree(t["proc"].pid)
        proc = self.procs.start("pgbench", argv, env=client_env(self.cluster.app_password), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        timed_out = False
        try:
            out, err = proc.communicate(timeout=duration + 120)
        except subprocess.TimeoutExpired:
            self.procs.stop(proc, signal.SIGINT)
            out, err, timed_out = "", "", True
        finally:
            self.procs.stop(proc)
        cpu = cpu_seconds_tree(t["proc"].pid) - cpu0
        result = parse_pgbench(out)
        result.update(target=target, returncode=proc.returncode, pooler_cpu_s=round(cpu, 2), loadavg_after=loadavg())
        return judge_pgbench(result, proc, timed_out, duration, target, t["proc"], out, err)

    def cleanup(self) -> None:
        self.procs.stop_all()
        if self.cluster is not None:
            with contextlib.suppress(Exception):
                self.cluster.destroy()
        if self.tmp is not None and not self.args.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)
        elif self.tmp is not None:
            say(f"kept {self.tmp}")


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def run(args: argparse.Namespace) -> int:
    bench = Bench(args)
    try:
        bench.setup()
        bench.start_pgpool()
        bench.start_pgtwist()
        names = ("pgtwist", "pgpool")
        for name in names:
            bench.pgbench(name, 2)  # warm-up: connections opened, caches filled; not counted
            say(f"{name} on port {bench.targets[name]['port']}: reads served by {sorted(bench.served_by(name))}")
        results: list[dict] = []
        for r in range(args.rounds):
            order = names if r % 2 == 0 else names[::-1]
            for name in order:
                res = bench.pgbench(name, args.duration)
                res["round"] = r + 1
                results.append(res)
                say(f"round {r + 1} {name}: tps {fmt(res['tps'])}, latency {res['latency_ms']} ms, "
                    f"{name} cpu {res['pooler_cpu_s']} s, "
                    f"load {res['loadavg_after']:.1f}" + (f"  PROBLEM: {res['problem']}" if res["problem"] else ""))
        info = {
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
            "postgres": first_line([str(bench.cluster.bindir / "postgres"), "--version"]),
            "pgbench": first_line(["pgbench", "--version"]),
            "pgpool": first_line([bench.pgpool_bin, "--version"]),
            "python": platform.python_version(),
        }
        med = {}
        for name in names:
            tps = [r["tps"] for r in results if r["target"] == name and r["tps"] is not None and not r["problem"]]
            med[name] = statistics.median(tps) if tps else None
        ratio = med["pgtwist"] / med["pgpool"] if med["pgtwist"] and med["pgpool"] else None
        print(f"\n== pgbench -S -M {args.protocol} -c {args.clients} -j {args.jobs} -T {args.duration}, scale {args.scale}, "
              f"{args.rounds} alternating rounds; one primary + one replica on loopback ==")
        print(f"{info['machine']}; {info['postgres']}; {info['pgbench']}; {info['pgpool']}; Python {info['python']}")
        print("pgtwist: transaction pooling, routing on (reads to the replica), pool_size "
              f"{POOL_SIZE}; Pgpool-II: streaming_replication, load_balance_mode on (session-level, weights 1:1), "
              f"num_init_children {PGPOOL_CHILDREN}, max_pool 1; both SCRAM-SHA-256 for clients and nodes")
        print(f"{'round':>5} {'target':>8} {'tps':>10} {'lat ms':>8} {'cpu s':>7}")
        for r in results:
            print(f"{r['round']:>5} {r['target']:>8} {fmt(r['tps']):>10} {r['latency_ms'] or '-':>8} "
                  f"{r['pooler_cpu_s']:>7}" + (f"  PROBLEM: {r['problem']}" if r["problem"] else ""))
        print(f"median tps: pgtwist {fmt(med['pgtwist'])}, Pgpool-II {fmt(med['pgpool'])}; "
              f"pgtwist / Pgpool-II = {ratio:.2f}x" if ratio else "ratio: n/a (a target failed)")
        if args.json:
            Path(args.json).write_text(json.dumps({"info": info, "args": vars(args), "results": results,
                                                   "median_tps": med, "ratio": ratio}, indent=2))
        return 0 if ratio else 1
    finally:
        bench.cleanup()


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bench/pgpool.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    ap.add_argument("--duration", type=int, default=10, help="seconds per pgbench run (default 10)")
    ap.add_argument("--clients", type=int, default=16, help="pgbench -c (default 16)")
    ap.add_argument("--jobs", type=int, default=2, help="pgbench -j (default 2)")
    ap.add_argument("--scale", type=int, default=10, help="pgbench -i -s (default 10)")
    ap.add_argument("--protocol", choices=("simple", "extended", "prepared"), default="simple",
                    help="pgbench -M (default simple: every query text differs, literals inlined)")
    ap.add_argument("--json", help="write every result to this file")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs)")
    args = ap.parse_args(argv)
    if args.clients > PGPOOL_CHILDREN:
        ap.error(f"--clients must be <= {PGPOOL_CHILDREN} (Pgpool-II num_init_children)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        return run(args)
    except BenchError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
